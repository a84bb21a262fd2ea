"""RoseLoRA (Wang et al., EMNLP 2024): LoRA whose A is row-wise and B column-wise sparse.

Each row of A and each column of B keeps its top-k entries by an EMA-smoothed sensitivity, so
``s(BA) >= 1 - r·keep²`` of the product stays zero (the paper's Proposition 1) while every rank slot
still reaches every output. The keep share follows a cubic schedule: dense for the first
``WARMUP`` of the run (at init B = 0, so every sensitivity is 0 and pruning would be arbitrary),
then down to ``keep_ratio`` at ``FINAL`` of the run, flat after.

Federated form (our choices, see docs/architecture.md):

- The schedule runs on the run's shared clock in rounds (``Clock``), so every client ends a round
  at the budget the server expects for that round, and the server checks it on the wire.
- Masks are client-local: each client prunes after every local step by its own importance and
  sends, per line, the kept deltas and a bit mask (``fed.wire.to_sparse_record``). The server takes
  a masked mean and re-projects every line to the budget (the ``masked`` kind's rule).
- Importance is the paper's sensitivity ``|w · ∇w|``, EMA-smoothed (β = ``BETA``, the official code's),
  under any optimizer: ``∇w`` is the gradient the optimizer receives, read by ``before_step`` from an
  optimizer pre-step hook (``fed.train``), at the parameters it is the gradient of. Under DP-SGD that
  gradient is the clipped, noised average (Opacus writes it into ``p.grad`` before the inner
  optimizer's step runs), an output of the mechanism, so the importance, the masks and the pruning are
  post-processing. (``|w · Δw|``, the step's change, would equal it only under plain SGD: under Adam
  the first step's change is about ``lr·sign(∇w)`` and the score collapses to ``|w|``.)
- The seed paper has no uncertainty term (unlike AdaLoRA), so neither has the score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fed.adapters.base import (
    Adapter,
    AdapterSpec,
    Aggregation,
    Clock,
    MaskedParams,
    TensorGroup,
    replace_linears,
    top_lines,
)
from fed.adapters.families.lora import Lora, LoraLinear
from fed.adapters.registry import register_family
from fed.seeding import generator

WARMUP, FINAL = 0.1, 0.8
"""Shares of the run (in rounds) where the schedule leaves dense and where it reaches ``keep_ratio``."""
BETA = 0.8
"""EMA weight of the previous importance (the official code's 0.8)."""
AXES = {"lora_A.weight": 1, "lora_B.weight": 0}
"""Axis along which each line keeps its top-k: rows of A run along dim 1, columns of B along dim 0."""


def keep_fraction(progress: float, rounds: int, keep: float) -> float:
    """The cubic schedule at ``progress`` rounds of ``rounds``: 1, then ``keep + (1-keep)(1-x)³``, then ``keep``."""
    start, end = WARMUP * rounds, FINAL * rounds
    if progress <= start:
        return 1.0
    if progress >= end:
        return keep
    return keep + (1 - keep) * (1 - (progress - start) / (end - start)) ** 3


def line_budget(width: int, fraction: float) -> int:
    """Entries a line of ``width`` keeps at ``fraction`` (at least one)."""
    return max(1, min(width, math.ceil(fraction * width - 1e-9)))


class RoseLinear(LoraLinear):
    """A LoRA layer that prunes A by rows and B by columns after every optimizer step."""

    def __init__(self, base: nn.Linear, spec: AdapterSpec, gen: torch.Generator) -> None:
        super().__init__(base, spec.rank, spec.alpha, spec.dropout, gen)
        self.keep_ratio = spec.options.keep_ratio
        # Plain attributes, not buffers: Opacus refuses trainable layers with buffers, and none of this
        # is model state (it is rebuilt every round, so a cached model carries nothing between clients).
        self._clock = Clock(1, 1, 1)
        self._step = 0
        self._started = False
        self._ema: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def _factors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def begin_round(self, clock: Clock) -> None:
        self._clock, self._step, self._started = clock, 0, True
        factors = self._factors()
        self._ema = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in factors.items()}
        self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in factors.items()}

    @torch.no_grad()
    def before_step(self) -> None:
        """Fold the sensitivity ``|w·∇w|`` of the gradient the optimizer is about to apply into the EMA."""
        self._check_started()
        for name, param in self._factors().items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            self._ema[name].mul_(BETA).add_((param.detach() * grad).abs().float(), alpha=1 - BETA)

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep each line's top-k by the smoothed sensitivity, at the clock's budget for this step."""
        self._check_started()
        self._step += 1
        fraction = keep_fraction(self._clock.at(self._step), self._clock.rounds, self.keep_ratio)
        for name, param in self._factors().items():
            axis = AXES[name]
            mask = top_lines(self._ema[name], axis, line_budget(param.shape[axis], fraction))
            param.mul_(mask)
            self._masks[name] = mask

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("a RoseLoRA layer stepped outside a round: call Adapter.begin_round(clock) first")

    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)


@dataclass(frozen=True)
class RoseLoraOptions:
    keep_ratio: float = 0.1
    """Share of each row of A (column of B) kept once the cubic sparsity schedule ends."""

    def __post_init__(self) -> None:
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"adapter.keep_ratio={self.keep_ratio} must be in (0, 1]")


@register_family
class RoseLora(Lora):
    """A and B trained, pruned and sent sparse; the server takes a masked mean (``masked``)."""

    kind = "roselora"
    Options = RoseLoraOptions
    peft_compatible = True  # pruned entries are zeros: the factors are plain LoRA factors
    ranked = False  # client ranks are not defined on line-sparse factors
    product_pairs = False

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = replace_linears(
            model, spec.targets, lambda path, linear: RoseLinear(linear, spec, generator(seed, "lora_A", path))
        )
        return tuple(
            TensorGroup(
                part,
                tuple(f"{p}.{part}.weight" for p in paths),
                trainable=True,
                sent=True,
                aggregation=Aggregation.MASKED,
                rule=MaskedParams(AXES[f"{part}.weight"]),
            )
            for part in ("lora_A", "lora_B")
        )

    def round_budgets(self, adapter: Adapter, round_: int, rounds: int) -> dict[str, int]:
        """Per line-sparse tensor, the entries each line keeps at the end of ``round_``: what the server expects
        every client's reply to keep, on the schedule the clients prune by."""
        fraction = keep_fraction(round_, rounds, adapter.spec.options.keep_ratio)
        shapes = {name: tuple(p.shape) for name, p in adapter.model.named_parameters()}
        return {name: line_budget(shapes[name][axis], fraction) for name, axis in adapter.structure().lines.items()}

    def config_problems(self, settings: Mapping[str, Any]) -> list[str]:
        server_lr = settings.get("federation.server_lr", 1.0)
        if server_lr == 1.0:
            return []
        return [
            f"federation.server_lr={server_lr} with adapter.kind='roselora': only 1.0 is accepted "
            "(a partial step would leave pruned entries non-zero and break the row/column budget)"
        ]
