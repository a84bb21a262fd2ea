"""Bounded influence: what limits one reply's pull on the global adapter before any rule sees it.

Example counts are self-reported, so weights are capped; a delta's norm is clipped to a fixed, automatic or
adaptive bound."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from strategies.kinds.base import Tensors

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


def clip_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], bound: float) -> tuple[list[Tensors], int]:
    """Scale every delta whose norm exceeds ``bound`` down to it (direction kept); returns how many were."""
    clipped, count = [], 0
    for delta in deltas:
        norm = delta_norm(delta)
        scale = bound / norm if norm > bound else 1.0
        count += scale < 1.0
        clipped.append({n: t * scale for n, t in delta.items()})
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
