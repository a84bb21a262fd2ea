"""MoLE (LLaVA-MoLE, Chen et al. 2024): K LoRA experts per targeted projection, top-1 routed per token.

One router per block (the part of the path up to its last layer index, e.g. ``encoder.layer.3``) is
shared by the block's targeted projections, as in LLaVA-MoLE: the first targeted projection of the
block in module order owns it and routes its input; the others reuse that routing in the same
forward. The chosen expert's output is scaled by its router probability (Switch-style), so the task
loss trains the router too.

Under DP-SGD the experts are *dense and masked*: every expert runs on the whole ``(batch, seq, d)``
input and is multiplied by its one-hot gate, so Opacus's Linear sampler sees per-sample shapes, an
expert that gets no token has zero (not missing) per-sample gradients, and no tokens are ever
gathered across examples (which would make tokens, not examples, the unit Opacus clips).

The load-balancing loss is Switch's ``K Σ_j f_j P_j`` (f: the share of real tokens routed to expert j;
P: their mean router probability of expert j). Without DP f and P are taken over the **batch**, as in
the paper: a batch should spread over the experts, while each example may go wholly to its domain's
expert (the routing the method is built on). Under DP they are taken **per example** (example i's own
tokens): a batch-level f couples the examples, and DP-SGD's per-example clipping needs example i's
loss to depend on example i only; the per-example form also penalises one example routed wholly to
one expert, the price of DP here. Experts aggregate with ``usage`` weights (the tokens each client routed to
them); the router by example-weighted mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fed.adapters.base import (
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


def block_of(path: str) -> str:
    """The block a module belongs to: its path up to the last numeric component ('' if none)."""
    match = re.match(r"(.*\.\d+)(\.|$)", path)
    return match.group(1) if match else ""


class BlockRouter(nn.Module):
    """Top-1 token router of one block; remembers the routing of its last call for its block's layers."""

    def __init__(
        self, block: str, in_features: int, experts: int, gen: torch.Generator, dtype: torch.dtype, balance: float = 0.0
    ) -> None:
        super().__init__()
        self.block = block
        self.balance = balance
        """Weight of this router's balance loss in the training loss (``adapter.balance``)."""
        self.gate = nn.Linear(in_features, experts, bias=False, dtype=dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.gate.weight, a=math.sqrt(5), generator=gen)
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.generation = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[..., K]``: the winning expert's probability, zero elsewhere."""
        probs = F.softmax(self.gate(x), dim=-1)
        onehot = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        self.routing = (probs, onehot)
        self.generation += 1
        return probs * onehot

    def slots(self) -> list[str]:
        return [f"{self.block}/{k}" for k in range(self.gate.out_features)]

    def _per_example(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.routing is None:
            raise RuntimeError(f"router of block {self.block!r} has not routed a batch yet")
        probs, onehot = self.routing
        m = mask.to(probs.dtype).reshape(*probs.shape[:-1], 1)
        return probs * m, onehot * m, m.sum(1).clamp(min=1.0)

    def balance_loss(self, mask: torch.Tensor, per_example: bool) -> torch.Tensor:
        probs, onehot, tokens = self._per_example(mask)
        if per_example:  # [batch, K], example i's tokens only
            share, mean_prob = onehot.sum(1) / tokens, probs.sum(1) / tokens
            return probs.shape[-1] * (share * mean_prob).sum(-1)
        total = mask.sum().clamp(min=1).to(probs.dtype)  # the batch's real tokens
        share, mean_prob = onehot.sum((0, 1)) / total, probs.sum((0, 1)) / total  # [K]
        return (probs.shape[-1] * (share * mean_prob).sum()).expand(probs.shape[0])

    def counts(self, mask: torch.Tensor) -> dict[str, int]:
        _, onehot, _ = self._per_example(mask)
        return dict(zip(self.slots(), onehot.sum((0, 1)).round().long().tolist()))


class Expert(nn.Module):
    """One LoRA expert, PEFT-named factors: A seeded Kaiming-uniform, B zero."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=gen)
            self.lora_B.weight.zero_()


class MoleLinear(nn.Module):
    """A frozen ``nn.Linear`` plus K dense, gate-masked LoRA experts routed by its block's router."""

    def __init__(
        self, base: nn.Linear, spec: AdapterSpec, router: BlockRouter, owner: bool, seed: int, path: str
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.experts = nn.ModuleList(
            Expert(base, spec.rank, generator(seed, "lora_A", path, k)) for k in range(spec.options.experts)
        )
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        if owner:
            self.router = router  # registered once, under the block's first targeted layer
        self._shared = (router,)  # a tuple hides it from the module tree (no duplicate parameters)
        self._seen = -1

    def _gates(self, x: torch.Tensor) -> torch.Tensor:
        router = self._shared[0]
        if "router" in self._modules:
            return router(x)
        if router.routing is None or router.generation == self._seen:
            raise RuntimeError(
                f"router of block {router.block!r} did not run before this layer in this forward: "
                "the block's first targeted projection (module order) must be called first"
            )
        self._seen = router.generation
        probs, onehot = router.routing
        return probs * onehot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self._gates(x)
        h = self.dropout(x)
        experts = cast("Iterable[Expert]", self.experts)  # __init__ fills the ModuleList with Experts only
        update = sum(gates[..., k : k + 1] * e.lora_B(e.lora_A(h)) for k, e in enumerate(experts))
        return self.base_layer(x) + self.scaling * update

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        slots = self._shared[0].slots()
        return {
            f".experts.{k}": (
                self.scaling * get(f"experts.{k}.lora_B.weight") @ get(f"experts.{k}.lora_A.weight"),
                slots[k],
            )
            for k in range(len(self.experts))
        }


@dataclass(frozen=True)
class MoleOptions(MixtureOptions):
    balance: float = 0.01
    """Weight of the load-balancing loss that keeps tokens spread over the experts (batch-level; per example
    under DP; 0 turns it off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance < 0:
            raise ValueError(f"adapter.balance={self.balance} must be >= 0")


@register_family
class Mole(AdapterFamily):
    kind = "mole"
    Options = MoleOptions
    peft_compatible = False

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        routers: dict[str, BlockRouter] = {}
        owners: list[str] = []

        def wrap(path: str, linear: nn.Linear) -> MoleLinear:
            block = block_of(path)
            if block not in routers:
                routers[block] = BlockRouter(
                    block,
                    linear.in_features,
                    spec.options.experts,
                    generator(seed, "router", block),
                    linear.weight.dtype,
                    spec.options.balance,
                )
                owners.append(path)
            return MoleLinear(linear, spec, routers[block], path in owners, seed, path)

        paths = replace_linears(model, spec.targets, wrap)
        experts = [
            (f"{p}.experts.{k}.{f}.weight", f"{block_of(p)}/{k}")
            for p in paths
            for k in range(spec.options.experts)
            for f in ("lora_A", "lora_B")
        ]
        return (
            TensorGroup("router", tuple(f"{p}.router.gate.weight" for p in owners), trainable=True, sent=True),
            TensorGroup(
                "experts",
                tuple(n for n, _ in experts),
                trainable=True,
                sent=True,
                aggregation=Aggregation.USAGE,
                rule=UsageParams(slots=tuple(s for _, s in experts)),
            ),
        )
