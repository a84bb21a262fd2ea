"""``mean`` groups: FedAvg's example-weighted mean, or a robust coordinate-wise statistic under ``strategy.rule``
(the statistics of Flower's FedMedian and FedTrimmedAvg, applied to deltas)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import torch
from scipy.stats import trim_mean

from fed.adapters.base import Structure
from strategies.kinds.base import Replies, Rule, Tensors, weighted_mean


def _mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    return weighted_mean(replies.deltas, replies.weights, names)


def _coordinatewise(
    statistic: Callable[[np.ndarray], np.ndarray], deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> Tensors:
    """``statistic`` over the client axis of every coordinate, in float64 (weights ignored: a robust statistic
    must not let a self-reported count buy influence). Unlike the weighted sums, it needs every reply's
    value of a coordinate at once: the one rule that holds a copy of the whole round (one tensor at a time)."""
    return {
        n: torch.from_numpy(np.asarray(statistic(np.stack([d[n].double().numpy() for d in deltas])), dtype=np.float64))
        for n in names
    }


def coordinate_median(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> Tensors:
    """Coordinate-wise median of the deltas (FedMedian's statistic; mean of the two middle values for an
    even count)."""
    return _coordinatewise(partial(np.median, axis=0), deltas, names)


def trimmed_mean(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], fraction: float = 0.2) -> Tensors:
    """Coordinate-wise mean after cutting ``fraction`` of the replies at each end (FedTrimmedAvg's statistic)."""
    return _coordinatewise(partial(trim_mean, proportiontocut=fraction, axis=0), deltas, names)


def robust_mean(rule: str, trim: float) -> Rule:
    """The rule of ``mean``-kind groups under ``strategy.rule``: the weighted mean, or a robust statistic."""
    if rule == "mean":
        return _mean
    if rule == "median":
        return lambda replies, structure, names: coordinate_median(replies.deltas, names)
    if rule == "trimmed-mean":
        return lambda replies, structure, names: trimmed_mean(replies.deltas, names, trim)
    raise ValueError(f"unknown strategy.rule {rule!r}; accepted: mean, median, trimmed-mean")
