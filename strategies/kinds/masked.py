"""``masked`` groups (line-sparse factors): each entry averaged over the clients that kept it, then re-projected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fed.adapters.base import Structure
from strategies.kinds.base import Replies, Tensors, total_of


def masked_mean(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Line-sparse tensors (RoseLoRA): each entry averaged over the clients that kept it, then each line
    re-projected to the budget.

    A mean of zero-filled tensors would shrink an entry kept by few clients by their weight share and
    take the union of the supports (up to ``min(1, K·keep)`` dense, losing the sparsity bound of BA).
    Here an entry's value is the weighted mean of the kept clients' values (0 where no client kept
    it), and every line then keeps its ``k`` entries (``k`` what each client kept: the round's budget,
    checked on the wire) ranked by the clients' weighted votes first: each client kept an entry because
    its smoothed sensitivity ``|w·∇w|`` (the paper's score) ranked it in its top k, so the share of the
    weight that kept an entry is the aggregated importance the server has without the scores
    travelling. Ties (entries kept by the same clients) break by magnitude.
    """
    if replies.masks is None:
        raise ValueError(f"masked tensors {list(names)[:2]} need the clients' masks; the replies carry none")
    out: Tensors = {}
    for name in names:
        global_ = replies.global_[name].to(torch.float64)
        cover = total_of(w * m[name].to(torch.float64) for w, m in zip(replies.weights, replies.masks))
        total = total_of(
            w * m[name].to(torch.float64) * (global_ + d[name].to(torch.float64))
            for w, m, d in zip(replies.weights, replies.masks, replies.deltas)
        )
        mean = torch.where(cover > 0, total / torch.where(cover > 0, cover, 1.0), 0.0)
        axis = structure.lines[name]
        budget = max(int(m[name].sum(axis).max()) for m in replies.masks)
        out[name] = (mean * _top_by(cover, mean.abs(), axis, budget) - global_).to(replies.global_[name].dtype)
    return out


def _top_by(primary: torch.Tensor, secondary: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` first entries of every line along ``axis`` ordered by ``primary`` then
    ``secondary`` (both descending): two stable sorts, so the order is exact, with no mixed-scale key."""
    by_secondary = torch.sort(secondary, dim=axis, descending=True, stable=True).indices
    by_primary = torch.sort(primary.gather(axis, by_secondary), dim=axis, descending=True, stable=True).indices
    chosen = by_secondary.gather(axis, by_primary).narrow(axis, 0, k)
    return torch.zeros(primary.shape, dtype=torch.bool, device=primary.device).scatter_(axis, chosen, True)
