"""Adapter families behind one protocol, and ``build`` — the one way a model gets an adapter."""

from __future__ import annotations

from torch import nn

from fed.adapters.base import (HEAD, Adapter, AdapterFamily, AdapterSpec, Aggregation, Clock, MaskedParams, PairParams,
                               ProductParams, Structure, TensorGroup, UsageParams)
from fed.adapters.registry import family, kinds, ranked_kinds, register_family


def build(model: nn.Module, spec: AdapterSpec, seed: int, head: tuple[str, ...] = ()) -> Adapter:
    """Inject ``spec`` into ``model`` (in place) and return the handle.

    ``head`` names task-head parameters (a classifier) that train and travel with the adapter; they are
    unfrozen here so that every family treats them the same way.
    """
    groups = family(spec.kind).inject(model, spec, seed)
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


__all__ = ["Adapter", "AdapterFamily", "AdapterSpec", "MaskedParams", "PairParams", "ProductParams", "UsageParams", "Aggregation", "Clock", "Structure", "TensorGroup", "build", "family", "kinds",
           "ranked_kinds", "register_family"]
