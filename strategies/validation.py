"""What a train reply must satisfy before it can touch global state: one place for every check.

The payload's tensors are checked by ``fed.wire.from_record`` (keys, dtypes, shapes, size, finite
values); this module checks everything else a reply claims: which round it answers, its example
count, its frozen-factor fingerprint, its step count, its training loss (non-DP replies), and, in a DP
run, that its DP event matches the plan the client was given. Each failure names the value and what
was accepted. The two stages at the end apply them to each arriving reply: a failed reply is dropped,
with its reason, and never aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from flwr.app import Message

from fed.config import DPConfig
from fed.privacy.ledger import calibrate_noise
from fed.privacy.planner import sample_rate
from fed.wire import PayloadError, from_sparse_record, read_usage
from strategies.pipeline import AdapterModel, Reply, RoundState, Stage

MAX_EXAMPLES = 10**9
"""No client trains on more rows than this in one federation; a larger claim is a lie or a bug."""


@dataclass(frozen=True)
class ReplyRules:
    """What the server expects of a train reply in this run (0 = not checked)."""

    fingerprint: int
    local_steps: int = 0
    batch_size: int = 0
    rounds: int = 0
    dp: DPConfig = field(default_factory=DPConfig)
    max_rank: int = 0
    """With client ranks: the adapter's rank, the most a client may train (0: no client ranks in this run)."""
    ranks: tuple[int, ...] = ()
    """With client ranks fixed by the config: each partition id's rank (empty: the nodes choose, ``node``)."""
    wire: str = "float32"
    """Transport dtype replies must use (``wire.dtype``); a reply in any other is dropped."""
    secure: bool = False
    """Secure aggregation: a reply carries public metrics only (no delta, no loss); SecAgg+ hands over the sum."""


def _int_in(metrics: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = metrics.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PayloadError(f"{key}={value!r} must be an integer in [{low}, {high}]")
    return value


@lru_cache(maxsize=256)
def _least_noise(dp: DPConfig, rate: float, steps: int) -> float:
    """The noise a fresh client calibrates for this plan; a client that spent budget before uses more."""
    return calibrate_noise(dp.target_epsilon, dp.delta, rate, steps, dp.accountant)


def check_dp_event(metrics: Mapping[str, Any], rules: ReplyRules, examples: int) -> None:
    """The DP event must be the one the plan allows: the planned sample rate, no more steps than asked
    for, at least the planned noise, and an epsilon within the target."""
    dp = rules.dp
    if "dp-steps" not in metrics:
        raise PayloadError("a DP run's reply carries no DP event: the client trained without DP")
    steps = _int_in(metrics, "dp-steps", 0, rules.local_steps or 10**9)
    fields = ("dp-noise-multiplier", "dp-sample-rate", "epsilon")
    if not all(isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]) for k in fields):
        noise, rate_, eps_ = (metrics.get(k) for k in fields)
        raise PayloadError(f"DP event fields must be finite numbers: noise {noise!r}, rate {rate_!r}, epsilon {eps_!r}")
    sigma, rate, eps = (float(metrics[k]) for k in fields)
    if rules.batch_size and not math.isclose(rate, sample_rate(rules.batch_size, examples), rel_tol=1e-9):
        raise PayloadError(
            f"dp-sample-rate={rate} contradicts the plan: batch {rules.batch_size} / "
            f"num-examples {examples} = {sample_rate(rules.batch_size, examples):.6g}"
        )
    if dp.target_epsilon > 0:
        if eps > dp.target_epsilon * (1 + 1e-6):
            raise PayloadError(f"epsilon={eps} exceeds the run's target {dp.target_epsilon}")
        if steps and rules.rounds and sigma < _least_noise(dp, rate, rules.rounds * rules.local_steps) * (1 - 2e-3):
            raise PayloadError(
                f"dp-noise-multiplier={sigma} is below the noise the plan calibrates for this client's sample rate"
            )
    elif sigma < dp.noise_multiplier * (1 - 1e-9):
        raise PayloadError(f"dp-noise-multiplier={sigma} is below the run's {dp.noise_multiplier}")
    if eps < 0:
        raise PayloadError(f"epsilon={eps} must be >= 0")
    released = metrics.get("dp-train-loss")
    if released is not None and not (
        dp.loss_noise_multiplier > 0 and isinstance(released, (int, float)) and math.isfinite(released)
    ):
        raise PayloadError(f"dp-train-loss={released!r}: a finite number, and only when the run releases the loss")


def check_reply(metrics: Mapping[str, Any], rules: ReplyRules, server_round: int) -> float:
    """The reply's example count (its raw weight), once every claim of the reply checks out."""
    answered = metrics.get("round")
    if answered != server_round:
        raise PayloadError(f"reply answers round {answered!r}, but this is round {server_round}")
    examples = _int_in(metrics, "num-examples", 1, MAX_EXAMPLES)
    if metrics.get("fingerprint") != rules.fingerprint:
        raise PayloadError(
            f"frozen-factor fingerprint {metrics.get('fingerprint')!r} differs from the "
            f"server's {rules.fingerprint!r}: the client derived different frozen adapter tensors"
        )
    _int_in(metrics, "steps", 0, rules.local_steps or 10**9)
    if rules.dp.example_level:
        check_dp_event(metrics, rules, examples)
    elif not rules.secure:  # behind SecAgg+ a client sends only public fields, in the clear
        loss = metrics.get("train_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
            raise PayloadError(f"train_loss={loss!r} must be a finite number >= 0")
    return float(examples)


def check_evaluation(reply: Message) -> None:
    """An evaluate reply that may be averaged: not a refusal, an example count in [1, ``MAX_EXAMPLES``], an
    accuracy in [0, 1], and every other score a finite number >= 0 (one reply claiming 10^12 rows at
    accuracy 10^6 would otherwise set the round's score)."""
    metrics = reply.content.metric_records["metrics"]
    if metrics.get("refused"):
        refusal = reply.content.config_records.get("refusal")
        why = str(refusal["reason"]) if refusal is not None and "reason" in refusal else "no reason given"
        raise PayloadError(f"client refused to evaluate: {why}")
    _int_in(metrics, "num-examples", 1, MAX_EXAMPLES)
    for key, value in metrics.items():
        if key == "num-examples":
            continue
        high = 1.0 if key == "eval_accuracy" else math.inf
        if not isinstance(value, (int, float)) or not (0 <= value <= high and math.isfinite(value)):
            raise PayloadError(f"{key}={value!r} must be a finite number in [0, {high:g}]")


def check_rank(metrics: Mapping[str, Any], rules: ReplyRules) -> int | None:
    """The rank a reply trained at (None: no client ranks in this run): within the adapter's rank and, when
    the config fixes the ranks, the one planned for the reply's partition id."""
    if not rules.max_rank:
        return None
    rank = _int_in(metrics, "rank", 1, rules.max_rank)
    if rules.ranks:
        pid = _int_in(metrics, "partition-id", 0, len(rules.ranks) - 1)
        if rank != rules.ranks[pid]:
            raise PayloadError(
                f"rank={rank} differs from federation.client_ranks' {rules.ranks[pid]} for partition {pid}"
            )
    return rank


def check_padding(delta: Mapping[str, torch.Tensor], axes: Mapping[str, int], rank: int) -> None:
    """A client of rank r_k trains only the first r_k components: everything of its delta beyond them is 0."""
    for name, axis in axes.items():
        tail = delta[name].narrow(axis, rank, delta[name].shape[axis] - rank)
        if torch.count_nonzero(tail):
            raise PayloadError(
                f"{name}: non-zero values beyond the reply's rank {rank} (a client of rank r trains "
                "only the first r components)"
            )


class OneReplyPerNode(Stage):
    """A node answers a round once: its second reply is dropped before any stage reads it, so it neither
    counts twice in the aggregate nor books a second DP event."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def arrive(self, state: RoundState, reply: Reply) -> None:
        if reply.node in self._seen:
            raise PayloadError("a second reply from the same node in this round")
        self._seen.add(reply.node)

    def received(self, state: RoundState, replies: Sequence[Message]) -> None:
        """The next batch of replies starts afresh."""
        self._seen.clear()


def _check_willing(reply: Reply) -> None:
    """A client that refused the round or declined to train sent metrics, not an update."""
    if reply.metrics.get("refused"):
        refusal = reply.message.content.config_records.get("refusal")
        why = str(refusal["reason"]) if refusal is not None and "reason" in refusal else "no reason given"
        raise PayloadError(f"client refused the round under its privacy policy: {why}")
    if reply.metrics.get("declined"):
        raise PayloadError("client declined to train (privacy budget exhausted)")


class ReplyValidation(Stage):
    """Every claim of a reply checked against the run's ``ReplyRules``, then its payload decoded (sparse
    lines at the round's budgets, the run's wire dtype) into the delta, expert counts and masks the
    core aggregates. The delta is a read-only view of the reply's bytes in the wire dtype (no copy: a round
    holds every reply until its bounds are known); a stage that changes it makes a new mapping."""

    def __init__(self, model: AdapterModel, rules: ReplyRules) -> None:
        self.model, self.rules = model, rules

    def arrive(self, state: RoundState, reply: Reply) -> None:
        _check_willing(reply)
        reply.weight = check_reply(reply.metrics, self.rules, state.number)
        if self.rules.secure:  # its update is in the round's secure sum, not in the reply
            return
        rank = check_rank(reply.metrics, self.rules)
        structure = self.model.structure
        reply.usage = read_usage(reply.metrics, structure.slot_names)
        arrays = reply.message.content.array_records["arrays"]
        state.log.bytes_up += arrays.count_bytes()
        reply.delta, reply.mask = from_sparse_record(
            arrays, self.model.expected, state.global_, structure.lines, state.budgets, self.rules.wire, transport=True
        )
        if rank is not None:
            check_padding(reply.delta, structure.rank_axes, rank)
