"""What the core strategy and its stages share: the round's log, a reply as the stages read it, the stage hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fed.adapters import Structure
from fed.adapters.base import Products
from fed.wire import TensorMeta
from strategies.kinds import Replies, Tensors


@dataclass
class RoundLog:
    """What one round did, for the run's metrics line and privacy ledger."""

    bytes_down: int = 0
    bytes_up: int = 0
    accepted: int = 0
    """Replies that were aggregated (a count: a round's log is kept until its line is written, and a cohort of
    thousands must not keep every reply's metrics that long)."""
    dropped: list[str] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    """Node ids that were sent a train message."""
    connected: list[int] = field(default_factory=list)
    """Node ids the SuperLink listed when the round opened (empty: not known, every bound node counts as there)."""
    unbooked: list[int] = field(default_factory=list)
    """Node ids whose reply carried a DP event but was dropped: not booked, flagged."""
    capped: int = 0
    """Replies whose (self-reported) example count was capped."""
    clipped: int = 0
    """Replies whose delta norm exceeded the round's bound and was scaled down to it."""
    norm_bound: float | None = None
    train_loss: float = float("nan")
    aggregation_error: float = float("nan")
    """How far the aggregated adapter's weight update is from the mean of the clients'
    (``strategies.kinds.aggregation_error``)."""
    secagg_error: float | None = None
    """Secure aggregation: the most SecAgg+'s integer grid can move one coordinate of the round's mean update
    (each survivor's rounding moves its weighted value by less than one grid step)."""
    evaluate: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterModel:
    """What the server knows of the adapter: the tensors a reply must carry and how they combine."""

    expected: Mapping[str, TensorMeta]
    structure: Structure
    products: Products | None = None
    """Dense weight updates of the adapter given its tensors: what ``aggregation_error`` compares."""


@dataclass(frozen=True)
class RoundState:
    """One round as the stages see it: its number in the run, its log, the global its replies answer."""

    number: int
    """The run's round (a resumed run's offset included), what messages, logs and ledgers name."""
    log: RoundLog
    global_: Tensors
    budgets: Mapping[str, int]
    """Per line-sparse tensor, the entries each line keeps this round: what a sparse reply must match."""


@dataclass(eq=False)
class Reply:
    """One train reply as the stages read it, filled in as it passes them; aggregated once all pass."""

    message: Message
    weight: float = 0.0
    """Its example count, as claimed and checked: FedAvg's raw weight."""
    delta: Mapping[str, torch.Tensor] = field(default_factory=dict)
    usage: dict[str, float] | None = None
    mask: Tensors = field(default_factory=dict)

    @property
    def node(self) -> int:
        return self.message.metadata.src_node_id

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """The metrics as sent; a stage may narrow them (under DP, to the public fields) by assigning."""
        return dict(self.message.content.metric_records["metrics"])


class Stage:
    """One concern composed around the core strategy (validation, the privacy book, bounded influence).

    The core calls each hook of every stage in stack order; a hook a stage does not override hands its
    input on unchanged, so a new concern is a new stage and the core stays as it is.
    """

    def transport(self, grid: Grid) -> Grid:
        """The grid the strategy sends the run's messages on (secure aggregation runs each round's train
        messages through SecAgg+ and hands back their sum)."""
        return grid

    def outgoing(self, messages: list[Message]) -> list[Message]:
        """The round's train messages, before they are sent."""
        return messages

    def arrive(self, state: RoundState, reply: Reply) -> None:
        """Read one reply as it arrives; raise ``PayloadError`` to drop it with that reason."""

    def accepted(self, state: RoundState, reply: Reply) -> None:
        """One reply passed every stage's ``arrive``: what only a valid reply may change (the privacy book)."""

    def received(self, state: RoundState, replies: Sequence[Message]) -> None:
        """Every reply of the round was read (dropped or not); nothing is aggregated yet."""

    def evaluation(self, run_round: int, reply: Message) -> None:
        """Read one evaluate reply whose scores check out; raise ``PayloadError`` to leave it out with that reason."""

    def bound(self, state: RoundState, batch: Replies) -> Replies:
        """The accepted replies, before the rule combines them: what limits one reply's influence.

        A delta here is a read-only view of its reply's bytes in the wire dtype: a stage that changes one
        returns a new mapping that computes it as it is read (``strategies.influence.Scaled``) rather than
        a copy of every reply, and never writes into it; the rules fold the result one reply at a time."""
        return batch

    def released(self, state: RoundState, merged: Tensors) -> Tensors:
        """The rule's merged update, before the server applies it: what a release adds to it (client-level DP's
        noise, over the sum however the rule accumulated it)."""
        return merged
