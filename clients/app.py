"""Flower ClientApp: decode the global adapter -> train locally (DP-SGD if enabled) -> send the delta.

The base model stays loaded between rounds in the worker process (see ``fed.session``). The client
owns its privacy: ``fed.privacy.client`` reads its policy, ledger and pinned data split before the data,
plans and books each round before training, filters what a reply may carry, and decides whether an
evaluate message is answered at all. A node may bring its own data file (node config ``data-path``);
errors about it stay in the node's log, and the server reads one generic refusal whatever their cause.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from fed.adapters import Clock
from fed.adapters.base import restrict_rank
from fed.config import ConfigError, RunConfig
from fed.data.node import NodeDataError, run_labels
from fed.heap import release
from fed.precision import model_device, resolve_precision
from fed.privacy.client import (
    KNOWN_EVENTS,
    KNOWN_PIN,
    NODE_RECORD,
    Metrics,
    NodeState,
    PrivateRound,
    requires_secure_aggregation,
)
from fed.privacy.distributed import secure_grid
from fed.privacy.planner import RoundPlan
from fed.privacy.release import public_metrics
from fed.ranks import client_rank
from fed.seeding import generator
from fed.session import ClientSession, client_session
from fed.train import RoundResult, evaluate, round_lr, train_round
from fed.wire import (
    config_from_record,
    from_legacy_record,
    from_record,
    legacy_fitres,
    metas,
    to_sparse_record,
    usage_metrics,
)


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for the messages of its protocol (a train message carrying its configs record), every
    other message as it is; whether this run must aggregate securely is the train handler's check."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation])
log = logging.getLogger("flwr")  # Flower's logger: what the SuperNode's operator sees
gc.freeze()  # what is imported by now (torch, transformers, Flower: ~470k objects) lives as long as the process
# Frozen, it is skipped by every collection: the one after each reply (below) scans what came later (the
# model, Opacus, the data, the round: ~34k objects), ~20 ms, instead of every object in the process, ~0.3 s.


NODE_CANNOT_ANSWER = "this node cannot take part in this round (details in the node's log)"
"""The one error text a data problem sends, whatever it was: which problem it was would tell the server
about the file (a label only one row has, a column)."""


def _labels(cfg: RunConfig) -> tuple[str, ...] | None:
    """The run's class names as the config states them (None: causal LM, or only the data could tell)."""
    try:
        return run_labels(cfg)
    except ConfigError:
        return None


def _receive(msg: Message, context: Context):
    """Config, the node's state, client id and the validated global adapter loaded into this worker's model."""
    secure = _secure(msg)
    config = _config(msg)
    cfg = config_from_record(config)
    partition_id = int(context.node_config.get("partition-id", 0))
    data_path = str(context.node_config.get("data-path", "")) or None  # the node's own file, if it has one
    device = str(context.node_config.get("device", ""))  # the node's own device, else train.device
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if data_path is None and partitions != cfg.federation.num_clients:
        raise ValueError(
            f"this node is one of num-partitions={partitions}, but the run config says "
            f"federation.num_clients={cfg.federation.num_clients}; make them equal "
            "(e.g. flwr run --federation-config num-supernodes=N with federation.num_clients=N)"
        )
    known = (str(config.get(KNOWN_EVENTS, "")), str(config.get(KNOWN_PIN, "")))
    state = NodeState.load(cfg, context.node_config, partition_id, *known)
    labels = _labels(cfg)
    split = state.split(cfg, labels)
    if split is not None and split.labels is not None and split.labels != labels:
        log.error("the server names the labels %s; this node pinned %s at first contact", labels, split.labels)
        state.hold_reply(cfg.dp, msg.metadata.created_at)  # an error reply keeps to the grid as well
        raise ValueError(NODE_CANNOT_ANSWER)  # refused whatever the file holds: no oracle on its labels
    try:
        session = client_session(cfg, partition_id, data_path, split, device)
    except NodeDataError as err:  # details (they may quote the private file) stay in this node's log
        log.error("%s", err)
        state.hold_reply(cfg.dp, msg.metadata.created_at)
        raise ValueError(NODE_CANNOT_ANSWER) from None
    expected = metas(session.adapter.sent_state())
    if secure:
        global_ = from_legacy_record(msg.content.array_records["fitins.parameters"], expected)
    else:
        global_ = from_record(msg.content.array_records["arrays"], expected)
    session.adapter.load(global_)  # client_session handed the cached model back at full rank
    server_round = config["server-round"]
    if not isinstance(server_round, int):  # Flower's strategies send the round number
        raise ValueError(f"the server sent server-round={server_round!r}, not a round number")
    return cfg, server_round, partition_id, session, global_, state


def _reply(
    msg: Message,
    metrics: Metrics,
    arrays: ArrayRecord | None = None,
    reason: str = "",
    node: Mapping[str, str] | None = None,
) -> Message:
    """A reply: ``metrics`` as released by the privacy layer, the delta if trained, a refusal's reason, the
    node's own record (its pin, its continuity token: ``NodeState.reply_record``)."""
    record: dict[str, MetricRecordValues] = dict(metrics)  # MetricRecord takes its own (invariant) value type
    content = RecordDict({"metrics": MetricRecord(record)})
    if arrays is not None:
        content["arrays"] = arrays
    if reason:
        content["refusal"] = ConfigRecord({"reason": reason})
    if node:
        content[NODE_RECORD] = ConfigRecord(dict(node))
    return Message(content, reply_to=msg)


def _train_locally(
    cfg: RunConfig, session: ClientSession, plan: RoundPlan, round_: int, pid: int, rank: int | None
) -> RoundResult:
    """``plan.steps`` local steps (DP-SGD under ``plan.dp``) of this client's adapter, masked to its rank."""
    # the run's shared clock: sparsity schedules end every client's round at the budget the server expects
    session.adapter.begin_round(Clock(round_, cfg.federation.rounds, plan.steps))
    session.adapter.set_rank(rank)  # masks the components beyond this client's rank (fed/ranks.py)
    return train_round(
        session.adapter,
        session.task,
        session.data.train,
        steps=plan.steps,
        batch_size=cfg.train.batch_size,
        weight_decay=cfg.train.weight_decay,
        lr=round_lr(cfg.train.lr, cfg.train.lr_schedule, round_, cfg.federation.rounds),
        optimizer=cfg.train.optimizer,
        momentum=cfg.train.momentum,
        precision=resolve_precision(cfg.train.precision, model_device(session.adapter.model).type),
        micro_batch=cfg.train.micro_batch,
        dp=plan.dp,
        gen=generator(cfg.seed, "batches", pid, round_),
    )


def _delta(session: ClientSession, global_: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """The trained adapter minus the global one."""
    local = session.adapter.sent_state()
    delta = {name: local[name] - global_[name] for name in global_}
    if rank is not None:  # DP noise (and weight decay) also moved the masked components: never send that
        delta = restrict_rank(delta, session.adapter.structure().rank_axes, rank)
    return delta


def _secure(msg: Message) -> bool:
    """Whether ``msg`` is a SecAgg+ round's train message (the mod hands it over with its configs record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def _config(msg: Message) -> ConfigRecord:
    """The run's config as the message carries it (in SecAgg+'s legacy FitIns, its ``fitins.config``)."""
    return msg.content.config_records["fitins.config" if _secure(msg) else "config"]


def _masked_reply(
    msg: Message, context: Context, cfg: RunConfig, delta: Mapping[str, torch.Tensor], examples: int, public: Metrics
) -> Message:
    """The update as ``secaggplus_mod`` masks it: under distributed DP clipped, on the grid and noised with this
    client's Skellam share (weight 1), else as it is (weight: its example count); checked against the range the
    server set up, so that nothing is clipped silently. Only ``public`` metrics travel beside it."""
    grid, share = secure_grid(cfg, sum(t.numel() for t in delta.values()))
    mod = context.state.config_records[RECORD_KEY_STATE]  # what the server set up for this round
    if (mod["clipping_range"], mod["target_range"], mod["max_weight"]) != (grid.range, grid.levels, grid.max_weight):
        raise ValueError(
            f"the server set up SecAgg+ with range {mod['clipping_range']!r}, levels {mod['target_range']!r}, max "
            f"weight {mod['max_weight']!r}; this run's config gives {grid.range}, {grid.levels}, {grid.max_weight}"
        )
    if share is not None:
        values, weight = share.privatize(delta), 1
    else:
        values, weight = {n: t.detach().double().cpu().numpy() for n, t in delta.items()}, examples
        grid.check(values, weight)
    return Message(legacy_fitres(values, weight, {**public, "num-examples": weight}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, round_, pid, session, global_, state = _receive(msg, context)
    num_examples = len(session.data.train)
    private = PrivateRound.start(state, cfg, round_=round_, run=msg.metadata.run_id, num_examples=num_examples)
    metrics: Metrics = {
        "partition-id": pid,
        "round": round_,
        "num-examples": num_examples,
        "fingerprint": session.adapter.fingerprint(),
    }
    rank = client_rank(
        cfg.federation.client_ranks, pid, cfg.federation.num_clients, cfg.adapter.rank, context.node_config
    )
    if rank is not None:
        metrics["rank"] = rank
    node = state.reply_record(_config(msg))
    secure = _secure(msg)
    if not secure and requires_secure_aggregation(context.node_config):  # the node's own rule, not the server's
        state.hold_reply(cfg.dp, msg.metadata.created_at)
        raise ValueError("this node sends its update only through secure aggregation (require-secure-aggregation)")
    if secure != cfg.federation.secure_aggregation:  # the run's config and the message's path must agree
        raise ValueError(
            f"federation.secure_aggregation={cfg.federation.secure_aggregation}, but this message came "
            f"{'through' if secure else 'without'} SecAgg+"
        )
    if (verdict := private.verdict()) is not None:  # refused by the node's policy, or no budget left
        state.hold_reply(cfg.dp, msg.metadata.created_at)
        if secure:  # an error reply: SecAgg+ counts this client as dropped
            raise ValueError(private.plan.refused or "declined: no privacy budget left")
        return _reply(msg, private.release(metrics | verdict), reason=private.plan.refused, node=node)
    result = _train_locally(cfg, session, private.plan, round_, pid, rank)
    log.info("trained %d steps in %.3f s", result.steps, result.wall_s)  # this node's log (bench/resident_overhead)
    # loss, timing and expert counts are private statistics outside DP-SGD
    metrics |= private.trained(
        {"train_loss": result.loss, "train_wall_s": result.wall_s} | usage_metrics(result.usage), result.released_loss
    )
    delta = _delta(session, global_, rank)
    release()  # this client's cycles and freed pages: an actor that trains client after client stays flat
    state.hold_reply(cfg.dp, msg.metadata.created_at)
    if secure:  # behind SecAgg+ only the public fields travel in the clear, with or without DP
        public = public_metrics({**metrics, "steps": result.steps}, dp=True)
        return _masked_reply(msg, context, cfg, delta, num_examples, public)
    # line-sparse tensors (RoseLoRA) travel as their kept entries and masks: post-processing of the update
    arrays = to_sparse_record(delta, session.adapter.masks(), session.adapter.structure().lines, cfg.wire.dtype)
    return _reply(msg, private.release({**metrics, "steps": result.steps}), arrays=arrays, node=node)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Scores on the node's held-out rows only (its pinned split). Under DP the node's policy decides: no
    reply with scores unless it allows evaluation, and then on all its held-out rows (at least
    ``min-eval-rows``), never a subset the server picks."""
    cfg, round_, pid, session, _, state = _receive(msg, context)
    if reason := state.evaluation_refusal(cfg.dp, len(session.data.test)):
        state.hold_reply(cfg.dp, msg.metadata.created_at)
        return _reply(msg, {"partition-id": pid, "refused": 1}, reason=reason)
    last = round_ >= cfg.federation.rounds or state.dp_bound(cfg.dp)  # every held-out row
    started = time.perf_counter()
    scores = evaluate(
        session.adapter,
        session.task,
        session.data.test,
        batch_size=cfg.train.eval_batch_size,
        limit=0 if last else cfg.train.max_eval_examples,
        precision=resolve_precision(cfg.train.precision, model_device(session.adapter.model).type),
    )
    log.info("evaluated in %.3f s", time.perf_counter() - started)  # this node's log (bench/resident_overhead)
    release()
    metrics: dict[str, MetricRecordValues] = {
        "partition-id": pid,  # the server accepts scores only from the node bound to it
        "num-examples": int(scores.pop("num_examples")),
        **{f"eval_{k}": v for k, v in scores.items()},
    }
    state.hold_reply(cfg.dp, msg.metadata.created_at)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
