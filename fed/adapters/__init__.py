"""Adapter families behind one protocol, and ``build`` — the one way a model gets an adapter."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from fed.adapters.base import (
    HEAD,
    Adapter,
    AdapterFamily,
    AdapterSpec,
    Aggregation,
    Clock,
    MaskedParams,
    PairParams,
    ProductParams,
    Structure,
    TensorGroup,
    UsageParams,
)
from fed.adapters.registry import family, kinds, ranked_kinds, register_family


def make_spec(
    kind: str, rank: int, alpha: float, targets: tuple[str, ...], dropout: float = 0.0, **options: Any
) -> AdapterSpec:
    """A spec whose options are ``kind``'s own (``AdapterFamily.Options``); an option it lacks is refused by name."""
    accepted = {f.name for f in dataclasses.fields(family(kind).Options)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"adapter options {unknown} do not apply to kind {kind!r}; its options: {sorted(accepted) or 'none'}"
        )
    return AdapterSpec(kind, rank, alpha, targets, dropout, family(kind).Options(**options))


def family_options(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are options of ``kind`` (a config holds every family's option keys)."""
    return {f.name: values[f.name] for f in dataclasses.fields(family(kind).Options) if f.name in values}


def build(model: nn.Module, spec: AdapterSpec, seed: int, head: tuple[str, ...] = ()) -> Adapter:
    """Inject ``spec`` into ``model`` (in place, on the device of its base) and return the handle.

    ``head`` names task-head parameters (a classifier) that train and travel with the adapter; they are
    unfrozen here so that every family treats them the same way.
    """
    if spec.options is None:
        spec = dataclasses.replace(spec, options=family(spec.kind).Options())
    device = next(model.parameters()).device  # where the base was placed (fed.device)
    groups = family(spec.kind).inject(model, spec, seed)
    # Families draw their tensors on the CPU from seeded generators, so every party (server on its CPU, a
    # client on a GPU) gets the same values; they join the base now, once, before anything holds them.
    model.to(device)
    if head:
        named = dict(model.named_parameters())
        for name in head:
            named[name].requires_grad_(True)
        groups = (*groups, TensorGroup(HEAD, tuple(head), trainable=True, sent=True))
    adapter = Adapter(spec=spec, model=model, groups=groups, family=family(spec.kind))
    private = sorted(set(adapter.names(trainable=True)) - set(adapter.names(sent=True)))
    if private:
        # Every trained tensor is overwritten from the global state each round, which is what lets one
        # cached model serve several clients; client-private trained state would break that.
        raise ValueError(f"family {spec.kind!r} trains tensors it does not send: {private[:3]}")
    return adapter


__all__ = [
    "Adapter",
    "AdapterFamily",
    "AdapterSpec",
    "Aggregation",
    "Clock",
    "MaskedParams",
    "PairParams",
    "ProductParams",
    "Structure",
    "TensorGroup",
    "UsageParams",
    "build",
    "family",
    "family_options",
    "kinds",
    "make_spec",
    "ranked_kinds",
    "register_family",
]
