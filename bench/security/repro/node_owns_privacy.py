"""Issue 34's reproductions against the current code: each probe prints the figure it measures now.

Ported from research/privacy-repro-2 (eval_split.py, server_validation.py 3-5, ledger_check.py S3-S7,
reply_fields.py's timing) to the restructured code. Every client-side probe drives the real ClientApp
(``clients.app.train`` / ``evaluate_global``) as a deployed node: no ``FEDLORA_POLICY``, so a node without
policy keys runs under the strict default. Run from the checkout:
``python -m bench.security.repro.node_owns_privacy`` (about a minute of CPU).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import resource
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.constants import DEFAULT_TTL
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_app
from bench.security.canary import Canary, Experiment
from fed.adapters import Aggregation, Structure
from fed.config import DPConfig, StrategyConfig
from fed.config.sources import resolve
from fed.privacy.book import LedgerBook
from fed.privacy.client import KNOWN_EVENTS, KNOWN_PIN, NODE_RECORD, POLICY_ENV
from fed.privacy.ledger import DpSgdEvent, Ledger, epsilon, events_to_json
from fed.session import adapted_model
from fed.wire import config_record, metas, to_record
from strategies.build import influence_stages, reply_stages
from strategies.core import AdapterStrategy
from strategies.pipeline import AdapterModel, Reply, RoundLog, RoundState
from strategies.privacy import PrivacyBookkeeping
from strategies.validation import ReplyRules

N = 60
NO_GRID = {"reply-delay": "0"}
"""Probes other than the timing one answer at once (the default 30 s grid would only make them slow)."""


def _message(kind: str, cfg, round_: int, arrays: dict[str, torch.Tensor], known: str = "") -> Message:
    extra = {"server-round": round_} | ({"known-events": known} if known else {})
    content = RecordDict({"arrays": to_record(arrays), "config": config_record(cfg, **extra)})
    return Message(content, dst_node_id=1, message_type=kind)


def _call(kind: str, cfg, node: dict, round_: int = 1, head_bias: list[float] | None = None):
    """The node's reply metrics to one message (its error text when it raises)."""
    arrays = adapted_model(cfg)[0].sent_state()
    if head_bias is not None:
        arrays = {n: (torch.zeros_like(t) if n.endswith("classifier.weight") else t) for n, t in arrays.items()}
        arrays = {n: (torch.tensor(head_bias) if n.endswith("classifier.bias") else t) for n, t in arrays.items()}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    handler = client_app.train if kind == "train" else client_app.evaluate_global
    try:
        return dict(handler(_message(kind, cfg, round_, arrays), context).content.metric_records["metrics"])
    except ValueError as err:
        return str(err)


def evaluation(tmp: Path) -> None:
    """eval_split.py: scores on rows the server picks, per-row labels, the error oracle."""
    rng = random.Random(7)
    words = ["film", "plot", "actor", "scene", "music", "story", "ending", "cast", "script", "camera"]
    rows = [{"text": f"row{i} " + " ".join(rng.choice(words) for _ in range(5)), "label": rng.choice(["neg", "pos"])}
            for i in range(N)]  # fmt: skip
    path = tmp / "node0.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    seen: dict[str, set[str]] = {"train": set(), "scored": set()}
    real_train, real_evaluate = client_app.train_round, client_app.evaluate

    def spy(key, real):
        def wrapped(adapter, task, data, **kwargs):
            seen[key] |= {t.split()[0] for t in data["text"]}
            return real(adapter, task, data, **kwargs)

        return wrapped

    client_app.train_round, client_app.evaluate = spy("train", real_train), spy("scored", real_evaluate)
    cfg = resolve("quickstart", ["model.name=tiny-bert", "data.labels=neg,pos", "adapter.kind=ffa-lora",
                                 "adapter.rank=4", "federation.num_clients=1", "federation.rounds=3",
                                 "train.local_steps=2", "train.batch_size=8", "dp.enabled=true",
                                 "dp.target_epsilon=1", "dp.delta=1e-5"])  # fmt: skip
    for label, keys in [("strict default", {}), ("policy evaluate=true", {"evaluate": "true", "min-eval-rows": "5"})]:
        for key in seen:
            seen[key].clear()
        state = tmp / f"state-{len(keys)}"
        node = {"partition-id": 0, "data-path": str(path), "state-dir": str(state), "fresh-start": "true", **keys}
        node |= NO_GRID
        m = _call("train", cfg, node)
        e = _call("evaluate", cfg.with_overrides({"seed": 1, "data.test_fraction": 0.9}), node, 3)
        scored = e.get("num-examples", 0) if isinstance(e, dict) else 0
        print(
            f"(1)(2) {label}: DP round trained {m.get('dp-steps')} steps; evaluate with seed 1 / test_fraction 0.9 "
            f"-> {'refused' if e.get('refused') else f'scores over {scored} rows'}; DP training rows scored: "
            f"{len(seen['train'] & seen['scored'])} (before: 43 of 54)"
        )
        sizes = []
        for seed in range(N):  # one-row queries with a crafted head; before: 48/48 labels recovered
            q = cfg.with_overrides({"seed": seed, "train.max_eval_examples": 1, "federation.rounds": 1000})
            e = _call("evaluate", q, node, 1, head_bias=[-8.0, 8.0])
            if isinstance(e, dict) and not e.get("refused"):
                sizes.append(e["num-examples"])
        print(
            f"(3) {label}: {N} one-row queries (other seeds, max_eval_examples=1, crafted head): {len(sizes)} "
            f"answered, rows per answer {sorted(set(sizes))}; training rows ever scored: "
            f"{len(seen['train'] & seen['scored'])} (before: 48/48 training labels recovered)"
        )
    client_app.train_round, client_app.evaluate = real_train, real_evaluate
    probe = cfg.with_overrides({"data.labels": "neg,pos,meh"})
    for label, keys, first in [("DP node", {}, cfg), ("opted-out non-DP node", {"dp-opt-out": "true"}, None)]:
        outcomes = []
        for extra in ([], [{"text": "film plot cast", "label": "flu"}]):
            p2 = tmp / f"node-{len(keys)}-{len(extra)}.csv"
            with p2.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows(rows + extra)
            state = tmp / f"o{len(keys)}-{len(extra)}"
            node = {"partition-id": 0, "data-path": str(p2), "state-dir": str(state), "fresh-start": "true", **keys}
            node |= NO_GRID
            if first is not None:  # first contact with the run's labels (the 'flu' file already errs here)
                _call("train", first, node)
            e = _call("evaluate", probe if first else probe.with_overrides({"dp.enabled": False}), node)
            outcomes.append("answers" if isinstance(e, dict) else f"error {e!r}")
        print(f"(4) error oracle, {label}, probe labels neg,pos,meh: file without the 'flu' row -> {outcomes[0]}; "
              f"with it -> {outcomes[1]} (before: answers / error naming the label set)")  # fmt: skip


def _reply(node: int, cid: int, **metrics) -> Message:
    base = {"partition-id": cid, "round": 1, "num-examples": 100, "fingerprint": 3, "steps": 5, "secure-rng": 1,
            "dp-steps": 5, "dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "epsilon": 1.0}  # fmt: skip
    content = RecordDict({"metrics": MetricRecord({**base, **metrics}), "arrays": to_record(_DELTA)})
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _bound(reply: Message, token: str) -> Message:
    """``reply`` carrying a continuity token, as a node the server asked to bind sends it."""
    reply.content[NODE_RECORD] = ConfigRecord({"continuity-token": token})
    return reply


def _evaluation(node: int, cid: int, rows: int, accuracy: float) -> Message:
    scores = MetricRecord({"partition-id": cid, "num-examples": rows, "eval_accuracy": accuracy, "eval_loss": 0.5})
    msg = Message(RecordDict({"metrics": scores}), dst_node_id=1, message_type="evaluate")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


_GLOBAL = {"l.lora_B.weight": torch.zeros(4, 3), "head.bias": torch.zeros(2)}
_DELTA = {n: torch.full(t.shape, 0.03) for n, t in _GLOBAL.items()}


def _strategy(dp: DPConfig, book: LedgerBook) -> AdapterStrategy:
    model = AdapterModel(metas(_GLOBAL), Structure({n: Aggregation.MEAN for n in _GLOBAL}))
    rules = ReplyRules(fingerprint=3, local_steps=5, batch_size=10, rounds=3, dp=dp)
    s = AdapterStrategy(
        model=model, stages=[*reply_stages(model, rules, book), *influence_stages(StrategyConfig(), 1.0)]
    )
    s._global = {n: t.clone() for n, t in _GLOBAL.items()}
    return s


def server() -> None:
    """server_validation.py (3)-(5): a spoofing peer, evaluate replies, the PRV cross-check."""
    dp = DPConfig(enabled=True, noise_multiplier=1.0)
    book = LedgerBook(dp)
    s = _strategy(dp, book)
    s.aggregate_train(1, [_reply(1001, 0), _reply(1002, 0)])
    print(
        f"(3) two nodes claiming partition-id 0: accepted {s.rounds[1].accepted}, dropped "
        f"{s.rounds[1].dropped} (before: both accepted)"
    )
    book = LedgerBook(dp)
    s = _strategy(dp, book)
    spoof = {"dp-noise-multiplier": 0.05, "dp-sample-rate": 1.0, "dp-steps": 10**6, "epsilon": 0.0}
    s.aggregate_train(1, [_reply(1001, 0), _reply(1002, 0, **spoof)])
    s.aggregate_train(2, [_reply(1003, 7, round=2, **spoof)])  # an unbound id: validation refuses the event
    own = epsilon([DpSgdEvent(1, 1.0, 0.1, 5)], dp.delta, "rdp")
    c0 = book.report()["clients"]["0"]
    (privacy,) = (x for x in s.stages if isinstance(x, PrivacyBookkeeping))
    nxt = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=1002, message_type="train")
    known = privacy.with_known_events(nxt).content.config_records["config"].get("known-events", "")
    print(
        f"    spoofed event (sigma 0.05, q 1, 10^6 steps): client 0's epsilon {c0['epsilon']:.4g} (its own event: "
        f"{own:.3f}; before: 2.2e8), events {len(c0['events'])}, known-events sent to the spoofer: {known!r}, "
        f"clients booked {sorted(book.report()['clients'])}"
    )
    ev = []
    for node, (n, acc) in enumerate([(100, 0.80), (100, 0.82), (100, 0.79), (10**12, 1e6)]):
        ev.append(_evaluation(2000 + node, 10 + node, n, acc))
    print(
        f"(4) evaluate: 3 honest at ~0.80 and one claiming 10^12 rows at 1e6: round's eval_accuracy "
        f"{s.aggregate_evaluate(1, ev)['eval_accuracy']:.4g} (before: 1e+06)"
    )
    s = _strategy(dp, LedgerBook(dp))
    s.aggregate_train(1, [_reply(1001, 0)])
    honest, spoofed = _evaluation(1001, 0, 10, 0.80), _evaluation(1002, 0, 1000, 0.0)
    print(
        f"    gap 3: node 1001 bound to partition-id 0 scores 0.80 on 10 rows, node 1002 claims partition-id 0 with "
        f"1000 rows at 0.0: round's eval_accuracy {s.aggregate_evaluate(1, [honest, spoofed])['eval_accuracy']:.4g} "
        "(before: 0.0079, the spoofed reply averaged in)"
    )
    s = _strategy(dp, LedgerBook(dp))
    token = secrets.token_bytes(32).hex()
    s.aggregate_train(1, [_bound(_reply(1001, 0), token)])
    s.rounds[2] = RoundLog(connected=[1002, 1003])  # node 1001 left the SuperLink
    s.aggregate_train(2, [_reply(1003, 0, round=2), _bound(_reply(1002, 0, round=2), secrets.token_bytes(32).hex())])
    spoofers = (s.rounds[2].accepted, len(s.rounds[2].dropped))
    s.aggregate_train(2, [_bound(_reply(1004, 0, round=2), token)])  # 1001 restarted under a new node id
    print(
        f"    gap 4: partition-id 0's node left; a peer without the token and one with a wrong token: accepted "
        f"{spoofers[0]}, dropped {spoofers[1]} (before: the first claim accepted); the honest node restarted "
        f"under a new id with its token: accepted {s.rounds[2].accepted - spoofers[0]}"
    )
    limit = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, limit[1]))
    try:
        book.observe(1, {"partition-id": 0, **spoof})  # straight into the book as well
        book.report(cross_check=True)
        print(f"(5) end-of-run report with the PRV cross-check: written, flags {book.flags[-1:]} (before: MemoryError)")
    except MemoryError as err:
        print(f"(5) end-of-run report: MemoryError {err}")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limit)


def ledgers(tmp: Path) -> None:
    """ledger_check.py S3-S7 through the real ClientApp (the canary's session, n = 41, q = 8/41)."""
    exp = Experiment(Canary())
    data = exp.canary.data(True)
    base = exp.cfg.with_overrides({"dp.noise_multiplier": 0.0, "dp.target_epsilon": 1.0, "federation.rounds": 5})
    policy = {"delta": "1e-3", "max-epsilon": "1"}  # the operator's own cap of 1 at the canary's delta

    def ask(state: Path, cfg=base, round_: int = 1, known: str = "", node: dict | None = None) -> dict:
        fresh = {} if state.exists() else {"fresh-start": "true"}  # first contact: the operator starts it
        state.mkdir(parents=True, exist_ok=True)
        keys = NO_GRID | (node if node is not None else policy | fresh)
        reply = exp.ask(data, {"state-dir": str(state), **keys}, cfg, round_, known)
        return dict(reply.content.metric_records["metrics"])

    def spent(events: list[DpSgdEvent]) -> str:
        rdp, prv = (epsilon(events, base.dp.delta, acc) for acc in ("rdp", "prv"))
        return f"RDP {rdp:.3f} PRV {prv:.3f} (cap 1) {'OVERRUN' if min(rdp, prv) > 1.0001 else 'ok'}"

    def add(events: list, m: dict, round_: int) -> None:
        if m.get("dp-steps"):
            events.append(DpSgdEvent(round_, m["dp-noise-multiplier"], m["dp-sample-rate"], m["dp-steps"]))

    s, events = tmp / "s3", []
    for r in range(1, 6):
        add(events, ask(s, round_=r), r)
    shutil.rmtree(s)
    s.mkdir()
    m = ask(s, round_=1, node=policy)  # lost disk, no history returned, no confirmation
    add(events, m, 1)
    print(
        f"S3 state dir lost, no events returned: after the loss {'refused' if m.get('refused') else 'TRAINED'}; "
        f"all events {spent(events)} (before: PLD 1.245, OVERRUN)"
    )
    s, events = tmp / "s4", []
    add(events, ask(s, round_=1), 1)
    copy = (s / "ledger-0.json").read_text()
    for r in range(2, 6):
        add(events, ask(s, round_=r), r)
    (s / "ledger-0.json").write_text(copy)
    for r in range(1, 6):
        add(events, ask(s, round_=r), r)
    print(
        f"S4 round-1 ledger restored, server returns nothing: all events {spent(events)} (before: 1.177, OVERRUN; "
        "residual: a restored file is a confirmed state, see docs/privacy.md)"
    )
    s, events = tmp / "s4b", []
    held: list[DpSgdEvent] = []
    add(held, ask(s, round_=1), 1)
    copy = (s / "ledger-0.json").read_text()
    for r in range(2, 6):
        add(held, ask(s, round_=r, known=events_to_json(held)), r)
    (s / "ledger-0.json").write_text(copy)
    events = list(held)
    for r in range(1, 6):
        m = ask(s, round_=r, known=events_to_json(held))
        add(events, m, r)
        add(held, m, r)
    print(f"S4' the same with an honest server returning its copy: all events {spent(events)}")
    s = tmp / "s5"
    for r in (1, 2, 2, 2, 3):
        ask(s, round_=r)
    ev = Ledger.from_json((s / "ledger-0.json").read_text()).events
    merged = Ledger("rdp", 1e-3)
    merged.merge(ev)
    merged.merge(ev)
    print(
        f"S5 round 2 replayed 3x: file holds {len(ev)} events; merged twice into an empty ledger: "
        f"{len(merged.events)} (before: a merge kept {len(set(ev))})"
    )
    s = tmp / "s7"
    ask(s, round_=1)
    book = events_to_json(Ledger.from_json((s / "ledger-0.json").read_text()).events)
    shutil.rmtree(s)
    s.mkdir()
    off = base.with_overrides({"dp.enabled": False})
    m = ask(s, off, 2, known=book, node={"dp-opt-out": "true"})
    print(
        f"S7b state lost, server returns the events and sends dp off (even to an opted-out node): "
        f"{'refused' if m.get('refused') else 'TRAINED WITHOUT DP'}; reply keys {sorted(m)} "
        "(before: trained without DP)"
    )
    m = ask(tmp / "s7c", off, node={"fresh-start": "true"})
    print(
        f"S7c node without a policy, server never enables DP: {'refused' if m.get('refused') else 'trained'}; "
        f"reply keys {sorted(m)} (before: train_loss, train_wall_s sent)"
    )
    m = ask(
        tmp / "s7d", base.with_overrides({"dp.target_epsilon": 1000.0, "dp.delta": 1e-5}), node={"fresh-start": "true"}
    )
    print(
        f"S7d node without a policy, DP round asks target 1000: {'refused' if m.get('refused') else 'accepted'}, "
        f"epsilon {m.get('epsilon', 0):.2f} (before: accepted, 252.44)"
    )


def timing(tmp: Path) -> None:
    """reply_fields.py's timing: created_at of the reply minus the request's, as the server reads it off the reply
    (the request's ttl less the reply's), on the default grid (30 s), a 0.4 s grid, and with the operator's
    explicit reply-delay 0."""
    exp = Experiment(Canary())
    for delay, rounds in ((None, 1), ("0.4", 3), ("0", 2)):
        node = {"state-dir": str(tmp / f"t{delay}"), "delta": "1e-3", "fresh-start": "true"}
        node |= {} if delay is None else {"reply-delay": delay}
        gaps = []
        for r in range(1, rounds + 1):
            reply = exp.ask(exp.canary.data(True), node, round_=r)  # the request has Flower's default ttl
            gaps.append(f"{DEFAULT_TTL - reply.metadata.ttl:.3f}")
        label = "default (30 s grid)" if delay is None else f"reply-delay={delay}"
        print(f"timing, {label}: reply created_at - request time = {gaps} s (before, default: the processing time)")


def pin(tmp: Path) -> None:
    """Gap 1: a node that lost its state dir gets the server's copy (events and, now, its pin) back and is asked
    for a larger target than its first DP round pinned (4 after 1; the strict default allows 8)."""
    exp = Experiment(Canary())
    data = exp.canary.data(True)
    first = exp.cfg.with_overrides({"dp.noise_multiplier": 0.0, "dp.target_epsilon": 1.0, "federation.rounds": 5})
    node = {"state-dir": str(tmp / "pin"), "delta": "1e-3"} | NO_GRID
    reply = exp.ask(data, node | {"fresh-start": "true"}, first)
    privacy = PrivacyBookkeeping(LedgerBook(first.dp))
    state = RoundState(1, RoundLog(), {}, {})
    privacy.arrive(state, Reply(reply))
    privacy.accepted(state, Reply(reply))
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    kept = dict(privacy.with_known_events(ask).content.config_records["config"])
    shutil.rmtree(tmp / "pin")
    looser = first.with_overrides({"dp.target_epsilon": 4.0})
    m = dict(exp.ask(data, node, looser, 2, str(kept.get(KNOWN_EVENTS, ""))).content.metric_records["metrics"])
    without_pin = "refused" if m.get("refused") else f"TRAINED, epsilon {m.get('epsilon', 0):.3f}"
    shutil.rmtree(tmp / "pin")  # lost again: this time the whole copy comes back
    m = dict(exp.ask(data, node, looser, 2, kept[KNOWN_EVENTS], kept[KNOWN_PIN]).content.metric_records["metrics"])
    print(
        f"gap 1: state lost, server returns {sorted(kept)}; target 4 after a pinned 1: with events only (all the "
        f"server kept before) "
        f"{without_pin}; with the pin {'refused' if m.get('refused') else 'TRAINED'} "
        "(cap 1)"
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    logging.getLogger("fed.privacy.release").setLevel(logging.CRITICAL)
    os.environ.pop(POLICY_ENV, None)  # a deployed node: its policy is its own
    for key in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, key, 1)
    tmp = Path(tempfile.mkdtemp())
    evaluation(tmp)
    server()
    ledgers(tmp)
    pin(tmp)
    timing(tmp)


if __name__ == "__main__":
    main()
