"""Dynamic LoRA (Liao et al., arXiv 2501.14859): layer-importance rank allocation and an input gate.

The paper gives two mechanisms, at abstract level only: reallocating adapter capacity across layers
by their importance, and adapting to the input. Our federated formulation (docs/architecture.md):

    h = W0 x + s · g(x) · B · diag(m) · A x,     g(x) = 1 + tanh(wᵀx)   (per token)

- ``A`` (r_max × d_in) and ``B`` (d_out × r_max) have a fixed maximum rank ``r_max = 2·rank``, so tensor
  shapes never change; the rank mask ``m`` (a 0/1 vector, ``rank_mask``) switches slots on and off.
  Every layer starts with ``rank`` slots on; the total ``rank × layers`` is the budget.
- The mask is **server-owned**: the server scores each layer by the change the round's aggregated
  update made to its dense update, per active slot, smooths the score over rounds (an EMA), and
  between rounds moves single slots from the weakest layer to the strongest, only after a warm-up and
  only where the gain clears a margin (``Smoothing``; applied by ``DynamicLora.after_aggregate``). One
  round's score is noisy (under DP, very), and reallocating from it alone switched live slots off for
  nothing. The smoothing state lives on the server's layers (plain attributes, not tensors: nothing
  changes on the wire or in the export; a resumed run restarts the warm-up). Clients read the mask and
  never train it. The scores are computed from aggregated deltas only (under DP: post-processing), so
  nothing a client computes from its activations leaves it except through the DP-SGD update.
- Switched-off slots neither train nor travel: the forward masks them (zero gradient, per-sample ones
  included), and after every optimizer step the layer puts their A rows and B columns back to the
  round's start (``after_step``), undoing weight decay and, under DP, the noise Opacus adds to every
  coordinate (post-processing with a public mask), so their delta is exactly zero.
- The gate ``w`` is an ``nn.Linear(d_in, 1)`` trained on the client like A and B (zero init: g = 1,
  plain LoRA at the start) and averaged by the server; under DP it is clipped and noised with them.
- The per-layer weighting is the rank allocation itself (``s = alpha / rank`` is fixed), so no extra
  trainable scale (which would need its own grad sampler) is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fed.adapters.base import (
    Adapter,
    AdapterFamily,
    AdapterSpec,
    Aggregation,
    Clock,
    Product,
    TensorGroup,
    replace_linears,
)
from fed.adapters.registry import register_family
from fed.seeding import generator


@dataclass(frozen=True)
class Smoothing:
    """How the server turns per-round layer scores into reallocations."""

    beta: float = 0.7
    """EMA weight of the previous score (0: each round's score alone)."""
    warmup: int = 2
    """Rounds scored before the first reallocation (0: from the first round)."""
    margin: float = 0.25
    """Hysteresis: a slot moves only if the receiving layer's next-slot score beats the giving layer's
    last-slot score by this factor (0: whenever it is larger)."""


SMOOTHING = Smoothing()


def max_rank(rank: int) -> int:
    """The fixed slot count per layer: a layer may grow to twice the mean rank."""
    return 2 * rank


class DynamicLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-masked LoRA update scaled by a per-token input gate."""

    def __init__(self, base: nn.Linear, spec: AdapterSpec, gen: torch.Generator) -> None:
        super().__init__()
        dtype, slots = base.weight.dtype, max_rank(spec.rank)
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, slots, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(slots, base.out_features, bias=False, dtype=dtype)
        self.gate = nn.Linear(base.in_features, 1, bias=False, dtype=dtype)
        mask = torch.cat([torch.ones(spec.rank, dtype=dtype), torch.zeros(slots - spec.rank, dtype=dtype)])
        self.rank_mask = nn.Parameter(mask, requires_grad=False)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=gen)
            self.lora_B.weight.zero_()
            self.gate.weight.zero_()
        self._off: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """The round's switched-off slots and their A rows and B columns at the round's start (clients)."""
        self.score: float | None = None
        """The server's smoothed score of this layer (``Smoothing``); None before the first scored round."""
        self.scored = 0
        """Rounds the server has scored this layer."""

    def begin_round(self, clock: Clock) -> None:
        """Remember the switched-off slots' values: ``after_step`` keeps them there all round."""
        off = self.rank_mask.detach() == 0
        self._off = (off, self.lora_A.weight.detach()[off].clone(), self.lora_B.weight.detach()[:, off].clone())

    def before_step(self) -> None:
        """Nothing to read: the forward already gives switched-off slots a zero gradient."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the switched-off slots back (weight decay and DP noise moved them), so their delta is 0."""
        if self._off is None:
            raise RuntimeError("a Dynamic LoRA layer stepped outside a round: call Adapter.begin_round(clock) first")
        off, a_rows, b_columns = self._off
        self.lora_A.weight[off] = a_rows
        self.lora_B.weight[:, off] = b_columns

    def masks(self) -> dict[str, torch.Tensor]:
        """No line-sparse tensors: the rank mask travels as a dense, server-owned tensor."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dropout(x)
        gate = 1 + torch.tanh(self.gate(u))
        return self.base_layer(x) + self.scaling * gate * self.lora_B(self.lora_A(u) * self.rank_mask)

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        """``s·B·diag(m)·A``: the update at gate 1 (the gate scales it per token, ``1 + tanh`` in (0, 2))."""
        return {"": (self.scaling * (get("lora_B.weight") * get("rank_mask")) @ get("lora_A.weight"), None)}


def next_ranks(scores: Sequence[float], ranks: Sequence[int], cap: int, margin: float) -> list[int]:
    """Move single slots from the layer with the weakest last slot to the one with the strongest next slot.

    A layer's last-slot score is ``score / slots``, its next-slot score ``score / (slots + 1)`` (the
    highest-averages quotients); a slot moves while the best next-slot score beats the worst last-slot
    score by the factor ``1 + margin``, each layer staying in ``[1, cap]``. With ``margin = 0`` this
    converges to the highest-averages (D'Hondt) allocation; a margin leaves an allocation alone unless the
    scores have clearly moved. The total is unchanged.
    """
    out = list(ranks)
    for _ in range(sum(out)):
        grow = [i for i in range(len(out)) if out[i] < cap]
        shrink = [i for i in range(len(out)) if out[i] > 1]
        if not grow or not shrink:
            break
        up = max(grow, key=lambda i: (scores[i] / (out[i] + 1), -i))
        down = min(shrink, key=lambda i: (scores[i] / out[i], i))
        if up == down or scores[up] / (out[up] + 1) <= (1 + margin) * scores[down] / out[down]:
            break
        out[down] -= 1
        out[up] += 1
    return out


Layer = tuple[str, str, str]
"""A rank-masked layer's ``(mask, B, A)`` parameter names."""


def layer_scores(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], layers: Sequence[Layer]
) -> list[float]:
    """Each layer's ``‖ΔW‖_F / r``: the change the round made to its dense update ``B·diag(m)·A``, per active
    slot (so a layer is not rewarded for the rank it already holds)."""
    scores = []
    for mask, b, a in layers:
        m = before[mask].to(torch.float64)
        old = (before[b].to(torch.float64) * m) @ before[a].to(torch.float64)
        new = (after[b].to(torch.float64) * m) @ after[a].to(torch.float64)
        scores.append(float(torch.linalg.norm(new - old)) / max(float(m.sum()), 1.0))
    return scores


def reallocate(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    layers: Sequence[Layer],
    scores: Sequence[float] | None,
    margin: float = SMOOTHING.margin,
) -> dict[str, torch.Tensor]:
    """Between rounds: move the rank budget towards the layers with the highest ``scores`` (``next_ranks``).

    The budget (the sum of the masks) is constant. A shrinking layer keeps its slots with the largest
    ``‖B_j‖·‖A_j‖``; a growing one switches on its free slots in order. B's column is kept only for
    slots that were on this round and stay on: a slot switched on starts at zero (the layer's function
    is unchanged by it). ``scores`` None (warm-up) or all 0: the allocation stays as it is.
    """
    out = dict(after)
    if not layers or scores is None or not any(scores):
        return out
    current = [round(float(before[mask].sum())) for mask, _, _ in layers]
    ranks = next_ranks(scores, current, min(before[mask].numel() for mask, _, _ in layers), margin)
    for (mask, b, a), rank in zip(layers, ranks):
        active = before[mask] > 0
        weight = (torch.linalg.norm(after[b], dim=0) * torch.linalg.norm(after[a], dim=1)).tolist()
        on = sorted(torch.nonzero(active).flatten().tolist(), key=lambda j: -weight[j])  # strongest first
        off = torch.nonzero(~active).flatten().tolist()  # in slot order
        keep = torch.zeros_like(before[mask])
        keep[(on + off)[:rank]] = 1
        out[mask] = keep
        out[b] = after[b] * ((keep > 0) & active)
    return out


class Smoothed(Protocol):
    """A layer's server-side smoothing state (``DynamicLinear`` keeps it as plain attributes)."""

    score: float | None
    scored: int


def smoothed_scores(layers: Sequence[Smoothed], raw: Sequence[float], smoothing: Smoothing) -> list[float] | None:
    """Fold a round's raw scores into each layer's EMA; the smoothed scores once every layer is past the
    warm-up, else None. A round that changed nothing (every raw score 0) is not scored."""
    if any(raw):
        for layer, score in zip(layers, raw):
            layer.score = score if layer.score is None else smoothing.beta * layer.score + (1 - smoothing.beta) * score
            layer.scored += 1
    if any(layer.score is None or layer.scored <= smoothing.warmup for layer in layers):
        return None
    return [layer.score or 0.0 for layer in layers]


def _layer(model: nn.Module, path: str) -> DynamicLinear:
    module = model.get_submodule(path)
    if not isinstance(module, DynamicLinear):
        raise TypeError(f"{path} is a {type(module).__name__}, not the DynamicLinear its rank mask belongs to")
    return module


@register_family
class DynamicLora(AdapterFamily):
    kind = "dynamic-lora"
    peft_compatible = False  # the input gate has no PEFT form; exported in the fedlora format

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = replace_linears(
            model, spec.targets, lambda path, linear: DynamicLinear(linear, spec, generator(seed, "lora_A", path))
        )

        def names(part: str) -> tuple[str, ...]:
            return tuple(f"{p}.{part}" for p in paths)

        masks, b, a = names("rank_mask"), names("lora_B.weight"), names("lora_A.weight")
        return (
            TensorGroup("lora_A", a, trainable=True, sent=True),
            TensorGroup("lora_B", b, trainable=True, sent=True),
            TensorGroup("gate", names("gate.weight"), trainable=True, sent=True),
            TensorGroup("rank_mask", masks, trainable=False, sent=True, aggregation=Aggregation.ALLOCATION),
        )

    def after_aggregate(
        self, adapter: Adapter, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Reallocate the rank budget across layers by the smoothed change the rounds' aggregates made."""
        parts = (adapter.group(name).params for name in ("rank_mask", "lora_B", "lora_A"))
        layers: list[Layer] = list(zip(*parts))
        modules = [_layer(adapter.model, mask.removesuffix(".rank_mask")) for mask, _, _ in layers]
        scores = smoothed_scores(modules, layer_scores(before, after, layers), SMOOTHING)
        return reallocate(before, after, layers, scores)
