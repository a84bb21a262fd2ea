"""Adapter-delta FedAvg as a Flower strategy: validate every reply, aggregate by kind, step the server.

Clients send ``local - global`` for the tensors they trained. Each reply is validated first (keys,
dtypes, shapes, size, finite values, example count, frozen-factor fingerprint); a bad reply is
dropped with a logged reason and never touches the global adapter; a round with fewer than
``min_replies`` valid replies keeps the global as it was. Under DP only a reply's public
fields are kept (``fed.privacy.release``), and its DP event enters the privacy book the moment the
reply arrives, whether or not the reply is then aggregated: a dropped client still spent budget.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed.adapters import Structure
from fed.adapters.base import Products
from fed.config import DPConfig, StrategyConfig
from fed.privacy.book import LedgerBook
from fed.privacy.ledger import events_to_json
from fed.privacy.release import public_metrics
from fed.seeding import derive_seed
from fed.wire import PayloadError, TensorMeta, from_record, from_sparse_record, read_usage, to_record
from strategies.influence import adaptive_bound, bounded_weights, clip_deltas, delta_norm, honest_step_bound
from strategies.kinds import Replies, aggregate, aggregation_error, apply_update
from strategies.validation import ReplyRules, check_padding, check_rank, check_reply

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
    asked: list[int] = field(default_factory=list)
    """Node ids that were sent a train message."""
    capped: int = 0
    """Replies whose (self-reported) example count was capped."""
    clipped: int = 0
    """Replies whose delta norm exceeded the round's bound and was scaled down to it."""
    norm_bound: float | None = None
    train_loss: float = float("nan")
    aggregation_error: float = float("nan")
    """How far the aggregated adapter's weight update is from the mean of the clients' (see rules.py)."""
    evaluate: dict[str, float] = field(default_factory=dict)


def _all_or_none(usage: list[dict[str, float] | None], server_round: int) -> list[dict[str, float]] | None:
    """Expert usage weights only when every aggregated client sent counts; DP clients do not (docs/privacy.md)."""
    if all(u is not None for u in usage):
        return usage  # type: ignore[return-value]
    if any(u is not None for u in usage):
        log.info("round %d: some clients sent no expert counts; experts fall back to example weights", server_round)
    return None


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter deltas, with a server learning rate and per-kind aggregation rules."""

    def __init__(self, *, expected: Mapping[str, TensorMeta], structure: Structure, rules: ReplyRules,
                 server_lr: float = 1.0, products: Products | None = None, seed: int = 0,
                 influence: StrategyConfig = StrategyConfig(), lr: float = 0.0, book: LedgerBook | None = None,
                 on_privacy: Callable[[LedgerBook], None] | None = None, min_replies: int = 1, wire: str = "float32",
                 eval_every: int = 1, budgets: Callable[[int], dict[str, int]] = lambda round_: {},
                 server_step: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda before, after: dict(after),
                 **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.budgets = budgets
        self.server_step = server_step
        """Per line-sparse tensor, the entries each line keeps at the end of a round (RoseLoRA's schedule)."""
        self.eval_every = eval_every
        """Evaluate after every k-th round of the run and after its last (``rules.rounds``); 0: the last only."""
        self.wire = wire
        """Transport dtype replies must use (``wire.dtype``); a reply in any other is dropped."""
        self.min_replies = min_replies
        """Fewest valid replies that may move the global adapter: a round left with fewer (crashed nodes,
        stragglers past the timeout, dropped replies) keeps the previous global."""
        self.round_offset = 0
        """Rounds completed before this process started (a resumed run): Flower counts from 1 again, the
        run's round numbers (messages, logs, ledgers) continue."""
        self.expected = dict(expected)
        self.structure = structure
        self.products = products
        """Dense weight updates of the adapter given its tensors: what ``aggregation_error`` compares."""
        self.seed = seed
        self.rules = rules
        self.server_lr = server_lr
        self.influence = influence
        params = sum(math.prod(meta.shape) for meta in expected.values())
        self.ceiling = honest_step_bound(lr, rules.local_steps, params) if lr and rules.local_steps else math.inf
        """The largest update an honest client can make: ``auto``'s bound and ``adaptive``'s ceiling."""
        self.book = book if book is not None else LedgerBook(DPConfig())
        self.dp = self.book.dp.enabled
        self.on_privacy = on_privacy
        """Persists the book (privacy.json) after every batch of replies, before aggregation."""
        self.clients: dict[int, int] = {}
        """Node id -> the client id its replies named: where to send that client's events back."""
        self.rounds: dict[int, RoundLog] = {}
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
        messages = [self._with_known_events(m) for m in super().configure_train(server_round, arrays, config, grid)]
        self.rounds[server_round] = RoundLog(bytes_down=arrays.count_bytes() * len(messages),
                                             asked=[m.metadata.dst_node_id for m in messages])
        return messages

    def _with_known_events(self, message: Message) -> Message:
        """The message, with the DP events the book holds for its client, so a client that lost its
        ledger file merges them back instead of spending its budget again."""
        cid = self.clients.get(message.metadata.dst_node_id)
        events = self.book.events(cid) if cid is not None else []
        if not events:
            return message
        content = message.content
        config = ConfigRecord({**content.config_records[self.configrecord_key],
                               "known-events": events_to_json(events)})
        record = RecordDict({self.arrayrecord_key: content.array_records[self.arrayrecord_key],
                             self.configrecord_key: config})
        return Message(content=record, message_type=message.metadata.message_type,
                       dst_node_id=message.metadata.dst_node_id)

    def _observe(self, server_round: int, msg: Message, record: RoundLog) -> dict[str, Any]:
        """The reply's public metrics, its DP event booked at once."""
        metrics = public_metrics(msg.content.metric_records["metrics"], self.dp)
        cid = self.book.observe(server_round, metrics, run=msg.metadata.run_id)
        if cid is not None:
            self.clients[msg.metadata.src_node_id] = cid
        record.reported.append(metrics)
        return metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        record = self.rounds.setdefault(server_round, RoundLog())
        for msg in failed:
            reason = f"node {msg.metadata.src_node_id}: client error: {msg.error.reason}"
            log.warning("round %d: %s", server_round, reason)
            record.dropped.append(reason)
        deltas, examples, usage, masks, seen = [], [], [], [], set()
        budgets = self.budgets(server_round)
        for msg in valid:
            try:
                node = msg.metadata.src_node_id
                if node in seen:
                    raise PayloadError("a second reply from the same node in this round")
                seen.add(node)
                metrics = self._observe(server_round, msg, record)
                if metrics.get("refused"):
                    why = msg.content.config_records.get("refusal", {}).get("reason", "no reason given")
                    raise PayloadError(f"client refused the round under its privacy policy: {why}")
                if metrics.get("declined"):
                    raise PayloadError("client declined to train (privacy budget exhausted)")
                weight = check_reply(metrics, self.rules, server_round)
                rank = check_rank(metrics, self.rules)
                counts = read_usage(metrics, self.structure.slot_names)
                arrays = msg.content.array_records["arrays"]
                record.bytes_up += arrays.count_bytes()
                delta, kept = from_sparse_record(arrays, self.expected, self._global, self.structure.lines, budgets,
                                                  self.wire)
                if rank is not None:
                    check_padding(delta, self.structure.rank_axes, rank)
                deltas.append(delta)
            except (PayloadError, KeyError) as err:
                reason = f"node {msg.metadata.src_node_id}: {err}"
                log.warning("round %d: dropped reply from %s", server_round, reason)
                record.dropped.append(reason)
                continue
            examples.append(weight)
            usage.append(counts)
            masks.append(kept)
            record.accepted.append(metrics)
        self._flag_silent(server_round, record, {m.metadata.src_node_id for m in replies})
        if self.on_privacy is not None:
            self.on_privacy(self.book)
        if len(deltas) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than min_replies=%d; the global adapter is unchanged",
                        server_round, len(deltas), self.min_replies)
            return None, None
        replies = self._bounded(deltas, examples, _all_or_none(usage, server_round), server_round, record, masks)
        merged = aggregate(replies, self.structure, rule=self.influence.rule, trim=self.influence.trim_fraction,
                           aggregation=self.influence.aggregation)
        if self.products is not None:
            record.aggregation_error = aggregation_error(self.products, replies, merged)
        new_global = self.server_step(self._global, apply_update(self._global, merged, self.server_lr))
        key = "dp-train-loss" if self.dp else "train_loss"  # under DP only the privatised release travels
        losses = [(w, float(m[key])) for w, m in zip(examples, record.accepted) if key in m]
        if losses:
            record.train_loss = sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)
        summary = MetricRecord({"clients": len(deltas), "dropped": len(record.dropped), "bytes_up": record.bytes_up,
                                "capped": record.capped, "clipped": record.clipped,
                                "aggregation_error": record.aggregation_error}
                               | ({"train_loss": record.train_loss} if losses else {}))
        return to_record(new_global), summary

    def _bounded(self, deltas: list[dict[str, torch.Tensor]], examples: list[float],
                 usage: list[dict[str, float]] | None, server_round: int, record: RoundLog,
                 masks: list[dict[str, torch.Tensor]]) -> Replies:
        """Bounded influence before any rule sees the replies: cap the weights, clip each delta's norm."""
        s = self.influence
        weights, record.capped = bounded_weights(examples, s.weighting, s.max_weight_ratio)
        bound = {"off": math.inf, "fixed": s.max_delta_norm, "auto": self.ceiling,
                 "adaptive": adaptive_bound([delta_norm(d) for d in deltas], s.clip_multiplier, self.ceiling)
                 if s.clip == "adaptive" else math.inf}[s.clip]
        if math.isfinite(bound):
            deltas, record.clipped = clip_deltas(deltas, bound)
            record.norm_bound = bound
        if usage is not None:  # expert token counts are self-reported weights too: cap each client's total
            totals = [sum(u.values()) for u in usage]
            caps, capped = bounded_weights(totals, s.weighting, s.max_weight_ratio)
            usage = [{slot: n * (cap / total if total > 0 else 1.0) for slot, n in u.items()}
                     for u, total, cap in zip(usage, totals, caps)]
            record.capped += capped
        return Replies(self._global, deltas, weights, usage=usage, seed=derive_seed(self.seed, "server", server_round),
                       masks=masks)

    def _flag_silent(self, server_round: int, record: RoundLog, replied: set[int]) -> None:
        """A DP client asked to train that never replied may still have spent budget: say so."""
        if not self.dp:
            return
        for node in sorted(set(record.asked) - replied):
            who = f"client {self.clients[node]}" if node in self.clients else "a client not yet identified"
            self.book.flag(f"round {server_round}: {who} (node {node}) was asked to train and sent no reply; it "
                           "may have spent budget the server never saw (its own ledger counts it)")

    def evaluates(self, run_round: int) -> bool:
        """Whether round ``run_round`` of the run (offset included) ends with an evaluation."""
        last = run_round >= self.rules.rounds
        return self.fraction_evaluate > 0 and (last or (self.eval_every > 0 and run_round % self.eval_every == 0))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round + self.round_offset):
            return []
        self._await_nodes(grid)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's example-weighted mean of the scores, plus how many held-out examples they cover (what
        the round's accuracy was measured on: every held-out row after the last round)."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # checks every reply carries the count
        if metrics is not None:
            examples = sum(int(m.content["metrics"][self.weighted_by_key]) for m in replies if not m.has_error())
            self.rounds.setdefault(server_round + self.round_offset, RoundLog()).evaluate = {
                **metrics, "eval_examples": examples}
        return metrics
