"""One rule per aggregation kind (a module each), and ``aggregate``: every sent tensor merged by its kind's rule."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fed.adapters.base import Aggregation, Products, Structure
from strategies.kinds.allocation import server_owned
from strategies.kinds.base import Replies, Rule, Tensors, apply_update, slot_weights, weighted_mean
from strategies.kinds.masked import masked_mean
from strategies.kinds.mean import _mean, robust_mean
from strategies.kinds.product import pairs_of, product_mean
from strategies.kinds.usage import usage_mean

RULES: dict[Aggregation, Rule] = {
    Aggregation.MEAN: _mean,
    Aggregation.USAGE: usage_mean,
    Aggregation.PRODUCT: product_mean,
    Aggregation.MASKED: masked_mean,
    Aggregation.ALLOCATION: server_owned,
}


def aggregate(
    replies: Replies, structure: Structure, rule: str = "mean", trim: float = 0.2, aggregation: str = "mean"
) -> Tensors:
    """Merge client deltas group by group, each with the rule of its aggregation kind.

    ``rule`` replaces the weighted mean of ``mean``-kind groups with a robust statistic; groups of other
    kinds (experts, mixer products) keep their structural rule. ``aggregation = "product"`` aggregates
    LoRA's declared ``(B, A)`` pairs in product space instead of factor by factor.
    """
    kinds = dict(structure.kinds)
    if aggregation == "product":
        if not pairs_of(structure):
            raise ValueError(
                "strategy.aggregation='product' needs an adapter that declares (B, A) pairs; "
                "accepted: adapter.kind='lora'"
            )
        kinds.update({name: Aggregation.PRODUCT for pair in pairs_of(structure) for name in pair})
    elif aggregation != "mean":
        raise ValueError(f"unknown strategy.aggregation {aggregation!r}; accepted: mean, product")
    by_kind: dict[Aggregation, list[str]] = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    rules = {**RULES, Aggregation.MEAN: robust_mean(rule, trim)}
    merged: Tensors = {}
    for kind, names in by_kind.items():
        if kind not in rules:
            raise ValueError(f"no aggregation rule for kind {kind.value!r}; rules: {[k.value for k in rules]}")
        merged.update(rules[kind](replies, structure, names))
    # rules compute in float64 from deltas kept in their transport dtype; the global keeps its own
    return {n: t.to(replies.global_[n].dtype) for n, t in merged.items()}


def aggregation_error(products: Products, replies: Replies, merged: Mapping[str, torch.Tensor]) -> float:
    """``‖mean_k ΔW_k − ΔW(aggregated)‖_F / ‖mean_k ΔW_k‖_F`` over every adapted layer (and expert).

    ``ΔW_k`` is the change client k made this round to a layer's dense weight update, and ``mean``
    uses the weights the rules use (routed tokens for an expert when counts were sent, else examples);
    ``ΔW(aggregated)`` is the change the merged deltas make at the server step ``s`` (``replies.step``),
    compared with ``s·mean_k ΔW_k``. Zero up to float error where aggregation is exact (FFA-LoRA;
    MoSLoRA with A frozen), at every step. An expert no client
    used is skipped: it has no mean to match. 0 when no client changed anything.
    """
    before = products(replies.global_)
    after = products(apply_update({n: replies.global_[n] for n in merged}, merged, replies.step))
    err, ref = 0.0, 0.0
    for name, target in _mean_changes(products, replies, before).items():
        base64 = before[name][0].to(torch.float64)
        target = replies.step * target
        got = after[name][0].to(torch.float64) - base64
        err += float((target - got).pow(2).sum())
        ref += float(target.pow(2).sum())
    if err == 0.0:
        return 0.0
    return math.sqrt(err / ref) if ref > 0 else math.inf


def _mean_changes(
    products: Products, replies: Replies, before: Mapping[str, tuple[torch.Tensor, str | None]]
) -> dict[str, torch.Tensor]:
    """Per layer (and expert) that some client's weight reaches, ``mean_k ΔW_k`` in float64.

    Client by client: each client's dense products (a layer's full ``d_out x d_in`` each, many times its
    reply) are added to the running sums and dropped before the next client's are formed."""
    weights = {name: slot_weights(replies, slot) for name, (_, slot) in before.items()}
    totals = {name: float(sum(w)) for name, w in weights.items()}
    sums: dict[str, torch.Tensor] = {}
    for k, delta in enumerate(replies.deltas):
        client = products({n: replies.global_[n] + delta[n] for n in delta})
        for name, (base, _) in before.items():
            if totals[name] <= 0:
                continue
            term = weights[name][k] / totals[name] * (client[name][0].to(torch.float64) - base.to(torch.float64))
            sums[name] = term if name not in sums else sums[name].add_(term)
    return sums


__all__ = [
    "RULES",
    "Replies",
    "Rule",
    "Tensors",
    "aggregate",
    "aggregation_error",
    "apply_update",
    "robust_mean",
    "slot_weights",
    "weighted_mean",
]
