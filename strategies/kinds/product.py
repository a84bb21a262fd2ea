"""``product`` groups: the clients' products of factors averaged exactly, then re-factorised."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fed.adapters.base import PairParams, ProductParams, Structure
from fed.seeding import generator
from strategies.kinds.base import Replies, Tensors, _as_deltas


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


def pairs_of(structure: Structure) -> list[tuple[str, str]]:
    """Every ``(B, A)`` pair the adapter declares for product aggregation (LoRA's)."""
    return [pair for _, rule in structure.of(PairParams) for pair in rule.pairs]


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
    chains = [c for _, rule in structure.of(ProductParams) for c in rule.chains]
    for chain in (c for c in chains if set(c) <= wanted):
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
    for outer, inner in (p for p in pairs_of(structure) if set(p) <= wanted):
        a = replies.global_[inner].to(torch.float64)
        scale = float(a.norm()) / math.sqrt(a.shape[0]) or 1.0
        b_new, a_new = split_pair(_mean_product(replies, (outer, inner)), a.shape[0], scale)
        out.update(_as_deltas({outer: b_new, inner: a_new}, replies.global_))
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"product-aggregated tensors outside any declared chain or pair: {missing[:3]}")
    return out
