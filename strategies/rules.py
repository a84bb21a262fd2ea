"""Aggregation rules: pure functions over named tensors and per-client weights, no Flower types.

One rule per aggregation kind declared by the adapter protocol, plus what bounds one reply's influence
before any rule sees it: weights capped (example counts are self-reported), delta norms clipped, and
the robust alternatives to the mean (coordinate-wise median and trimmed mean, the statistics of
Flower's FedMedian and FedTrimmedAvg, applied to deltas). Keeping them pure lets tests check them
against dense references and lets benchmarks call them directly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import trim_mean

from fed.adapters import Aggregation

Tensors = dict[str, torch.Tensor]


def weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  names: Sequence[str]) -> Tensors:
    """``sum_k w_k delta_k / sum_k w_k`` for each name (FedAvg's example-weighted mean)."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError(f"need at least one client with positive weight; got weights {list(weights)}")
    return {n: sum(w / total * d[n].to(torch.float64) for d, w in zip(deltas, weights)).to(deltas[0][n].dtype)
            for n in names}


def _coordinatewise(statistic: Callable[[np.ndarray], np.ndarray], deltas: Sequence[Mapping[str, torch.Tensor]],
                    names: Sequence[str]) -> Tensors:
    """``statistic`` over the client axis of every coordinate (weights ignored: a robust statistic must not
    let a self-reported count buy influence)."""
    return {n: torch.from_numpy(np.asarray(statistic(np.stack([d[n].double().numpy() for d in deltas])),
                                           dtype=np.float64)).to(deltas[0][n].dtype) for n in names}


def coordinate_median(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                      names: Sequence[str]) -> Tensors:
    """Coordinate-wise median of the deltas (FedMedian's statistic; mean of the two middle values for an
    even count)."""
    return _coordinatewise(partial(np.median, axis=0), deltas, names)


def trimmed_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str],
                 fraction: float = 0.2) -> Tensors:
    """Coordinate-wise mean after cutting ``fraction`` of the replies at each end (FedTrimmedAvg's statistic)."""
    return _coordinatewise(partial(trim_mean, proportiontocut=fraction, axis=0), deltas, names)


Rule = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float], Sequence[str]], Tensors]
RULES: dict[Aggregation, Rule] = {
    Aggregation.MEAN: weighted_mean,
}
ROBUST: dict[str, Callable[[float], Rule]] = {
    "mean": lambda trim: weighted_mean,
    "median": lambda trim: coordinate_median,
    "trimmed-mean": lambda trim: partial(trimmed_mean, fraction=trim),
}
"""Statistics that may stand in for the example-weighted mean of ``mean``-kind groups (``strategy.rule``)."""


def aggregate(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
              kinds: Mapping[str, Aggregation], rule: str = "mean", trim: float = 0.2) -> Tensors:
    """Merge client deltas group by group, each with the rule of its aggregation kind.

    ``rule`` replaces the weighted mean of ``mean``-kind groups with a robust statistic; groups of
    other kinds (experts, masks, products) keep their structural rule.
    """
    by_kind: dict[Aggregation, list[str]] = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    rules = {**RULES, Aggregation.MEAN: ROBUST[rule](trim)}
    merged: Tensors = {}
    for kind, names in by_kind.items():
        if kind not in rules:
            raise ValueError(f"no aggregation rule for kind {kind.value!r}; rules: {[k.value for k in rules]}")
        merged.update(rules[kind](deltas, weights, names))
    return merged


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


def apply_update(global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], server_lr: float) -> Tensors:
    """The server step ``global + server_lr * delta`` (server_lr = 1 is plain FedAvg)."""
    return {n: global_[n] + server_lr * delta[n] for n in global_}
