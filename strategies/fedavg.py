"""Adapter-delta FedAvg as a Flower strategy: validate every reply, aggregate by kind, step the server.

Clients send ``local - global`` for the tensors they trained. Each reply is validated first (keys,
dtypes, shapes, size, finite values, example count, frozen-factor fingerprint); a bad reply is
dropped with a logged reason and never touches the global adapter.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed.adapters import Aggregation
from fed.wire import PayloadError, TensorMeta, from_record, to_record
from strategies.rules import aggregate, apply_update

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What one round did, for the run's metrics line and privacy ledger."""

    bytes_down: int = 0
    bytes_up: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    """Metrics of the replies that were aggregated."""
    reported: list[dict[str, Any]] = field(default_factory=list)
    """Metrics of every reply that carried them, aggregated or not (a dropped client still spent budget)."""
    dropped: list[str] = field(default_factory=list)
    train_loss: float = float("nan")
    evaluate: dict[str, float] = field(default_factory=dict)


def check_metrics(metrics: Mapping[str, Any], fingerprint: int) -> float:
    """The reply's example count, after checking it and the frozen-factor fingerprint."""
    examples = metrics.get("num-examples")
    if not isinstance(examples, int) or examples <= 0:
        raise PayloadError(f"num-examples={examples!r} must be a positive integer")
    if not isinstance(metrics.get("train_loss"), (int, float)):
        raise PayloadError(f"train_loss={metrics.get('train_loss')!r} must be a number")
    if metrics.get("fingerprint") != fingerprint:
        raise PayloadError(f"frozen-factor fingerprint {metrics.get('fingerprint')!r} differs from the "
                           f"server's {fingerprint!r}: the client derived different frozen adapter tensors")
    return float(examples)


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter deltas, with a server learning rate and per-kind aggregation rules."""

    def __init__(self, *, expected: Mapping[str, TensorMeta], kinds: Mapping[str, Aggregation], fingerprint: int,
                 server_lr: float = 1.0, min_replies: int = 1, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.min_replies = min_replies
        """Fewest valid replies that may move the global adapter: a round left with fewer (crashed nodes,
        stragglers past the timeout, dropped replies) keeps the previous global."""
        self.expected = dict(expected)
        self.kinds = dict(kinds)
        self.fingerprint = fingerprint
        self.server_lr = server_lr
        self.rounds: dict[int, RoundLog] = {}
        self.round_offset = 0
        """Rounds completed before this process started (a resumed run): Flower counts from 1 again, the
        run's round numbers (messages, logs, ledgers) continue."""
        self._global: dict[str, torch.Tensor] = {}

    def _await_nodes(self, grid: Grid) -> None:
        """Wait for ``min_available_nodes`` before sampling. FedAvg sizes its sample from the nodes connected
        *before* it waits, so a round opened while a restarted node was reconnecting sampled too few."""
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(1.0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._await_nodes(grid)
        server_round += self.round_offset
        self._global = from_record(arrays, self.expected)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = RoundLog(bytes_down=arrays.count_bytes() * len(messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        record = self.rounds.setdefault(server_round, RoundLog())
        for msg in failed:
            reason = f"node {msg.metadata.src_node_id}: client error: {msg.error.reason}"
            log.warning("round %d: %s", server_round, reason)
            record.dropped.append(reason)
        deltas, weights = [], []
        for msg in valid:
            try:
                metrics = dict(msg.content.metric_records["metrics"])
                record.reported.append(metrics)
                if metrics.get("declined"):
                    raise PayloadError("client declined to train (privacy budget exhausted)")
                weight = check_metrics(metrics, self.fingerprint)
                arrays = msg.content.array_records["arrays"]
                record.bytes_up += arrays.count_bytes()
                deltas.append(from_record(arrays, self.expected))
            except (PayloadError, KeyError) as err:
                reason = f"node {msg.metadata.src_node_id}: {err}"
                log.warning("round %d: dropped reply from %s", server_round, reason)
                record.dropped.append(reason)
                continue
            weights.append(weight)
            record.accepted.append(metrics)
        if len(deltas) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than min_replies=%d; the global adapter is unchanged",
                        server_round, len(deltas), self.min_replies)
            return None, None
        merged = aggregate(deltas, weights, self.kinds)
        new_global = apply_update(self._global, merged, self.server_lr)
        losses = [(w, float(m["train_loss"])) for w, m in zip(weights, record.accepted)
                  if math.isfinite(m["train_loss"])]  # NaN: a round of only empty Poisson batches
        if losses:
            record.train_loss = sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)
        summary = MetricRecord({"train_loss": record.train_loss, "clients": len(deltas),
                                "dropped": len(record.dropped), "bytes_up": record.bytes_up})
        return to_record(new_global), summary

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate > 0:
            self._await_nodes(grid)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.rounds.setdefault(server_round + self.round_offset, RoundLog()).evaluate = dict(metrics)
        return metrics
