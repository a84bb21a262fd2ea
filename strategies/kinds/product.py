"""``product`` groups: the clients' products of factors averaged exactly, then re-factorised."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fed.adapters.base import PairParams, ProductParams, Structure
from fed.seeding import generator
from strategies.kinds.base import Replies, Tensors, _as_deltas


def random_orthogonal(size: int, seed: int, purpose: str) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    gaussian = torch.randn(size, size, generator=generator(seed, "orthogonal", purpose), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def _stepped_product(replies: Replies, chain: Sequence[str]) -> torch.Tensor:
    """The product ``f_1···f_m`` the server step aims at, float64: ``P + s·(mean_k P_k − P)`` with ``P`` the
    global product, ``P_k`` client k's (global + delta), the mean example-weighted and ``s`` the step."""

    def product(delta: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor:
        value = replies.global_[name] if delta is None else replies.global_[name] + delta[name]
        return value.to(torch.float64)

    total = float(sum(replies.weights))
    old = torch.linalg.multi_dot([product(None, n) for n in chain])
    mean = sum(
        w / total * torch.linalg.multi_dot([product(d, n) for n in chain])
        for d, w in zip(replies.deltas, replies.weights)
    )
    return old + replies.step * (mean - old)


def _per_step(new: Mapping[str, torch.Tensor], replies: Replies) -> Tensors:
    """New factor values as the delta ``apply_update`` turns back into them at the step: ``(new − global)/s``."""
    return {n: t / replies.step for n, t in _as_deltas(new, replies.global_).items()}


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


def rms_row_norm(factor: torch.Tensor) -> float:
    """The root-mean-square row norm of an inner factor (1.0 for an all-zero one): the scale a split keeps."""
    return float(factor.to(torch.float64).norm()) / math.sqrt(factor.shape[0]) or 1.0


def pairs_of(structure: Structure) -> list[tuple[str, str]]:
    """Every ``(B, A)`` pair the adapter declares for product aggregation (LoRA's)."""
    return [pair for _, rule in structure.of(PairParams) for pair in rule.pairs]


def product_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Step the clients' mean product per layer and re-factorise; mixer chains and LoRA pairs.

    The target of every chain or pair is ``P + s·(mean_k P_k − P)`` (``_stepped_product``): a server step
    of ``s`` moves the dense update by s times the aggregated change, which scaling the factors' deltas
    by ``s`` would not (it is a polynomial in them). The deltas returned are per unit of step.

    Mixer chains ``outer·mixer[·inner]`` (MoSLoRA), around a fresh mixer: two factors (inner frozen and
    shared): ``outer ← target·Qᵀ``, ``mixer ← Q``, exact. Three: the target is truncated to rank r by SVD
    and split by ``split_pair`` at the inner factor's scale c (``outer ← UΣ/c``, ``inner ← Qᵀ·c·Vᵀ``,
    ``mixer ← Q``), lossy when the target has rank > r. Keeping A at its scale (rather than ``√Σ`` on
    both sides) lets a client's optimiser meet factors of the same size every round and keeps a live A
    row for a component with σ = 0. Q is a seeded random orthogonal matrix: a mixer reset to the
    identity would restart it at plain LoRA. LoRA pairs ``(B, A)`` (``strategy.aggregation = "product"``):
    the target truncated to rank r, split by ``split_pair`` at A's scale (lossy when its rank is > r).
    """
    wanted = set(names)
    out: Tensors = {}
    chains = [c for _, rule in structure.of(ProductParams) for c in rule.chains]
    for chain in (c for c in chains if set(c) <= wanted):
        target = _stepped_product(replies, chain)
        outer, mixer = chain[0], chain[1]
        rank = replies.global_[mixer].shape[0]
        q = random_orthogonal(rank, replies.seed, mixer)
        if len(chain) == 2:
            new = {outer: target @ q.T, mixer: q}
        else:
            b_new, a_new = split_pair(target, rank, rms_row_norm(replies.global_[chain[2]]))
            new = {outer: b_new, mixer: q, chain[2]: q.T @ a_new}
        out.update(_per_step(new, replies))
    for outer, inner in (p for p in pairs_of(structure) if set(p) <= wanted):
        a = replies.global_[inner]
        b_new, a_new = split_pair(_stepped_product(replies, (outer, inner)), a.shape[0], rms_row_norm(a))
        out.update(_per_step({outer: b_new, inner: a_new}, replies))
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"product-aggregated tensors outside any declared chain or pair: {missing[:3]}")
    return out
