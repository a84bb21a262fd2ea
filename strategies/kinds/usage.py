"""``usage`` groups (experts): each client's delta weighted by how much it used that expert."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fed.adapters.base import Structure, UsageParams
from strategies.kinds.base import Replies, Tensors, slot_weights, weighted_mean


def usage_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Experts: each client's delta weighted by how much it used that expert.

    A tensor with one slot (a MoLE expert's factor) is weighted by its routed tokens; a table whose rows
    are experts (MoR's scales) row by row, by each row's soft usage. An expert no client used keeps its
    value (zero delta) rather than averaging noise or drift from clients that never exercised it.
    Without counts (DP) this is the example-weighted mean.
    """
    slots = {n: s for params, rule in structure.of(UsageParams) for n, s in zip(params, rule.slots)}
    tables = {n: r for params, rule in structure.of(UsageParams) for n, r in zip(params, rule.rows)}
    out: Tensors = {}
    for name in names:
        rows = tables.get(name)
        if rows is None:
            out[name] = _slot_mean(replies, [d[name] for d in replies.deltas], slots[name])
        else:
            out[name] = torch.stack(
                [_slot_mean(replies, [d[name][i] for d in replies.deltas], slot) for i, slot in enumerate(rows)]
            )
    return out


def _slot_mean(replies: Replies, deltas: Sequence[torch.Tensor], slot: str) -> torch.Tensor:
    """One expert's deltas averaged with its slot's weights; zero (keep the value) if nobody used it."""
    weights = slot_weights(replies, slot)
    if sum(weights) <= 0:
        return torch.zeros(deltas[0].shape, dtype=torch.float64)
    return weighted_mean([{"t": t} for t in deltas], weights, ["t"])["t"]
