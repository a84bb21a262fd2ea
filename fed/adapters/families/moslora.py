"""MoSLoRA (Wu et al., EMNLP 2024): a learnable r×r mixer between A and B, ``h = W0 x + s·B M A x``.

The mixer fuses all r² pairs of A's and B's rank-1 subspaces. It is initialised Kaiming-uniform as
the paper prescribes (a zero mixer never trains: with B = 0 and M = 0 every gradient is zero), from a
seeded per-layer stream like A. All three factors are ``nn.Linear`` (``lora_B(lora_AB(lora_A(x)))``,
as in the official code), so Opacus's Linear sampler gives exact per-sample gradients.

Aggregation is by product (``Aggregation.PRODUCT``): averaging B, M and A separately is wrong twice
over (three-way cross terms, and the gauge ``B M A = (B P⁻¹)(P M Q⁻¹)(Q A)`` lets clients drift into
different factorisations), so the server averages the clients' products and re-factorises. With
``adapter.freeze_a`` A stays at its seeded init, never travels, and the product ``B·M`` (d_out×r) is
averaged exactly; otherwise ``B·M·A`` is averaged and truncated back to rank r (lossy, and the loss
shows in ``aggregation_error``). The export folds the mixer into B (``B·M``), which is plain LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fed.adapters.base import (
    AdapterFamily,
    AdapterSpec,
    Aggregation,
    Product,
    ProductParams,
    TensorGroup,
    replace_linears,
)
from fed.adapters.families.lora import LoraLinear
from fed.adapters.registry import register_family
from fed.seeding import generator


class MosLoraLinear(LoraLinear):
    """LoRA with a mixer ``lora_AB`` (r×r) between A and B; B starts at zero, so the model starts unchanged."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float, gen: torch.Generator, mixer_gen: torch.Generator
    ) -> None:
        super().__init__(base, rank, alpha, dropout, gen)
        self.lora_AB = nn.Linear(rank, rank, bias=False, dtype=base.weight.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_AB.weight, a=math.sqrt(5), generator=mixer_gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_AB(self.lora_A(self.dropout(x)))) * self.scaling

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        return {"": (self.scaling * get("lora_B.weight") @ get("lora_AB.weight") @ get("lora_A.weight"), None)}


@dataclass(frozen=True)
class MosLoraOptions:
    freeze_a: bool = False
    """Keep A at its seeded init (never sent): only the mixer and B train, and aggregation is exact."""


@register_family
class MosLora(AdapterFamily):
    kind = "moslora"
    Options = MosLoraOptions
    peft_compatible = True

    def as_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same adapter as plain LoRA (``x·A·M·B = x·A·(M·B)``): each B becomes ``B·M``, mixers dropped."""
        out = {k: v for k, v in tensors.items() if not k.endswith(".lora_AB.weight")}
        for key in tensors:
            if key.endswith(".lora_AB.weight"):
                layer = key.removesuffix(".lora_AB.weight")
                out[f"{layer}.lora_B.weight"] = tensors[f"{layer}.lora_B.weight"] @ tensors[key]
        return out

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        def wrap(path: str, linear: nn.Linear) -> MosLoraLinear:
            return MosLoraLinear(
                linear,
                spec.rank,
                spec.alpha,
                spec.dropout,
                generator(seed, "lora_A", path),
                generator(seed, "lora_AB", path),
            )

        paths = replace_linears(model, spec.targets, wrap)
        names = {part: tuple(f"{p}.{part}.weight" for p in paths) for part in ("lora_A", "lora_AB", "lora_B")}
        chains: tuple[tuple[str, ...], ...]
        frozen: tuple[TensorGroup, ...]
        if spec.options.freeze_a:
            for name in names["lora_A"]:
                model.get_parameter(name).requires_grad_(False)
            chains = tuple(zip(names["lora_B"], names["lora_AB"]))
            frozen = (TensorGroup("lora_A", names["lora_A"], trainable=False, sent=False),)
            factors = names["lora_B"] + names["lora_AB"]
        else:
            chains = tuple(zip(names["lora_B"], names["lora_AB"], names["lora_A"]))
            frozen = ()
            factors = names["lora_B"] + names["lora_AB"] + names["lora_A"]
        return (
            *frozen,
            TensorGroup(
                "factors",
                factors,
                trainable=True,
                sent=True,
                aggregation=Aggregation.PRODUCT,
                rule=ProductParams(chains),
            ),
        )
