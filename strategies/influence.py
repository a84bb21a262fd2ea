"""Bounded influence as stages: no single reply may buy the average, however large its claims or its delta.

Both act on the accepted batch before any rule sees it, so the robust rules and the structural ones
(experts, products) combine bounded replies too.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping, Sequence

from strategies.pipeline import RoundState, Stage
from strategies.rules import Replies, adaptive_bound, bounded_weights, clip_deltas, delta_norm

CLIPS = ("fixed", "auto", "adaptive")


class CappedWeights(Stage):
    """Self-reported weights capped: example counts, and each client's total of expert token counts.

    ``capped`` limits each to ``max_ratio`` x the round's median, ``uniform`` weighs replies alike
    (``strategies.rules.bounded_weights``)."""

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
        return [{slot: n * (cap / total if total > 0 else 1.0) for slot, n in u.items()}
                for u, total, cap in zip(usage, totals, caps)], capped


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
