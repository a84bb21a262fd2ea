"""What every aggregation kind's rule shares: the round's replies, the weighted mean, expert weights.

Every rule returns the merged *delta* of its tensors (what the server adds, times its learning rate, to the
global state); rules are pure functions over named tensors and weights, with no Flower types.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fed.adapters.base import Structure

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
    step: float = 1.0
    """The server learning rate the merged deltas are applied at (``apply_update``). Rules linear in the
    deltas ignore it; product rules need it, because a step of s on factors is not a step of s on their
    product: they re-factorise the stepped product and return the factor change per unit of step."""


def total_of(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more tensors (``sum()`` would start from the integer 0)."""
    return functools.reduce(torch.add, terms)


def weighted_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str]
) -> Tensors:
    """``sum_k w_k delta_k / sum_k w_k`` for each name (FedAvg's example-weighted mean), in float64.

    One reply's term at a time is added to the running sum, so the mean holds no per-reply copy."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError(f"need at least one client with positive weight; got weights {list(weights)}")
    return {n: total_of(w / total * d[n].to(torch.float64) for d, w in zip(deltas, weights)) for n in names}


def slot_weights(replies: Replies, slot: str | None) -> Sequence[float]:
    """Each client's weight for an expert slot: its routed tokens if counts were sent, else its examples."""
    if slot is None or replies.usage is None:
        return replies.weights
    return [float(u.get(slot, 0.0)) for u in replies.usage]


def _as_deltas(new: Mapping[str, torch.Tensor], global_: Mapping[str, torch.Tensor]) -> Tensors:
    return {n: (t - global_[n].to(torch.float64)).to(global_[n].dtype) for n, t in new.items()}


def apply_update(global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], server_lr: float) -> Tensors:
    """The server step ``global + server_lr * delta`` (server_lr = 1 is plain FedAvg)."""
    return {n: global_[n] + server_lr * delta[n] for n in global_}


Rule = Callable[[Replies, Structure, Sequence[str]], Tensors]
"""One kind's rule: the replies, the adapter's structure and the names of that kind -> merged deltas."""
