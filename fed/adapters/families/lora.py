"""LoRA: ``h = W0 x + (alpha/r) · B A x`` with A, B as plain ``nn.Linear`` layers.

Keeping both factors as ``nn.Linear`` gives exact Opacus per-sample gradients from its built-in
Linear sampler (no functorch fallback), and names them like PEFT does (``<module>.lora_A.weight``),
so the exported adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fed.adapters.base import AdapterFamily, AdapterSpec, PairParams, Product, TensorGroup, replace_linears
from fed.adapters.registry import register_family
from fed.seeding import generator


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update; B starts at zero so the model starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.active_rank: int | None = None
        """A client of rank r_k runs only the first r_k components; None: all of them."""
        with torch.no_grad():
            # PEFT's default A init (Kaiming-uniform, a=sqrt(5)), drawn from a per-layer seeded stream.
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=gen)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.components(self.lora_A(self.dropout(x)))) * self.scaling

    def components(self, u: torch.Tensor) -> torch.Tensor:
        """``A x`` with the components beyond the client's rank zeroed: masked in the forward, so their
        gradients (per-sample ones included: B's input and A's backprop are 0 there) are exactly 0."""
        if self.active_rank is None:
            return u
        return u * (torch.arange(u.shape[-1], device=u.device) < self.active_rank).to(u.dtype)

    def set_rank(self, rank: int | None) -> None:
        self.active_rank = None if rank is None or rank >= self.lora_A.out_features else rank

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        """The layer's weight update ``s·B·A`` for given factor values (see ``Adapter.products``)."""
        return {"": (self.scaling * get("lora_B.weight") @ get("lora_A.weight"), None)}


def inject_lora(model: nn.Module, spec: AdapterSpec, seed: int) -> list[str]:
    """Wrap the targets in ``LoraLinear``; A is seeded per layer from the run seed. Returns wrapped paths."""

    def wrap(path: str, linear: nn.Linear) -> LoraLinear:
        return LoraLinear(linear, spec.rank, spec.alpha, spec.dropout, generator(seed, "lora_A", path))

    return replace_linears(model, spec.targets, wrap)


@register_family
class Lora(AdapterFamily):
    """Both factors trained and sent; the server averages each factor (``mean``)."""

    kind = "lora"
    peft_compatible = True
    ranked = True
    product_pairs = True

    def as_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors in PEFT's LoRA layout: already are."""
        return dict(tensors)

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = inject_lora(model, spec, seed)
        a, b = (tuple(f"{p}.{part}.weight" for p in paths) for part in ("lora_A", "lora_B"))
        return (
            TensorGroup("lora_A", a, trainable=True, sent=True, rank_axis=0),
            TensorGroup("lora_B", b, trainable=True, sent=True, rank_axis=1, rule=PairParams(tuple(zip(b, a)))),
        )
