"""MoR (Tang et al., arXiv 2410.13408): a mixture of ranks over one shared LoRA pair.

Expert i rescales the shared factors, ``D_i = s·diag(Ω_B[i])·B·diag(Ω_A[i])·A``, and a soft input
router mixes them per token: ``h = W0 x + Σ_i G_i(x)·D_i x`` with ``G = softmax(W_g x)``. Because each
Ω_B row rescales B's output rows differently, the mixture can exceed rank r at a cost of only
N·(r + d_out) scales and N·d_in router weights on top of one LoRA.

Init (not stated in the paper; our choice): A seeded Kaiming-uniform, B = 0, every Ω = 1 (all experts
start as the same LoRA), the router seeded Kaiming-uniform. A, B and the router are ``nn.Linear``;
the scale tables are a small ``Scales`` layer with its own Opacus grad sampler (the per-sample
gradient of an elementwise scale is ``Σ_t activation ⊙ backprop``), checked against a per-example loop.

Aggregation: the shared A, B and the router by example-weighted mean; the scale tables row by row
(row i is expert i) by ``usage``: each client's row i weighted by its soft usage of expert i, the sum
over its real tokens of the router probability ``G_i(x)`` (sent only without DP, like MoLE's counts;
under DP the example-weighted mean). Then the scale gauge is renormalised on the server
(``Mor.after_aggregate``): ``Ω[:, j]`` is divided by its mean over experts and A's (B's) row j multiplied
by it, which leaves every ``D_i`` unchanged but stops clients drifting between equivalent scalings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fed.adapters.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    Aggregation,
    MixtureOptions,
    Product,
    TensorGroup,
    UsageParams,
    replace_linears,
)
from fed.adapters.registry import register_family
from fed.seeding import generator


class Scales(nn.Module):
    """A table ``weight`` (N×m) multiplying ``(..., N, m)`` activations elementwise."""

    def __init__(self, experts: int, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(experts, width, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight

    @staticmethod
    def grad_sampler(
        layer: Scales, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradient of an elementwise scale (Opacus has no rule for this layer; registered by
        ``fed.privacy.dpsgd.per_sample_module``): activation ⊙ backprop, summed over the sequence."""
        return {layer.weight: torch.einsum("b...nm,b...nm->bnm", activations[0], backprops)}


class MorLinear(nn.Module):
    """A frozen ``nn.Linear`` plus N soft-routed rank experts sharing one (A, B) pair."""

    def __init__(self, base: nn.Linear, spec: AdapterSpec, seed: int, path: str) -> None:
        super().__init__()
        dtype, n = base.weight.dtype, spec.options.experts
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, spec.rank, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(spec.rank, base.out_features, bias=False, dtype=dtype)
        self.router = nn.Linear(base.in_features, n, bias=False, dtype=dtype)
        self.scale_A = Scales(n, spec.rank, dtype)
        self.scale_B = Scales(n, base.out_features, dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.path = path
        self.gates: torch.Tensor | None = None
        """The router probabilities ``[..., N]`` of the last forward (detached), for ``counts``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator(seed, "lora_A", path))
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5), generator=generator(seed, "router", path))
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1)
        self.gates = probs.detach()
        gates = probs.unsqueeze(-1)  # [..., N, 1]
        u = self.lora_A(self.dropout(x)).unsqueeze(-2)  # [..., 1, r]
        scaled = self.scale_A(u.expand(*u.shape[:-2], gates.shape[-2], u.shape[-1]))  # [..., N, r]
        # B sees [batch, tokens·N, r]: Opacus's ghost-clipping norm sampler for Linear takes 3-D inputs only.
        lifted = self.lora_B(scaled.reshape(scaled.shape[0], -1, scaled.shape[-1])).reshape(*gates.shape[:-1], -1)
        return self.base_layer(x) + self.scaling * (gates * self.scale_B(lifted)).sum(-2)

    def slots(self) -> list[str]:
        return [f"{self.path}/{i}" for i in range(self.router.out_features)]

    def counts(self, mask: torch.Tensor) -> dict[str, float]:
        """Soft usage of each expert by the last batch: ``Σ_t G_i(x_t)`` over its real tokens."""
        if self.gates is None:
            raise RuntimeError(f"MoR layer {self.path!r} has not run a batch yet")
        used = (self.gates * mask.to(self.gates.dtype).reshape(*self.gates.shape[:-1], 1)).flatten(0, -2).sum(0)
        return dict(zip(self.slots(), used.tolist()))

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        a, b, omega_a, omega_b = (
            get(n) for n in ("lora_A.weight", "lora_B.weight", "scale_A.weight", "scale_B.weight")
        )
        return {
            f".experts.{i}": (self.scaling * (omega_b[i][:, None] * b) @ (omega_a[i][:, None] * a), slot)
            for i, slot in enumerate(self.slots())
        }


@register_family
class Mor(AdapterFamily):
    kind = "mor"
    Options = MixtureOptions
    peft_compatible = False

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = replace_linears(model, spec.targets, lambda path, linear: MorLinear(linear, spec, seed, path))

        def names(part: str) -> tuple[str, ...]:
            return tuple(f"{p}.{part}.weight" for p in paths)

        def slots(path: str) -> tuple[str, ...]:
            layer = model.get_submodule(path)
            assert isinstance(layer, MorLinear)  # replace_linears just installed it there
            return tuple(layer.slots())

        rows = tuple(slots(p) for p in paths)
        return (
            TensorGroup("lora_A", names("lora_A"), trainable=True, sent=True),
            TensorGroup("lora_B", names("lora_B"), trainable=True, sent=True),
            TensorGroup("router", names("router"), trainable=True, sent=True),
            *(
                TensorGroup(
                    table,
                    names(table),
                    trainable=True,
                    sent=True,
                    aggregation=Aggregation.USAGE,
                    rule=UsageParams(rows=rows),
                )
                for table in ("scale_A", "scale_B")
            ),
        )

    def after_aggregate(
        self, adapter: Adapter, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Fix the scale gauge of the scale tables Ω: each column's mean over experts becomes 1.

        ``Ω[:, j] / c_j`` with the shared factor's row ``j`` times ``c_j`` leaves every expert's update unchanged,
        so clients that drifted into different scales of the same function start the next round from one
        gauge. Columns whose mean is (near) zero are left alone rather than divided by it.
        """
        out = dict(after)
        for table, factor in (("scale_A", "lora_A"), ("scale_B", "lora_B")):
            for scale, shared in zip(adapter.group(table).params, adapter.group(factor).params):
                c = out[scale].mean(0)
                c = torch.where(c.abs() > 1e-6, c, torch.ones_like(c))
                out[scale] = out[scale] / c
                out[shared] = out[shared] * c[:, None]
        return out
