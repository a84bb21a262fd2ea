"""The server under DP: only public fields are kept, events are booked once a reply is valid, under the
node bound to its partition id (a spoofing peer is dropped), each node's events go back to it alone,
every accountant input is bounded, and privacy.json is conservative and flags disagreements."""

from __future__ import annotations

import json
import math
import secrets

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fed.adapters import Aggregation, Structure
from fed.config import StrategyConfig
from fed.privacy.book import LedgerBook
from fed.privacy.client import BIND, KNOWN_PIN, NODE_RECORD
from fed.privacy.ledger import DpSgdEvent, Ledger, NodePin, epsilon, events_from_json
from fed.privacy.policy import Policy
from fed.wire import metas, to_record
from strategies.build import influence_stages, reply_stages
from strategies.core import AdapterStrategy, RoundPlan
from strategies.pipeline import AdapterModel, RoundLog
from strategies.privacy import PrivacyBookkeeping
from strategies.validation import ReplyRules
from tests.helpers import DP, reply_from

GLOBAL = {"l.lora_B.weight": torch.zeros(3, 2)}
FP = 7


pytestmark = pytest.mark.usefixtures("flower_identity")


def _dp_reply(node: int, cid: int, *, steps: int = 10, eps: float | None = None, **extra) -> Message:
    event = [DpSgdEvent(1, 1.1, 0.05, steps, 1)]
    metrics = {
        "partition-id": cid,
        "round": 1,
        "fingerprint": FP,
        "num-examples": 100,
        "steps": steps,
        "dp-steps": steps,
        "dp-noise-multiplier": 1.1,
        "dp-sample-rate": 0.05,
        "secure-rng": 1,
        "epsilon": epsilon(event, DP.delta, "rdp") if eps is None else eps,
        **extra,
    }
    return reply_from(node, {"l.lora_B.weight": torch.ones(3, 2)}, metrics)


def _strategy(
    book: LedgerBook, written: list, rules: ReplyRules = ReplyRules(fingerprint=FP, dp=DP)
) -> AdapterStrategy:
    model = AdapterModel(metas(GLOBAL), Structure({"l.lora_B.weight": Aggregation.MEAN}))
    s = AdapterStrategy(
        model=model,
        plan=RoundPlan(loss_metric="dp-train-loss"),
        stages=[
            *reply_stages(model, rules, book, lambda b: written.append(b.report())),
            *influence_stages(StrategyConfig(), math.inf),
        ],
    )
    s._global = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def test_dp_replies_keep_public_fields_only_and_a_dropped_reply_is_flagged_not_booked():
    book, written = LedgerBook(DP), []
    strategy = _strategy(book, written)
    leaky = _dp_reply(11, 0, train_loss=0.123, train_wall_s=4.2)
    bad_payload = _dp_reply(12, 1)
    bad_payload.content.array_records["arrays"] = to_record({"l.lora_B.weight": torch.ones(5)})
    _arrays, metrics = strategy.aggregate_train(1, [leaky, bad_payload])
    assert metrics is not None and "train_loss" not in metrics
    record = strategy.rounds[1]
    assert record.accepted == 1 and len(record.dropped) == 1
    assert set(book.ledgers) == {0}  # a dropped reply's claim books nothing (its own ledger counts it)
    assert any("node 12" in f and "not booked" in f for f in book.flags)
    assert written and set(written[-1]["clients"]) == {"0"}  # persisted before aggregation finished


def test_each_client_gets_its_own_events_back():
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    strategy.aggregate_train(1, [_dp_reply(11, 0, steps=10), _dp_reply(12, 1, steps=7)])
    record = RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": 2})})
    (privacy,) = (s for s in strategy.stages if isinstance(s, PrivacyBookkeeping))
    messages = [privacy.with_known_events(Message(record, dst_node_id=n, message_type="train")) for n in (11, 12, 13)]
    got = [m.content.config_records["config"].get("known-events") for m in messages]
    assert [e.steps for e in events_from_json(got[0])] == [10]
    assert [e.steps for e in events_from_json(got[1])] == [7]
    assert got[2] is None  # an unknown node gets nothing (and the shared record is untouched)
    assert "known-events" not in record.config_records["config"]


def test_report_is_conservative_and_flags_disagreements():
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    honest = _dp_reply(11, 0)
    over = _dp_reply(12, 1, eps=5.0)  # e.g. an earlier run on the same data the server never saw
    under = _dp_reply(13, 2, eps=0.01)
    strategy.rounds[1] = RoundLog(asked=[11, 12, 13, 14])  # as configure_train leaves it
    strategy.aggregate_train(1, [honest, over, under])
    report = book.report(cross_check=True)
    server = epsilon([DpSgdEvent(1, 1.1, 0.05, 10, 1)], DP.delta, "rdp")
    clients = report["clients"]
    assert clients["0"]["epsilon"] == pytest.approx(server) and clients["0"]["flags"] == []
    assert clients["1"]["epsilon"] == 5.0 and "larger figure" in clients["1"]["flags"][0]
    assert clients["2"]["epsilon"] == pytest.approx(server) and "under-reports" in clients["2"]["flags"][0]
    assert any("node 14" in f and "no reply" in f for f in report["flags"])
    assert clients["0"]["epsilon_prv"] < clients["0"]["epsilon_rdp"]
    assert "zero-out" in report["guarantee"] and report["rng"].startswith("ChaCha20")
    assert LedgerBook.from_json(book.to_json()).report(cross_check=True) == report


def test_mid_run_report_reaccounts_only_clients_with_new_events_and_only_the_runs_accountant(monkeypatch):
    import fed.privacy.book as book_module

    calls: list[tuple[int, str]] = []
    real = book_module.epsilon
    monkeypatch.setattr(
        book_module,
        "epsilon",
        lambda events, delta, acc: calls.append((len(list(events)), acc)) or real(events, delta, acc),
    )
    book = LedgerBook(DP)
    reply = {"dp-steps": 10, "dp-noise-multiplier": 1.1, "dp-sample-rate": 0.05, "epsilon": 0.5}
    for cid in range(3):
        book.observe(1, {"partition-id": cid, **reply})
    first = book.report()
    assert sorted(calls) == [(1, "rdp")] * 3 and first["clients"]["0"]["epsilon_prv"] is None
    calls.clear()
    book.observe(2, {"partition-id": 1, **reply})  # only client 1 trains again
    second = book.report()
    assert calls == [(2, "rdp")]  # the other two are not re-accounted
    assert second["clients"]["1"]["server_epsilon"] == pytest.approx(
        real([DpSgdEvent(1, 1.1, 0.05, 10), DpSgdEvent(2, 1.1, 0.05, 10)], DP.delta, "rdp")
    )
    final = book.report(cross_check=True)["clients"]["1"]
    assert final["epsilon_prv"] == pytest.approx(real(book.events(1), DP.delta, "prv"))
    assert final["epsilon_rdp"] == second["clients"]["1"]["epsilon_rdp"]


def test_malformed_events_never_enter_a_ledger():
    book = LedgerBook(DP)
    good = {"partition-id": 0, "dp-steps": 10, "dp-noise-multiplier": 1.0, "dp-sample-rate": 0.05, "epsilon": 1.0}
    book.observe(1, good)
    book.observe(2, {**good, "partition-id": 1, "dp-sample-rate": 7.0})
    book.observe(2, {**good, "partition-id": "x"})
    assert set(book.ledgers) == {0} and len(book.flags) == 2
    assert json.loads(json.dumps(book.report()))["clients"]["0"]["steps"] == 10


def test_a_second_node_claiming_a_bound_partition_id_is_dropped_books_nothing_and_gets_no_events():
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    strategy.aggregate_train(1, [_dp_reply(11, 0, steps=10)])
    strategy.aggregate_train(2, [_dp_reply(12, 0, steps=3, round=2), _dp_reply(11, 0, steps=7, round=2)])
    record = strategy.rounds[2]
    assert record.accepted == 1 and record.dropped == [
        "node 12: partition-id=0 is bound to node 11; node 12 cannot claim it"
    ]
    assert [e.steps for e in book.events(0)] == [10, 7]  # the honest node's own events only
    strategy.aggregate_train(3, [_dp_reply(11, 1, round=3)])  # one node, one client: it cannot take a second id
    assert strategy.rounds[3].dropped == ["node 11: node 11 is bound to partition-id=0; it cannot claim 1"]
    (privacy,) = (s for s in strategy.stages if isinstance(s, PrivacyBookkeeping))
    message = RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": 3})})
    sent = {n: privacy.with_known_events(Message(message, dst_node_id=n, message_type="train")) for n in (11, 12)}
    assert [e.steps for e in events_from_json(sent[11].content.config_records["config"]["known-events"])] == [10, 7]
    assert "known-events" not in sent[12].content.config_records["config"]


def _bound_with(token: str, reply: Message) -> Message:
    """``reply`` carrying the node's continuity token, as a node asked to bind sends it."""
    reply.content[NODE_RECORD] = ConfigRecord({"continuity-token": token})
    return reply


def test_a_partition_id_moves_to_a_new_node_only_with_its_continuity_token_and_the_book_flags_it():
    """An unauthenticated node restarted under a new node id takes its id back with the token in its state dir; a
    peer that waited for the honest node to leave has no token and is dropped, before and after a server restart."""
    token, forged = secrets.token_bytes(32).hex(), secrets.token_bytes(32).hex()
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    (privacy,) = (s for s in strategy.stages if isinstance(s, PrivacyBookkeeping))
    ask = RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": 1})})
    assert privacy.with_known_events(Message(ask, dst_node_id=11, message_type="train")).content.config_records[
        "config"
    ][BIND]  # an unbound node is asked for its token
    strategy.aggregate_train(1, [_bound_with(token, _dp_reply(11, 0))])
    assert book.tokens[0] != token and len(book.tokens[0]) == 64  # the server keeps a hash, never the token
    strategy.rounds[2] = RoundLog(connected=[11, 12])  # the bound node is still there: the claim is dropped
    strategy.aggregate_train(2, [_bound_with(token, _dp_reply(12, 0, round=2))])
    assert strategy.rounds[2].dropped == ["node 12: partition-id=0 is bound to node 11; node 12 cannot claim it"]
    strategy.rounds[3] = RoundLog(connected=[12, 13])  # node 11 left the SuperLink: a spoofer tries first
    strategy.aggregate_train(3, [_dp_reply(13, 0, round=3), _bound_with(forged, _dp_reply(14, 0, round=3))])
    assert len(strategy.rounds[3].dropped) == 2 and not strategy.rounds[3].accepted
    assert all("without the continuity token" in d for d in strategy.rounds[3].dropped)
    strategy.aggregate_train(3, [_bound_with(token, _dp_reply(12, 0, round=3))])  # the honest node, restarted
    assert strategy.rounds[3].accepted == 1 and "moved from node 11, gone, to node 12" in book.flags[-1]
    assert [e.round for e in book.events(0)] == [1, 3]
    resumed = _strategy(LedgerBook.from_json(book.to_json()), [])  # a server restart binds nothing afresh
    resumed.aggregate_train(4, [_dp_reply(13, 0, round=4)])
    assert "bound before the server restarted" in resumed.rounds[4].dropped[0]
    resumed.aggregate_train(5, [_bound_with(token, _dp_reply(12, 0, round=5))])
    assert resumed.rounds[5].accepted == 1


def test_the_old_spoofed_event_is_refused_before_any_accountant_and_the_final_cross_check_completes(monkeypatch):
    """sigma 0.05, q 1, 10^6 steps asked PRV for a petabyte; now validation drops the reply, the book
    refuses the event on its own, and no accountant ever sees it."""
    import fed.privacy.book as book_module

    seen: list[DpSgdEvent] = []
    real = book_module.epsilon

    def spy(events, delta, accountant):
        seen.extend(events := list(events))
        return real(events, delta, accountant)

    monkeypatch.setattr(book_module, "epsilon", spy)
    book = LedgerBook(DP)
    rules = ReplyRules(fingerprint=FP, local_steps=10, batch_size=5, dp=DP)
    strategy = _strategy(book, [], rules)
    spoof = {"dp-noise-multiplier": 0.05, "dp-sample-rate": 1.0, "epsilon": 0.0}
    strategy.aggregate_train(1, [_dp_reply(13, 5, steps=10**6, **spoof)])
    assert len(strategy.rounds[1].dropped) == 1 and 5 not in book.ledgers
    book.observe(1, {"partition-id": 5, "dp-steps": 10**6, **spoof})  # straight into the book, too
    assert 5 not in book.ledgers and "out of bounds" in book.flags[-1]
    book.observe(
        1, {"partition-id": 0, "dp-steps": 10, "dp-noise-multiplier": 1.1, "dp-sample-rate": 0.05, "epsilon": 1}
    )
    report = book.report(cross_check=True)
    assert report["clients"]["0"]["epsilon_prv"] > 0 and all(e.noise_multiplier >= 0.1 for e in seen)


def test_replayed_identical_events_count_as_often_as_they_happened():
    event = DpSgdEvent(2, 1.1, 0.05, 10, 1)
    client = Ledger("rdp", 1e-5, events=[event, event, event])  # round 2 replayed three times
    assert client.merge([event]) == 0 and len(client.events) == 3  # the server's copy of one is not a fourth
    lost = Ledger("rdp", 1e-5)
    assert lost.merge([event, event]) == 2  # a client that lost its file gets both back
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    for round_ in (1, 2):
        strategy.aggregate_train(round_, [_dp_reply(11, 0, round=round_)])
    assert [e.steps for e in book.events(0)] == [10, 10]
    assert book.server_epsilon(0) == pytest.approx(epsilon([event, event], DP.delta, "rdp"))


def _evaluation(node: int, metrics: dict) -> Message:
    msg = Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=1, message_type="evaluate")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_evaluate_replies_are_validated_before_they_are_averaged():
    strategy = _strategy(LedgerBook(DP), [])
    scores = {"num-examples": 10, "eval_accuracy": 0.8, "eval_loss": 0.5}
    honest = [_evaluation(n, {"partition-id": n, **scores}) for n in (1, 2, 3)]
    liar = _evaluation(4, {"partition-id": 4, "num-examples": 10**12, "eval_accuracy": 1e6, "eval_loss": 0.5})
    refusal = _evaluation(5, {"partition-id": 5, "refused": 1})
    metrics = strategy.aggregate_evaluate(1, [*honest, liar, refusal])
    assert metrics is not None and metrics["eval_accuracy"] == pytest.approx(0.8) and "partition-id" not in metrics
    assert strategy.rounds[1].evaluate["eval_examples"] == 30


def test_evaluate_replies_count_only_from_the_node_bound_to_their_partition_id(caplog):
    """A peer answering an evaluate message under a bound client's id (or without an id) is left out, with why."""
    strategy = _strategy(LedgerBook(DP), [])
    strategy.aggregate_train(1, [_dp_reply(11, 0), _dp_reply(12, 1)])
    honest = _evaluation(11, {"partition-id": 0, "num-examples": 10, "eval_accuracy": 0.8})
    spoofed = _evaluation(13, {"partition-id": 0, "num-examples": 1000, "eval_accuracy": 0.0})
    other = _evaluation(12, {"partition-id": 0, "num-examples": 1000, "eval_accuracy": 0.0})
    anonymous = _evaluation(14, {"num-examples": 1000, "eval_accuracy": 0.0})
    with caplog.at_level("WARNING", logger="strategies.core"):
        metrics = strategy.aggregate_evaluate(1, [honest, spoofed, other, anonymous])
    assert metrics is not None and metrics["eval_accuracy"] == pytest.approx(0.8)
    assert strategy.rounds[1].evaluate["eval_examples"] == 10
    assert "node 13 claims partition-id=0, bound to node 11" in caplog.text
    assert "node 12 claims partition-id=0, bound to node 11" in caplog.text
    assert "names no partition-id" in caplog.text


def _pinned(reply: Message, pin: NodePin | str) -> Message:
    """``reply`` carrying the node's pin, as a DP node's train reply does."""
    reply.content[NODE_RECORD] = ConfigRecord({"pin": pin if isinstance(pin, str) else pin.to_json()})
    return reply


def test_the_book_keeps_each_clients_checked_pin_returns_it_and_declares_the_reply_timing():
    """The pin (no secret) comes back to its own node only; privacy.json names the client whose operator set
    reply-delay 0, and a malformed pin is flagged, not kept."""
    policy = Policy(dp_required=True, max_epsilon=1.0, delta=1e-5, min_noise_multiplier=0.5, evaluate=False)
    split = {"test_fraction": 0.2, "seed": 3, "max_examples": 0, "labels": ["neg", "pos"]}
    book = LedgerBook(DP)
    strategy = _strategy(book, [])
    strategy.aggregate_train(
        1,
        [
            _pinned(_dp_reply(11, 0), NodePin(policy, split, 30.0)),
            _pinned(_dp_reply(12, 1), NodePin(policy, None, 0.0)),
            _pinned(_dp_reply(13, 2), '{"policy": {"delta": 2}, "split": null, "reply_delay": 0}'),
        ],
    )
    (privacy,) = (s for s in strategy.stages if isinstance(s, PrivacyBookkeeping))
    record = RecordDict({"config": ConfigRecord({"server-round": 2})})
    sent = privacy.with_known_events(Message(record, dst_node_id=11, message_type="train"))
    back = NodePin.from_json(sent.content.config_records["config"][KNOWN_PIN])
    assert back == NodePin(policy, split, 30.0)
    report = book.report()
    assert report["clients"]["0"]["pin"]["reply_delay"] == 30.0 and 2 not in book.pins
    assert "clients with reply-delay 0, whose processing time is visible: [1]" in report["timing"]
    assert "ceil(processing / D)" in report["timing"] and any("malformed pin" in f for f in book.flags)
    assert LedgerBook.from_json(book.to_json()).pins == book.pins


@pytest.mark.parametrize(
    "change",
    [
        {"delta": 0.0},
        {"max_epsilon": float("nan")},
        {"evaluate": "yes"},
        {"min_eval_rows": -1},
        {"secret": 5},
    ],
)
def test_a_pin_from_the_network_is_checked_field_by_field(change):
    good = json.loads(NodePin(Policy(), None, 1.0).to_json())
    with pytest.raises(ValueError):
        NodePin.from_json(json.dumps({**good, "policy": {**good["policy"], **change}}))
