"""``masked`` groups (line-sparse factors): each entry averaged over the clients that kept it, then re-projected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fed.adapters.base import Structure, top_lines
from strategies.kinds.base import Replies, Tensors, total_of


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
        cover = total_of(w * k for w, k in zip(replies.weights, kept))
        total = total_of(
            w * k * (global_ + d[name].to(torch.float64)) for w, k, d in zip(replies.weights, kept, replies.deltas)
        )
        mean = torch.where(cover > 0, total / torch.where(cover > 0, cover, 1.0), 0.0)
        axis = structure.lines[name]
        budget = max(int(m[name].sum(axis).max()) for m in replies.masks)
        out[name] = (mean * top_lines(mean.abs(), axis, budget) - global_).to(replies.global_[name].dtype)
    return out
