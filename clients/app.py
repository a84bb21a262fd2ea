"""Flower ClientApp: decode the global adapter -> train locally (DP-SGD if enabled) -> send the delta.

The base model stays loaded between rounds in the worker process (see ``fed.session``). The privacy
ledger lives in the node's Flower context state, and also in ``<state-dir>/ledger-<id>.json`` when the
node config names a ``state-dir`` (a simulation's clients: ``$FEDLORA_STATE_DIR``), so it survives a
restarted SuperNode or a resumed run (older key: ``ledger-dir``, file ``client-<id>.json``).
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed.nodedata import NodeDataError
from fed.privacy.ledger import DpSgdEvent, Ledger, write_atomic
from fed.privacy.planner import new_ledger, plan_round, private_generator
from fed.seeding import generator
from fed.session import client_session
from fed.train import evaluate, train_round
from fed.wire import config_from_record, from_record, metas, to_record

app = ClientApp()
log = logging.getLogger("flwr")  # Flower's logger: what the SuperNode's operator sees
LEDGER_KEY = "privacy-ledger"
STATE_DIR_ENV = "FEDLORA_STATE_DIR"
"""Where simulated clients keep their state (a simulation gives no per-node config): set by ``fed simulate``."""


def _ledger_file(context: Context, partition_id: int) -> Path | None:
    state_dir = context.node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV)  # node's, or simulation's
    if state_dir:
        return Path(str(state_dir)) / f"ledger-{partition_id}.json"
    folder = context.node_config.get("ledger-dir")
    return Path(str(folder)) / f"client-{partition_id}.json" if folder else None


def load_ledger(context: Context, partition_id: int, fresh: Ledger) -> Ledger:
    """The client's ledger: from its context state, else from its file, else ``fresh``."""
    if LEDGER_KEY in context.state.config_records:
        return Ledger.from_json(str(context.state.config_records[LEDGER_KEY]["json"]))
    path = _ledger_file(context, partition_id)
    if path is not None and path.is_file():
        return Ledger.from_json(path.read_text())
    return fresh


def save_ledger(context: Context, partition_id: int, ledger: Ledger) -> None:
    context.state.config_records[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})
    path = _ledger_file(context, partition_id)
    if path is not None:
        write_atomic(path, ledger.to_json())


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
    session.adapter.load(global_)
    return cfg, int(config["server-round"]), partition_id, session, global_


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, round_, pid, session, global_ = _receive(msg, context)
    train_data = session.data.train
    ledger = load_ledger(context, pid, new_ledger(cfg.dp))
    plan = plan_round(cfg.dp, ledger, num_examples=len(train_data), batch_size=cfg.train.batch_size,
                      local_steps=cfg.train.local_steps, rounds=cfg.federation.rounds, round_=round_)
    metrics: dict[str, int | float] = {"partition-id": pid, "fingerprint": session.adapter.fingerprint(),
                                       "num-examples": len(train_data)}
    if plan.steps == 0:
        reply = RecordDict({"metrics": MetricRecord({**metrics, "declined": 1, "epsilon": ledger.epsilon()})})
        return Message(reply, reply_to=msg)
    gen = private_generator() if plan.dp else generator(cfg.seed, "batches", pid, round_)
    result = train_round(session.adapter, session.task, train_data, steps=plan.steps,
                         batch_size=cfg.train.batch_size, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                         dp=plan.dp, gen=gen)
    if plan.dp is not None:
        ledger.record(DpSgdEvent(round_, plan.dp.noise_multiplier, plan.dp.sample_rate, plan.steps))
        save_ledger(context, pid, ledger)
        metrics |= {"epsilon": ledger.epsilon(), "dp-noise-multiplier": plan.dp.noise_multiplier,
                    "dp-sample-rate": plan.dp.sample_rate, "dp-steps": plan.steps}
    local = session.adapter.sent_state()
    delta = {name: local[name] - global_[name] for name in global_}
    metrics |= {"train_loss": result.loss, "steps": result.steps, "train_wall_s": result.wall_s}
    gc.collect()  # Opacus hooks leave reference cycles; collect them so a long run's memory stays flat
    return Message(RecordDict({"arrays": to_record(delta), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    cfg, _, _, session, _ = _receive(msg, context)
    scores = evaluate(session.adapter, session.task, session.data.test, batch_size=cfg.train.eval_batch_size,
                      limit=cfg.train.max_eval_examples)
    metrics = {"num-examples": int(scores.pop("num_examples"))} | {f"eval_{k}": v for k, v in scores.items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
