"""Flower ClientApp: decode the global adapter -> train locally (DP-SGD if enabled) -> send the delta.

The base model stays loaded between rounds in the worker process (see ``fed.session``). The client
owns its privacy: its policy comes from its own node config, never from the server; its ledger is a
file in its state directory (node config ``state-dir``, else ``$FEDLORA_STATE_DIR``, else
``~/.local/state/fedlora``), written atomically once per DP round, with that round's event, before
training; merged with the events the server returns, and never silently replaced: a ledger that
cannot be read stops the client. A node
may bring its own data file (node config ``data-path``); errors about it stay in the node's log.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed.adapters import Clock
from fed.adapters.base import restrict_rank
from fed.data.node import NodeDataError
from fed.precision import model_device, resolve_precision
from fed.privacy.ledger import DpSgdEvent, Ledger, events_from_json, write_atomic
from fed.privacy.planner import new_ledger, plan_round
from fed.privacy.policy import Policy
from fed.privacy.release import public_metrics
from fed.ranks import client_rank
from fed.seeding import generator
from fed.session import client_session
from fed.train import evaluate, round_lr, train_round
from fed.wire import config_from_record, from_record, metas, to_sparse_record, usage_metrics

app = ClientApp()
log = logging.getLogger("flwr")  # Flower's logger: what the SuperNode's operator sees
gc.freeze()  # what is imported by now (torch, transformers, Flower: ~470k objects) lives as long as the process
# Frozen, it is skipped by every collection: the one after each reply (below) scans what came later (the
# model, Opacus, the data, the round: ~34k objects), ~20 ms, instead of every object in the process, ~0.3 s.
KNOWN_EVENTS = "known-events"
"""Config key under which the server returns the DP events it holds for the receiving client."""
STATE_DIR_ENV = "FEDLORA_STATE_DIR"
"""Where simulated clients keep their state (a simulation gives no per-node config): set by ``fed simulate``."""


def state_dir(node_config: Mapping[str, Any]) -> Path:
    """This node's state directory: chosen by whoever runs the node, never by the server."""
    explicit = node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(str(explicit))
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "fedlora"


def load_ledger(path: Path, fresh: Ledger, server_events: str) -> Ledger:
    """The client's ledger file (else ``fresh``), with the server's copy of its events merged in.

    A file that exists but cannot be read raises: starting from zero would spend the budget again.
    """
    ledger = fresh
    if path.is_file():
        try:
            ledger = Ledger.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"privacy ledger {path} is unreadable ({err}); refusing to train rather than "
                               "start a fresh budget. Repair or restore the file.") from err
    if server_events:
        try:
            ledger.merge(events_from_json(server_events))
        except (ValueError, KeyError, TypeError) as err:  # only ever adds events: ignoring it is safe
            log.warning("ignoring the server's malformed copy of this client's events: %s", err)
    return ledger


def _receive(msg: Message, context: Context):
    """Config, client id and the validated global adapter loaded into this worker's model."""
    config = msg.content.config_records["config"]
    cfg = config_from_record(config)
    partition_id = int(context.node_config.get("partition-id", 0))
    data_path = str(context.node_config.get("data-path", "")) or None  # the node's own file, if it has one
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if data_path is None and partitions != cfg.federation.num_clients:
        raise ValueError(f"this node is one of num-partitions={partitions}, but the run config says "
                         f"federation.num_clients={cfg.federation.num_clients}; make them equal "
                         "(e.g. flwr run --federation-config num-supernodes=N with federation.num_clients=N)")
    try:
        session = client_session(cfg, partition_id, data_path)
    except NodeDataError as err:  # details (they may quote the private file) stay in this node's log
        log.error("%s", err)
        raise ValueError(err.public) from None
    global_ = from_record(msg.content.array_records["arrays"], metas(session.adapter.sent_state()))
    session.adapter.load(global_)  # client_session handed the cached model back at full rank
    return cfg, int(config["server-round"]), partition_id, session, global_


def _reply(msg: Message, metrics: dict[str, int | float], dp: bool, arrays: ArrayRecord | None = None,
           reason: str = "") -> Message:
    content = RecordDict({"metrics": MetricRecord(public_metrics(metrics, dp))})
    if arrays is not None:
        content["arrays"] = arrays
    if reason:
        content["refusal"] = ConfigRecord({"reason": reason})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, round_, pid, session, global_ = _receive(msg, context)
    train_data = session.data.train
    config = msg.content.config_records["config"]
    path = state_dir(context.node_config) / f"ledger-{pid}.json"
    ledger = load_ledger(path, new_ledger(cfg.dp), str(config.get(KNOWN_EVENTS, "")))
    plan = plan_round(cfg.dp, ledger, num_examples=len(train_data), batch_size=cfg.train.batch_size,
                      local_steps=cfg.train.local_steps, rounds=cfg.federation.rounds, round_=round_,
                      policy=Policy.from_node_config(context.node_config), run=msg.metadata.run_id)
    dp = cfg.dp.enabled or bool(ledger.events)
    if plan.dp is not None and plan.steps > 0:  # booked before the first noisy step: a crash can only over-count
        ledger.record(DpSgdEvent(round_, plan.dp.noise_multiplier, plan.dp.sample_rate, plan.steps,
                                 msg.metadata.run_id))
    if dp:  # once per round: the pin, any merged events and this round's event, even if it trains nothing
        write_atomic(path, ledger.to_json())
    metrics: dict[str, int | float] = {"partition-id": pid, "round": round_, "num-examples": len(train_data),
                                       "fingerprint": session.adapter.fingerprint()}
    rank = client_rank(cfg.federation.client_ranks, pid, cfg.federation.num_clients, cfg.adapter.rank,
                       context.node_config)
    if rank is not None:
        metrics["rank"] = rank
    if plan.refused:
        return _reply(msg, {**metrics, "refused": 1, "epsilon": ledger.epsilon()}, dp, reason=plan.refused)
    if plan.steps == 0:
        return _reply(msg, {**metrics, "declined": 1, "epsilon": ledger.epsilon()}, dp)
    # the run's shared clock: sparsity schedules end every client's round at the budget the server expects
    session.adapter.begin_round(Clock(round_, cfg.federation.rounds, plan.steps))
    session.adapter.set_rank(rank)  # masks the components beyond this client's rank (fed/ranks.py)
    result = train_round(session.adapter, session.task, train_data, steps=plan.steps,
                         batch_size=cfg.train.batch_size, weight_decay=cfg.train.weight_decay,
                         lr=round_lr(cfg.train.lr, cfg.train.lr_schedule, round_, cfg.federation.rounds),
                         optimizer=cfg.train.optimizer, momentum=cfg.train.momentum,
                         precision=resolve_precision(cfg.train.precision, model_device(session.adapter.model).type),
                         micro_batch=cfg.train.micro_batch,
                         dp=plan.dp, gen=generator(cfg.seed, "batches", pid, round_))
    if plan.dp is None:  # loss, timing and expert counts are private statistics outside DP-SGD
        metrics |= {"train_loss": result.loss, "train_wall_s": result.wall_s} | usage_metrics(result.usage)
    else:
        metrics |= {"epsilon": ledger.epsilon(), "dp-noise-multiplier": plan.dp.noise_multiplier,
                    "dp-sample-rate": plan.dp.sample_rate, "dp-steps": plan.steps,
                    "secure-rng": 1}  # noise and sampling came from fed.privacy.secure_rng
        if result.released_loss is not None:  # privatised and inside the accounted mechanism
            metrics["dp-train-loss"] = result.released_loss
    local = session.adapter.sent_state()
    delta = {name: local[name] - global_[name] for name in global_}
    if rank is not None:  # DP noise (and weight decay) also moved the masked components: never send that
        delta = restrict_rank(delta, session.adapter.structure().rank_axes, rank)
    # line-sparse tensors (RoseLoRA) travel as their kept entries and masks: post-processing of the update
    arrays = to_sparse_record(delta, session.adapter.masks(), session.adapter.structure().lines, cfg.wire.dtype)
    gc.collect()  # Opacus hooks leave reference cycles; collect them so a long run's memory stays flat
    return _reply(msg, {**metrics, "steps": result.steps}, dp, arrays=arrays)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    cfg, round_, _, session, _ = _receive(msg, context)
    last = round_ >= cfg.federation.rounds  # the run's final score counts every held-out row
    scores = evaluate(session.adapter, session.task, session.data.test, batch_size=cfg.train.eval_batch_size,
                      limit=0 if last else cfg.train.max_eval_examples,
                      precision=resolve_precision(cfg.train.precision, model_device(session.adapter.model).type))
    metrics = {"num-examples": int(scores.pop("num_examples"))} | {f"eval_{k}": v for k, v in scores.items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
