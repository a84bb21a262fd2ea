"""Aggregation rules: pure functions over named tensors and per-client weights, no Flower types.

One rule per aggregation kind declared by the adapter protocol. Keeping them pure lets tests check
them against dense references and lets benchmarks call them directly.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

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


RULES: dict[Aggregation, Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float], Sequence[str]], Tensors]] = {
    Aggregation.MEAN: weighted_mean,
}


def aggregate(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
              kinds: Mapping[str, Aggregation]) -> Tensors:
    """Merge client deltas group by group, each with the rule of its aggregation kind."""
    by_kind: dict[Aggregation, list[str]] = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    merged: Tensors = {}
    for kind, names in by_kind.items():
        if kind not in RULES:
            raise ValueError(f"no aggregation rule for kind {kind.value!r}; rules: {[k.value for k in RULES]}")
        merged.update(RULES[kind](deltas, weights, names))
    return merged


def apply_update(global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], server_lr: float) -> Tensors:
    """The server step ``global + server_lr * delta`` (server_lr = 1 is plain FedAvg)."""
    return {n: global_[n] + server_lr * delta[n] for n in global_}
