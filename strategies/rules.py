"""Aggregation rules: pure functions over named tensors and per-client weights, no Flower types.

One rule per aggregation kind declared by the adapter protocol, plus what bounds one reply's influence
before any rule sees it: weights capped (example counts are self-reported), delta norms clipped, and
the robust alternatives to the mean (coordinate-wise median and trimmed mean, the statistics of
Flower's FedMedian and FedTrimmedAvg, applied to deltas). Keeping them pure lets tests check them
against dense references and lets benchmarks call them directly. Every rule returns the merged
*delta* of its tensors (what the server adds, times its learning rate, to the global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import trim_mean

from fed.adapters import Aggregation, Structure
from fed.adapters.base import Products
from fed.adapters.families.dynamic_lora import allocate_ranks
from fed.adapters.families.roselora import top_lines
from fed.seeding import generator

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Replies:
    """One round's accepted replies, and the global state they are deltas against."""

    global_: Mapping[str, torch.Tensor]
    deltas: Sequence[Mapping[str, torch.Tensor]]
    weights: Sequence[float]
    """Examples per client: FedAvg's weight."""
    usage: Sequence[Mapping[str, float]] | None = None
    """Per client, tokens routed to each expert slot; None when not sent (under DP, see docs/privacy.md)."""
    seed: int = 0
    """Seeds the server's own randomness (re-factorisation), e.g. derived from run seed and round."""
    masks: Sequence[Mapping[str, torch.Tensor]] | None = None
    """Per client, the kept entries of each line-sparse tensor (RoseLoRA), as decoded from the wire."""


def weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  names: Sequence[str]) -> Tensors:
    """``sum_k w_k delta_k / sum_k w_k`` for each name (FedAvg's example-weighted mean)."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError(f"need at least one client with positive weight; got weights {list(weights)}")
    return {n: sum(w / total * d[n].to(torch.float64) for d, w in zip(deltas, weights)).to(deltas[0][n].dtype)
            for n in names}


def _mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    return weighted_mean(replies.deltas, replies.weights, names)


def _coordinatewise(statistic: Callable[[np.ndarray], np.ndarray], deltas: Sequence[Mapping[str, torch.Tensor]],
                    names: Sequence[str]) -> Tensors:
    """``statistic`` over the client axis of every coordinate (weights ignored: a robust statistic must not
    let a self-reported count buy influence)."""
    return {n: torch.from_numpy(np.asarray(statistic(np.stack([d[n].double().numpy() for d in deltas])),
                                           dtype=np.float64)).to(deltas[0][n].dtype) for n in names}


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


def slot_weights(replies: Replies, slot: str | None) -> Sequence[float]:
    """Each client's weight for an expert slot: its routed tokens if counts were sent, else its examples."""
    if slot is None or replies.usage is None:
        return replies.weights
    return [float(u.get(slot, 0.0)) for u in replies.usage]


def usage_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Experts: each client's delta weighted by how much it used that expert.

    A tensor with one slot (a MoLE expert's factor) is weighted by its routed tokens; a table whose rows
    are experts (MoR's scales) row by row, by each row's soft usage. An expert no client used keeps its
    value (zero delta) rather than averaging noise or drift from clients that never exercised it.
    Without counts (DP) this is the example-weighted mean.
    """
    out: Tensors = {}
    for name in names:
        rows = structure.row_slots.get(name)
        if rows is None:
            out[name] = _slot_mean(replies, [d[name] for d in replies.deltas], structure.slots[name])
        else:
            out[name] = torch.stack([_slot_mean(replies, [d[name][i] for d in replies.deltas], slot)
                                     for i, slot in enumerate(rows)])
    return out


def _slot_mean(replies: Replies, deltas: Sequence[torch.Tensor], slot: str) -> torch.Tensor:
    """One expert's deltas averaged with its slot's weights; zero (keep the value) if nobody used it."""
    weights = slot_weights(replies, slot)
    if sum(weights) <= 0:
        return torch.zeros_like(deltas[0])
    return weighted_mean([{"t": t} for t in deltas], weights, ["t"])["t"]


def random_orthogonal(size: int, seed: int, purpose: str) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    gaussian = torch.randn(size, size, generator=generator(seed, "orthogonal", purpose), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def _mean_product(replies: Replies, chain: Sequence[str]) -> torch.Tensor:
    """The example-weighted mean over clients of the chain's product ``f_1···f_m`` (global + delta), float64."""
    def value(k: int, name: str) -> torch.Tensor:
        return (replies.global_[name] + replies.deltas[k][name]).to(torch.float64)

    total = float(sum(replies.weights))
    return sum(w / total * torch.linalg.multi_dot([value(k, n) for n in chain]) for k, w in enumerate(replies.weights))


def split_pair(mean: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD ``UΣVᵀ`` of ``mean`` as ``B = UΣ/c``, ``A = c·Vᵀ`` (A's rows orthogonal, norm c).

    The split is a gauge (``BA`` is the same for every c); we keep A at the scale ``c`` the round started
    from, so a client's optimiser meets factors of the same size every round, and a component with no
    energy yet (σ = 0, e.g. one that only clients of lower rank could have trained) restarts like a fresh
    LoRA component (A row non-zero, B column 0) instead of dying with a √σ = 0 on both sides. Components
    come out ordered by σ, so a client of rank r_k trains the best rank-r_k part of the global update.
    """
    if rank > min(mean.shape):
        raise ValueError(f"rank {rank} exceeds the layer's smaller dimension {min(mean.shape)}")
    u, s, vh = torch.linalg.svd(mean, full_matrices=False)
    return u[:, :rank] * (s[:rank] / scale), scale * vh[:rank]


def product_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Average the clients' products per layer and re-factorise; mixer chains and LoRA pairs.

    Mixer chains ``outer·mixer[·inner]`` (MoSLoRA), around a fresh mixer: two factors (inner frozen and
    shared): ``outer ← mean(outer_k·mixer_k)·Qᵀ``, ``mixer ← Q``, exact. Three: the mean of
    ``outer_k·mixer_k·inner_k`` is truncated to rank r by SVD ``UΣVᵀ`` and split ``outer ← U√Σ``,
    ``mixer ← Q``, ``inner ← Qᵀ√ΣVᵀ`` (lossy when the mean has rank > r). Q is a seeded random orthogonal
    matrix: a mixer reset to the identity would restart it at plain LoRA. LoRA pairs ``(B, A)``
    (``strategy.aggregation = "product"``): the mean of ``B_k·A_k`` truncated to rank r, split by
    ``split_pair`` with A kept at the global A's rms row norm (lossy when the mean has rank > r).
    """
    wanted = set(names)
    out: Tensors = {}
    for chain in (c for c in structure.chains if set(c) <= wanted):
        mean = _mean_product(replies, chain)
        outer, mixer = chain[0], chain[1]
        rank = replies.global_[mixer].shape[0]
        q = random_orthogonal(rank, replies.seed, mixer)
        if len(chain) == 2:
            new = {outer: mean @ q.T, mixer: q}
        else:
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            root = s[:rank].sqrt()
            new = {outer: u[:, :rank] * root, mixer: q, chain[2]: q.T @ (root[:, None] * vh[:rank])}
        out.update(_as_deltas(new, replies.global_))
    for outer, inner in (p for p in structure.pairs if set(p) <= wanted):
        a = replies.global_[inner].to(torch.float64)
        scale = float(a.norm()) / math.sqrt(a.shape[0]) or 1.0
        b_new, a_new = split_pair(_mean_product(replies, (outer, inner)), a.shape[0], scale)
        out.update(_as_deltas({outer: b_new, inner: a_new}, replies.global_))
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"product-aggregated tensors outside any declared chain or pair: {missing[:3]}")
    return out


def masked_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Line-sparse tensors (RoseLoRA): each entry averaged over the clients that kept it, then each line
    re-projected to the budget.

    A mean of zero-filled tensors would shrink an entry kept by few clients by their weight share and
    take the union of the supports (up to ``min(1, K·keep)`` dense, losing the sparsity bound of BA).
    Here an entry's value is the weighted mean of the kept clients' values (0 where no client kept
    it), and every line then keeps its ``k`` largest magnitudes, ``k`` being what each client kept
    (the round's budget, checked on the wire). Magnitude ranks the entries because the clients' own
    importance scores are not sent.
    """
    if replies.masks is None:
        raise ValueError(f"masked tensors {list(names)[:2]} need the clients' masks; the replies carry none")
    out: Tensors = {}
    for name in names:
        global_ = replies.global_[name].to(torch.float64)
        kept = [m[name].to(torch.float64) for m in replies.masks]
        cover = sum(w * k for w, k in zip(replies.weights, kept))
        total = sum(w * k * (global_ + d[name].to(torch.float64))
                    for w, k, d in zip(replies.weights, kept, replies.deltas))
        mean = torch.where(cover > 0, total / torch.where(cover > 0, cover, 1.0), 0.0)
        axis = structure.lines[name]
        budget = max(int(m[name].sum(axis).max()) for m in replies.masks)
        out[name] = (mean * top_lines(mean.abs(), axis, budget) - global_).to(replies.global_[name].dtype)
    return out


def server_owned(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Tensors only the server sets (Dynamic LoRA's rank masks): clients' deltas are ignored."""
    return {n: torch.zeros_like(replies.global_[n]) for n in names}


def _as_deltas(new: Mapping[str, torch.Tensor], global_: Mapping[str, torch.Tensor]) -> Tensors:
    return {n: (t - global_[n].to(torch.float64)).to(global_[n].dtype) for n, t in new.items()}


Rule = Callable[[Replies, Structure, Sequence[str]], Tensors]
RULES: dict[Aggregation, Rule] = {
    Aggregation.MEAN: _mean,
    Aggregation.USAGE: usage_mean,
    Aggregation.PRODUCT: product_mean,
    Aggregation.MASKED: masked_mean,
    Aggregation.ALLOCATION: server_owned,
}


def aggregate(replies: Replies, structure: Structure, rule: str = "mean", trim: float = 0.2,
              aggregation: str = "mean") -> Tensors:
    """Merge client deltas group by group, each with the rule of its aggregation kind.

    ``rule`` replaces the weighted mean of ``mean``-kind groups with a robust statistic; groups of other
    kinds (experts, mixer products) keep their structural rule. ``aggregation = "product"`` aggregates
    LoRA's declared ``(B, A)`` pairs in product space instead of factor by factor.
    """
    kinds = dict(structure.kinds)
    if aggregation == "product":
        if not structure.pairs:
            raise ValueError("strategy.aggregation='product' needs an adapter that declares (B, A) pairs; "
                             "accepted: adapter.kind='lora'")
        kinds.update({name: Aggregation.PRODUCT for pair in structure.pairs for name in pair})
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


def renormalise(tensors: Mapping[str, torch.Tensor], structure: Structure) -> Tensors:
    """Fix the scale gauge of scale tables (MoR's Ω): each column's mean over experts becomes 1.

    ``Ω[:, j] / c_j`` with ``factor[j, :] · c_j`` leaves every expert's update unchanged, so clients
    that drifted into different scales of the same function start the next round from one gauge.
    Columns whose mean is (near) zero are left alone rather than divided by it.
    """
    out = dict(tensors)
    for scale, factor in structure.gauges.items():
        c = out[scale].mean(0)
        c = torch.where(c.abs() > 1e-6, c, torch.ones_like(c))
        out[scale] = out[scale] / c
        out[factor] = out[factor] * c[:, None]
    return out


def reallocate(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], structure: Structure) -> Tensors:
    """Dynamic LoRA between rounds: move the rank budget towards the layers the round changed most.

    A layer's score is ``‖ΔW‖_F / r``: the change the aggregated update made to its dense update
    ``B·diag(m)·A``, per active slot (so a layer is not rewarded for the rank it already holds). The
    budget (the sum of the masks, constant) is split by ``allocate_ranks``. A shrinking layer keeps
    its slots with the largest ``‖B_j‖·‖A_j‖``; a growing one switches on its free slots in order.
    B's column is kept only for slots that were on this round and stay on: a slot switched on starts
    at zero (the layer's function is unchanged by it), and whatever a DP client's noise put in a slot
    that was off never counts.
    Without any change (every score 0) the allocation stays as it is.
    """
    if not structure.layers:
        return dict(after)
    out = dict(after)
    scores, caps = [], set()
    for mask, b, a in structure.layers:
        m = before[mask].to(torch.float64)
        old = (before[b].to(torch.float64) * m) @ before[a].to(torch.float64)
        new = (after[b].to(torch.float64) * m) @ after[a].to(torch.float64)
        scores.append(float(torch.linalg.norm(new - old)) / max(float(m.sum()), 1.0))
        caps.add(m.numel())
    if not any(scores):
        return out
    total = round(sum(float(before[mask].sum()) for mask, _, _ in structure.layers))
    for (mask, b, a), rank in zip(structure.layers, allocate_ranks(scores, total, min(caps))):
        active = before[mask] > 0
        weight = (torch.linalg.norm(after[b], dim=0) * torch.linalg.norm(after[a], dim=1)).tolist()
        on = sorted(torch.nonzero(active).flatten().tolist(), key=lambda j: -weight[j])  # strongest first
        off = torch.nonzero(~active).flatten().tolist()  # in slot order
        keep = torch.zeros_like(before[mask])
        keep[(on + off)[:rank]] = 1
        out[mask] = keep
        out[b] = after[b] * ((keep > 0) & active)  # a slot that was off this round holds only noise or drift
    return out


def aggregation_error(products: Products, replies: Replies, merged: Mapping[str, torch.Tensor]) -> float:
    """``‖mean_k ΔW_k − ΔW(aggregated)‖_F / ‖mean_k ΔW_k‖_F`` over every adapted layer (and expert).

    ``ΔW_k`` is the change client k made this round to a layer's dense weight update, and ``mean``
    uses the weights the rules use (routed tokens for an expert when counts were sent, else examples);
    ``ΔW(aggregated)`` is the change the merged deltas make at server learning rate 1. Zero up to
    float error where aggregation is exact (FFA-LoRA; MoSLoRA with A frozen). An expert no client
    used is skipped: it has no mean to match. 0 when no client changed anything.
    """
    before = products(replies.global_)
    after = products({n: replies.global_[n] + merged[n] for n in merged})
    clients = [products({n: replies.global_[n] + d[n] for n in d}) for d in replies.deltas]
    err, ref = 0.0, 0.0
    for name, (base, slot) in before.items():
        weights = slot_weights(replies, slot)
        total = float(sum(weights))
        if total <= 0:
            continue
        base64 = base.to(torch.float64)
        target = sum(w / total * (c[name][0].to(torch.float64) - base64) for w, c in zip(weights, clients))
        got = after[name][0].to(torch.float64) - base64
        err += float((target - got).pow(2).sum())
        ref += float(target.pow(2).sum())
    if err == 0.0:
        return 0.0
    return math.sqrt(err / ref) if ref > 0 else math.inf
