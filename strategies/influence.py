"""Bounded influence as stages: no single reply may buy the average, however large its claims or its delta.

Both act on the accepted batch before any rule sees it, so the robust rules and the structural ones
(experts, products) combine bounded replies too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from strategies.kinds import Replies
from strategies.pipeline import RoundState, Stage


def bounded_weights(examples: Sequence[float], weighting: str, max_ratio: float) -> tuple[list[float], int]:
    """Each reply's weight, and how many were capped.

    Example counts are self-reported (and under DP public but unverified), so a client claiming 10^12
    examples must not buy the whole average: ``capped`` limits every count to ``max_ratio`` times the
    median count of the round; ``uniform`` ignores the counts; ``examples`` trusts them.
    """
    if weighting == "uniform":
        return [1.0] * len(examples), 0
    if weighting == "examples":
        return list(examples), 0
    cap = max_ratio * float(np.median(examples))
    return [min(n, cap) for n in examples], sum(n > cap for n in examples)


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of one reply's whole update (all its tensors together), in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


class Scaled(Mapping[str, torch.Tensor]):
    """A delta times ``scale``, each tensor formed when it is read (at least in float32, as the rules read
    it) and dropped once it is folded: a clipped round holds no second copy of its replies."""

    def __init__(self, delta: Mapping[str, torch.Tensor], scale: float) -> None:
        self.delta, self.scale = delta, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.delta[name]
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * self.scale

    def __iter__(self) -> Iterator[str]:
        return iter(self.delta)

    def __len__(self) -> int:
        return len(self.delta)


def clip_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]], bound: float
) -> tuple[list[Mapping[str, torch.Tensor]], int]:
    """Scale every delta whose norm exceeds ``bound`` down to it (direction kept, ``Scaled``: no copy);
    returns how many were."""
    clipped: list[Mapping[str, torch.Tensor]] = []
    count = 0
    for delta in deltas:
        norm = delta_norm(delta)
        count += norm > bound
        clipped.append(Scaled(delta, bound / norm) if norm > bound else delta)
    return clipped, count


def honest_step_bound(lr: float, steps: int, num_params: int) -> float:
    """The norm of the largest update an honest AdamW client can make in ``steps`` steps.

    Adam moves each coordinate by about ``lr`` per step at most (|m_hat / sqrt(v_hat)| <= 1 for a
    steady gradient), so ``lr * steps * sqrt(num_params)``: loose for honest clients, but it stops a
    reply of 1e30 cold without knowing anything about the data.
    """
    return lr * steps * math.sqrt(num_params)


def adaptive_bound(norms: Sequence[float], multiplier: float, ceiling: float) -> float:
    """``multiplier`` x the median norm of the round (robust while fewer than half the replies are
    hostile), never above ``ceiling``."""
    return min(ceiling, multiplier * float(np.median(norms)))


CLIPS = ("fixed", "auto", "adaptive")


class CappedWeights(Stage):
    """Self-reported weights capped: example counts, and each client's total of expert token counts.

    ``capped`` limits each to ``max_ratio`` x the round's median, ``uniform`` weighs replies alike
    (``bounded_weights``)."""

    def __init__(self, weighting: str, max_ratio: float) -> None:
        self.weighting, self.max_ratio = weighting, max_ratio

    def bound(self, state: RoundState, batch: Replies) -> Replies:
        weights, capped = bounded_weights(batch.weights, self.weighting, self.max_ratio)
        usage, capped_usage = (None, 0) if batch.usage is None else self._usage(batch.usage)
        state.log.capped = capped + capped_usage
        return replace(batch, weights=weights, usage=usage)

    def _usage(self, usage: Sequence[Mapping[str, float]]) -> tuple[list[dict[str, float]], int]:
        """Each client's counts scaled so their total is within the cap (its mix over experts kept)."""
        totals = [sum(u.values()) for u in usage]
        caps, capped = bounded_weights(totals, self.weighting, self.max_ratio)
        return [
            {slot: n * (cap / total if total > 0 else 1.0) for slot, n in u.items()}
            for u, total, cap in zip(usage, totals, caps)
        ], capped


class NormClip(Stage):
    """Each reply's delta scaled down to the round's norm bound: ``fixed`` (``max_norm``), ``auto`` (the
    largest step an honest client can take, ``ceiling``) or ``adaptive`` (``multiplier`` x the round's
    median norm, never above ``ceiling``)."""

    def __init__(self, clip: str, max_norm: float, multiplier: float, ceiling: float) -> None:
        if clip not in CLIPS:
            raise ValueError(f"clip={clip!r} is not one of: {', '.join(CLIPS)} (off: leave out the NormClip stage)")
        self.clip, self.max_norm, self.multiplier, self.ceiling = clip, max_norm, multiplier, ceiling

    def bound(self, state: RoundState, batch: Replies) -> Replies:
        bound = self._bound(batch)
        if not math.isfinite(bound):
            return batch
        deltas, state.log.clipped = clip_deltas(batch.deltas, bound)
        state.log.norm_bound = bound
        return replace(batch, deltas=deltas)

    def _bound(self, batch: Replies) -> float:
        if self.clip == "fixed":
            return self.max_norm
        if self.clip == "auto":
            return self.ceiling
        return adaptive_bound([delta_norm(d) for d in batch.deltas], self.multiplier, self.ceiling)
