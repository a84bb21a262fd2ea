"""The core strategy: decoded replies in, aggregated by kind, the server stepped; every other concern is a stage.

Flower's FedAvg runs the rounds (``start``); this class keeps the run's round numbers (a resumed run
continues them), each round's ``RoundLog``, and calls its stages (``strategies.pipeline.Stage``) at
fixed points of a round: on the train messages sent, on each reply as it arrives, once all arrived,
and on the accepted batch before the rule combines it. A round left with fewer than ``min_replies``
accepted replies keeps the global adapter as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fed.seeding import derive_seed
from fed.wire import PayloadError, from_record, to_record
from strategies.kinds import Replies, Tensors, aggregate, aggregation_error, apply_update
from strategies.pipeline import AdapterModel, Reply, RoundLog, RoundState, Stage
from strategies.validation import check_evaluation

log = logging.getLogger(__name__)


def _unchanged(before: Tensors, after: Tensors) -> Tensors:
    """No family step: the global is what the update made it."""
    return after


def _no_budgets(run_round: int) -> dict[str, int]:
    """No line-sparse tensors: nothing for a reply's masks to match."""
    return {}


@dataclass(frozen=True)
class MergeRule:
    """How accepted replies combine: the rule for mean-kind groups (``mean``, or the robust ``median`` /
    ``trimmed-mean``) and whether LoRA's pairs average as factors (``mean``) or as products."""

    rule: str = "mean"
    trim: float = 0.2
    aggregation: str = "mean"


@dataclass(frozen=True)
class ServerUpdate:
    """How the merged delta becomes the next global, and what each round's sparse replies must keep."""

    server_lr: float = 1.0
    server_step: Callable[[Tensors, Tensors], Tensors] = _unchanged
    """(global before, global after the update) -> the next global: the adapter family's own step."""
    budgets: Callable[[int], dict[str, int]] = _no_budgets
    """Run round -> per line-sparse tensor, the entries each line keeps (RoseLoRA's schedule)."""


@dataclass(frozen=True)
class RoundPlan:
    """The run's rounds as the server counts, evaluates and summarises them."""

    rounds: int = 0
    offset: int = 0
    """Rounds completed before this process started (a resumed run): Flower counts from 1 again, the
    run's round numbers (messages, logs, ledgers) continue."""
    eval_every: int = 1
    """Evaluate after every k-th round of the run and after its last; 0: the last only."""
    min_replies: int = 1
    """Fewest accepted replies that may move the global adapter (crashed nodes, stragglers and dropped
    replies leave a round with fewer; it then keeps the previous global)."""
    seed: int = 0
    loss_metric: str = "train_loss"
    """The reply metric averaged into the round's train loss (under DP only the privatised release travels)."""


def _all_or_none(usage: list[dict[str, float] | None], run_round: int) -> list[dict[str, float]] | None:
    """Expert usage weights only when every aggregated client sent counts; DP clients do not (docs/privacy.md)."""
    sent = [u for u in usage if u is not None]
    if len(sent) == len(usage):
        return sent
    if sent:
        log.info("round %d: some clients sent no expert counts; experts fall back to example weights", run_round)
    return None


def _train_loss(accepted: Sequence[Reply], metric: str) -> float | None:
    """The example-weighted mean of ``metric`` over the replies that carry it (None: none does)."""
    losses = [(r.weight, float(r.metrics[metric])) for r in accepted if metric in r.metrics]
    if not losses:
        return None
    return sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)


class AdapterStrategy(FedAvg):
    """FedAvg over adapter deltas: per-kind aggregation, a server learning rate, the family's server step."""

    def __init__(
        self,
        *,
        model: AdapterModel,
        stages: Sequence[Stage],
        merge: MergeRule = MergeRule(),
        update: ServerUpdate = ServerUpdate(),
        plan: RoundPlan = RoundPlan(),
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.model, self.stages, self.merge, self.update, self.plan = model, tuple(stages), merge, update, plan
        self.round_offset = plan.offset
        self.rounds: dict[int, RoundLog] = {}
        self._global: Tensors = {}

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """FedAvg's rounds, on the grid the stages make of ``grid`` (``Stage.transport``)."""
        for stage in self.stages:
            grid = stage.transport(grid)
        return super().start(grid, *args, **kwargs)

    def _await_nodes(self, grid: Grid) -> None:
        """Wait for ``min_available_nodes`` before sampling. FedAvg sizes its sample from the nodes connected
        *before* it waits, so a round opened while a restarted node was reconnecting sampled too few."""
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_nodes(grid)
        server_round += self.round_offset
        self._global = from_record(arrays, self.model.expected)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for stage in self.stages:
            messages = stage.outgoing(messages)
        self.rounds[server_round] = RoundLog(
            bytes_down=arrays.count_bytes() * len(messages),
            asked=[m.metadata.dst_node_id for m in messages],
            connected=list(grid.get_node_ids()),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's replies merged into the next global. Consumes ``replies``: a list (what Flower's grid
        hands over) is emptied, so that once this round is merged nothing holds its payloads; Flower keeps
        its reference to that list until the next round's replies have all arrived, which would otherwise
        hold two rounds of payloads then."""
        received = list(replies)
        if isinstance(replies, list):
            replies.clear()
        return self._aggregate(server_round + self.round_offset, received)

    def _aggregate(self, run_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's replies read, bounded and merged: the next global and the round's summary."""
        state = RoundState(
            run_round, self.rounds.setdefault(run_round, RoundLog()), self._global, self.update.budgets(run_round)
        )
        accepted = self._read(state, replies)
        for stage in self.stages:
            stage.received(state, replies)
        if len(accepted) < self.plan.min_replies:
            log.warning(
                "round %d: %d valid replies, fewer than min_replies=%d; the global adapter is unchanged",
                run_round,
                len(accepted),
                self.plan.min_replies,
            )
            return None, None
        batch = Replies(
            state.global_,
            [r.delta for r in accepted],
            [r.weight for r in accepted],
            usage=_all_or_none([r.usage for r in accepted], run_round),
            seed=derive_seed(self.plan.seed, "server", run_round),
            masks=[r.mask for r in accepted],
            step=self.update.server_lr,
        )
        for stage in self.stages:
            batch = stage.bound(state, batch)
        new_global = self._step(state, batch)
        loss = _train_loss(accepted, self.plan.loss_metric)
        if loss is not None:
            state.log.train_loss = loss
        return to_record(new_global), _summary(state.log, len(accepted), loss)

    def _read(self, state: RoundState, replies: list[Message]) -> list[Reply]:
        """The replies every stage accepted, in arrival order; the others logged as dropped, with why."""
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        for msg in failed:
            reason = f"node {msg.metadata.src_node_id}: client error: {msg.error.reason}"
            log.warning("round %d: %s", state.number, reason)
            state.log.dropped.append(reason)
        accepted = []
        for msg in valid:
            reply = Reply(msg)
            try:
                for stage in self.stages:
                    stage.arrive(state, reply)
            except (PayloadError, KeyError) as err:
                reason = f"node {reply.node}: {err}"
                log.warning("round %d: dropped reply from %s", state.number, reason)
                state.log.dropped.append(reason)
                continue
            for stage in self.stages:
                stage.accepted(state, reply)
            state.log.accepted += 1
            accepted.append(reply)
        return accepted

    def _step(self, state: RoundState, batch: Replies) -> Tensors:
        """The next global: the batch merged group by group, applied at ``server_lr``, then the family's step."""
        merged = aggregate(
            batch, self.model.structure, rule=self.merge.rule, trim=self.merge.trim, aggregation=self.merge.aggregation
        )
        if self.model.products is not None:
            state.log.aggregation_error = aggregation_error(self.model.products, batch, merged)
        for stage in self.stages:
            merged = stage.released(state, merged)
        return self.update.server_step(state.global_, apply_update(state.global_, merged, self.update.server_lr))

    def evaluates(self, run_round: int) -> bool:
        """Whether round ``run_round`` of the run (offset included) ends with an evaluation."""
        last = run_round >= self.plan.rounds
        every = self.plan.eval_every
        return self.fraction_evaluate > 0 and (last or (every > 0 and run_round % every == 0))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.evaluates(server_round + self.round_offset):
            return []
        self._await_nodes(grid)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's example-weighted mean of the scores, plus how many held-out examples they cover (what
        the round's accuracy was measured on: every held-out row after the last round)."""
        run_round = server_round + self.round_offset
        replies = [m for m in replies if m.has_error() or _valid_evaluation(m, run_round, self.stages)]
        metrics = super().aggregate_evaluate(server_round, replies)  # checks every reply carries the count
        if metrics is not None:
            metrics.pop("partition-id", None)  # who answered, not a score
            examples = sum(_count(m, self.weighted_by_key) for m in replies if not m.has_error())
            self.rounds.setdefault(server_round + self.round_offset, RoundLog()).evaluate = {
                **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                "eval_examples": examples,
            }
        return metrics


def _valid_evaluation(reply: Message, run_round: int, stages: Sequence[Stage]) -> bool:
    """Whether an evaluate reply may enter the round's scores; a refusal, a claim outside ``check_evaluation``
    or one a stage refuses (a node answering for another's partition id) is logged with its reason and left out."""
    try:
        check_evaluation(reply)
        for stage in stages:
            stage.evaluation(run_round, reply)
    except (PayloadError, KeyError) as err:
        log.warning("round %d: evaluation from node %d left out: %s", run_round, reply.metadata.src_node_id, err)
        return False
    return True


def _count(reply: Message, key: str) -> int:
    """An evaluate reply's example count (Flower's mean has checked that it is there and a number)."""
    value = reply.content.metric_records["metrics"][key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"evaluate reply's {key}={value!r} is not a number")
    return int(value)


def _summary(record: RoundLog, clients: int, loss: float | None) -> MetricRecord:
    """What Flower keeps of a train round (the metrics line is written from the ``RoundLog``)."""
    values: dict[str, MetricRecordValues] = {
        "clients": clients,
        "dropped": len(record.dropped),
        "bytes_up": record.bytes_up,
        "capped": record.capped,
        "clipped": record.clipped,
        "aggregation_error": record.aggregation_error,
    }
    return MetricRecord(values | ({"train_loss": loss} if loss is not None else {}))
