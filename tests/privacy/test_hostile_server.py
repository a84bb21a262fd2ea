"""A hostile server against real ClientApps: it sends, message after message, every request it could
(DP off, a huge epsilon, other seeds and fractions, other labels, one-row evaluation with a crafted head,
replays, a forged history, withheld history after the node lost its disk) to a node with its own data
file, once with no policy (a deployed node's strict default) and once with its operator's policy.

The properties are checked against what the node actually did, spied at the two places rows are read
(``train_round`` and ``evaluate`` in ``clients.app``), and against an accountant called here directly:
no row the node trained on is ever scored, every reply carries only the public fields, and the node's
ledger (recomposed with Opacus's RDP accountant) stays within its policy and counts every release.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

import clients.app as client_app
from fed.config.sources import resolve
from fed.privacy.book import LedgerBook
from fed.privacy.client import KNOWN_EVENTS, KNOWN_PIN, NODE_RECORD, NOT_CONFIRMED, POLICY_ENV, node_policy
from fed.privacy.ledger import DpSgdEvent, Ledger, events_to_json
from fed.privacy.policy import REPLY_DELAY, STRICT
from fed.privacy.release import PUBLIC_UNDER_DP
from fed.session import adapted_model
from fed.wire import config_record, to_record
from strategies.pipeline import Reply, RoundLog, RoundState
from strategies.privacy import PrivacyBookkeeping

N = 60
HONEST = [
    "model.name=tiny-bert",
    "data.labels=neg,pos",
    "adapter.kind=ffa-lora",
    "adapter.rank=4",
    "federation.num_clients=1",
    "federation.rounds=3",
    "train.local_steps=2",
    "train.batch_size=8",
    "dp.enabled=true",
    "dp.target_epsilon=1",
    "dp.delta=1e-5",
]
POLICIES = {
    "no policy (strict default)": ({}, STRICT.max_epsilon),
    "operator's policy": ({"max-epsilon": "2", "evaluate": "true", "min-eval-rows": "5"}, 2.0),
}


def _cfg(*extra: str):
    return resolve("quickstart", [*HONEST, *extra])


@pytest.fixture
def node_file(tmp_path: Path) -> Path:
    """Sixty rows, each text naming its row (``row17 ...``) so the spies can tell which rows were read."""
    rng = random.Random(7)
    words = ["film", "plot", "actor", "scene", "music", "story", "ending", "cast"]
    path = tmp_path / "node.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for i in range(N):
            writer.writerow(
                {"text": f"row{i} " + " ".join(rng.choices(words, k=5)), "label": rng.choice(["neg", "pos"])}
            )
    return path


class Spy:
    """Which rows the node trained on and which it scored, read where the ClientApp hands them over."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trained: set[str] = set()
        self.scored: set[str] = set()
        real_train, real_evaluate = client_app.train_round, client_app.evaluate

        def train_round(adapter, task, data, **kwargs):
            self.trained |= {t.split()[0] for t in data["text"]}
            return real_train(adapter, task, data, **kwargs)

        def evaluate(adapter, task, data, **kwargs):
            self.scored |= {t.split()[0] for t in data["text"]}
            return real_evaluate(adapter, task, data, **kwargs)

        monkeypatch.setattr(client_app, "train_round", train_round)
        monkeypatch.setattr(client_app, "evaluate", evaluate)


def _request(kind: str, cfg, round_: int, known: str = "", head_bias: list[float] | None = None, **server) -> Message:
    """A message of the server's (``server``: further config keys, e.g. what the book returns)."""
    adapter, _ = adapted_model(cfg)
    arrays = adapter.sent_state()
    if head_bias is not None:  # a head that answers the same class whatever the row, or a crafted one
        arrays = {n: (torch.zeros_like(t) if n.endswith("classifier.weight") else t) for n, t in arrays.items()}
        arrays = {n: (torch.tensor(head_bias) if n.endswith("classifier.bias") else t) for n, t in arrays.items()}
    extra = {"server-round": round_} | ({"known-events": known} if known else {}) | server
    content = RecordDict({"arrays": to_record(arrays), "config": config_record(cfg, **extra)})
    return Message(content, dst_node_id=1, message_type=kind)


def _answer(message: Message, node: dict):
    """The ClientApp's reply to ``message`` (an error reply's text when it raises)."""
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    handler = client_app.train if message.metadata.message_type == "train" else client_app.evaluate_global
    try:
        return handler(message, context)
    except ValueError as err:  # what Flower turns into the error reply's text
        return str(err)


def _send(kind: str, cfg, node: dict, round_: int, known: str = "", head_bias: list[float] | None = None, **server):
    return _answer(_request(kind, cfg, round_, known, head_bias, **server), node)


FORGED = events_to_json([DpSgdEvent(1, 0.05, 1.0, 10**6, 1)])  # the spoofed event of the old book, as history

SCRIPT = [  # (kind, config overrides, round, known-events, head bias)
    ("train", [], 1, "", None),
    ("evaluate", ["seed=1", "data.test_fraction=0.9"], 3, "", None),  # another split: DP rows as "held out"
    ("evaluate", ["train.max_eval_examples=1", "federation.rounds=1000"], 1, "", [-8.0, 8.0]),  # one-row query
    ("train", ["dp.enabled=false"], 2, "", None),  # DP switched off: raw loss and timing would come back
    ("train", ["dp.target_epsilon=1000"], 2, "", None),
    ("train", ["seed=5", "data.test_fraction=0.9", "data.max_examples=10"], 2, "", None),  # re-split to train
    ("train", [], 2, "", None),
    ("train", [], 2, "", None),  # a replay of the same round
    ("train", [], 3, FORGED, None),  # a history that would crash an accountant or stop the node
    ("train", ["data.labels=neg,flu"], 3, "", None),  # other labels: refused whatever the file holds
    ("evaluate", [], 3, "", None),
]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_hostile_server_reads_no_training_row_and_overruns_no_policy(
    policy, node_file, tmp_path, monkeypatch, flower_identity, caplog
):
    monkeypatch.delenv(POLICY_ENV, raising=False)  # a deployed node: its policy is its own
    keys, cap = POLICIES[policy]
    state = tmp_path / "state"
    node = {"partition-id": 0, "data-path": str(node_file), "state-dir": str(state), "fresh-start": "true", **keys}
    node["reply-delay"] = "0"  # the grid is tested below; here it would only add 30 s to every message
    spy = Spy(monkeypatch)
    replies = []
    with caplog.at_level(logging.ERROR, logger="flwr"):
        for kind, overrides, round_, known, head in SCRIPT:
            replies.append((kind, overrides, _send(kind, _cfg(*overrides), node, round_, known, head)))

    # no training row is ever scored, whatever split, fraction or subset a message asked for
    assert spy.trained and not spy.trained & spy.scored
    ledger = Ledger.from_json((state / "ledger-0.json").read_text())
    assert ledger.split is not None

    released: Counter[tuple[float, float, int]] = Counter()
    for kind, overrides, reply in replies:
        if isinstance(reply, str):  # only the label change errs, and with the one generic text
            assert overrides == ["data.labels=neg,flu"] and reply == client_app.NODE_CANNOT_ANSWER
            continue
        metrics = dict(reply.content.metric_records["metrics"])
        assert set(metrics) <= PUBLIC_UNDER_DP | {"num-examples", "eval_loss", "eval_accuracy"}, metrics
        assert "train_loss" not in metrics and "train_wall_s" not in metrics
        if kind == "evaluate" and not metrics.get("refused"):
            assert policy == "operator's policy"  # the strict default answers no evaluation under DP
            assert metrics["num-examples"] == N - len(spy.trained) >= 5  # every held-out row, never a chosen one
        if "arrays" in reply.content.array_records:
            released[(metrics["dp-noise-multiplier"], metrics["dp-sample-rate"], metrics["dp-steps"])] += 1
        if overrides in (["dp.enabled=false"], ["dp.target_epsilon=1000"]):
            assert metrics.get("refused") == 1 and "arrays" not in reply.content.array_records
    assert "pinned ('neg', 'pos') at first contact" in caplog.text  # the detail is in the node's log only

    # each release is in the ledger, the replay counted as often as it happened
    booked = Counter((e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.events)
    assert sum(released.values()) >= 3 and not released - booked
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.events]
    assert accountant.get_epsilon(delta=1e-5) <= min(cap, 1.0) * (1 + 1e-6)

    # the node loses its disk and the server withholds its history: no DP work until its operator confirms
    shutil.rmtree(state)
    lost = {k: v for k, v in node.items() if k != "fresh-start"}
    reply = _send("train", _cfg(), lost, 3)
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics.get("refused") == 1 and "arrays" not in reply.content.array_records
    assert reply.content.config_records["refusal"]["reason"] == NOT_CONFIRMED


def test_a_node_that_opted_out_says_so_in_its_log_and_trains_without_dp(
    node_file, tmp_path, monkeypatch, flower_identity, caplog
):
    """The one way a deployed node trains without DP: its operator's explicit, logged opt-out."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    node = {"partition-id": 0, "data-path": str(node_file), "state-dir": str(tmp_path), "dp-opt-out": "true"}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = _send("train", _cfg("dp.enabled=false"), node, 1)
    assert "dp-opt-out=true" in caplog.text
    assert math.isfinite(reply.content.metric_records["metrics"]["train_loss"])


def _server_keeps(privacy: PrivacyBookkeeping, reply: Message, round_: int) -> dict:
    """Book ``reply`` as the server's privacy stage does (it arrives from node 1 and is accepted), and return
    what the server adds to that node's next train message."""
    state = RoundState(round_, RoundLog(), {}, {})
    privacy.arrive(state, Reply(reply))
    privacy.accepted(state, Reply(reply))
    nxt = privacy.with_known_events(
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    )
    return dict(nxt.content.config_records["config"])


def test_a_node_that_lost_its_state_restores_its_whole_pin_from_the_servers_copy(
    node_file, tmp_path, monkeypatch, flower_identity
):
    """The server keeps the pin with the events: after the loss a request looser than the pin (target 4 after
    a first run at target 1, both within the strict default's 8) is refused, and evaluation stays off (the old
    held-out draw is gone with the secret, so the node can no longer tell which rows it trained on)."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    state = tmp_path / "state"
    node = {"partition-id": 0, "data-path": str(node_file), "state-dir": str(state), "reply-delay": "0",
            "evaluate": "true", "min-eval-rows": "5"}  # fmt: skip
    privacy = PrivacyBookkeeping(LedgerBook(_cfg().dp))
    reply = _send("train", _cfg(), {**node, "fresh-start": "true"}, 1)
    assert reply.content.metric_records["metrics"]["dp-steps"] > 0
    pinned = Ledger.from_json((state / "ledger-0.json").read_text()).policy
    kept = _server_keeps(privacy, reply, 1)
    assert set(kept) == {KNOWN_EVENTS, KNOWN_PIN} and "secret" not in kept[KNOWN_PIN]
    shutil.rmtree(state)  # the node loses its disk; the server returns its copy
    looser = _send("train", _cfg("dp.target_epsilon=4"), node, 2, **kept)
    metrics = dict(looser.content.metric_records["metrics"])
    assert metrics.get("refused") == 1 and "arrays" not in looser.content.array_records
    assert "dp.target_epsilon=4 exceeds this client's limit 1" in looser.content.config_records["refusal"]["reason"]
    restored = Ledger.from_json((state / "ledger-0.json").read_text())
    assert restored.policy is not None and pinned is not None
    assert restored.policy == replace(pinned, evaluate=False) and restored.split is not None
    honest = _send("train", _cfg(), node, 2, **kept)  # the pinned settings themselves still train
    assert honest.content.metric_records["metrics"]["dp-steps"] > 0
    scored = _send("evaluate", _cfg(), node, 2)
    assert scored.content.metric_records["metrics"].get("refused") == 1


def test_a_dp_reply_leaves_on_the_grid_of_the_nodes_reply_delay(node_file, tmp_path, monkeypatch, flower_identity):
    """Through the real ClientApp: the reply's created_at less the request's is a whole multiple of reply-delay
    (at least one), whatever the round took; a deployed node without the key uses the default grid, and a
    simulated node none."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    grid = 0.4
    node = {"partition-id": 0, "data-path": str(node_file), "state-dir": str(tmp_path), "fresh-start": "true",
            "reply-delay": str(grid)}  # fmt: skip
    for round_ in (1, 2):
        request = _request("train", _cfg(), round_)
        reply = _answer(request, node)
        assert reply.content.metric_records["metrics"]["dp-steps"] > 0
        steps = (reply.metadata.created_at - request.metadata.created_at) / grid
        assert round(steps) >= 1 and abs(steps - round(steps)) * grid < 0.05, steps
    assert node_policy({}, _cfg().dp).reply_delay == REPLY_DELAY > 0
    monkeypatch.setenv(POLICY_ENV, "run-config")
    assert node_policy({}, _cfg().dp).reply_delay == 0


def test_the_continuity_token_is_sent_only_when_the_server_binds_and_survives_a_restart(
    node_file, tmp_path, monkeypatch, flower_identity
):
    """The node's token is created once in its state dir (owner-only), sent only when the server asks it to
    bind, and the same after the node restarts on that state dir (under any node id)."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    node = {"partition-id": 0, "data-path": str(node_file), "state-dir": str(tmp_path), "fresh-start": "true",
            "reply-delay": "0"}  # fmt: skip
    bound = _send("train", _cfg(), node, 1, bind=True).content.config_records[NODE_RECORD]
    token = bound["continuity-token"]
    assert len(token) == 64 and (tmp_path / "continuity-0").stat().st_mode & 0o077 == 0
    assert "continuity-token" not in _send("train", _cfg(), node, 2).content.config_records[NODE_RECORD]
    again = _send("train", _cfg(), node, 3, bind=True).content.config_records[NODE_RECORD]
    assert again["continuity-token"] == token


def test_a_client_level_request_does_not_switch_off_the_nodes_example_level_dp():
    """``dp.level=client`` asks the node to train without DP-SGD: a node that requires DP refuses it."""
    from fed.config import DPConfig

    for level in ("client", "example", "both"):
        refused = STRICT.violations(DPConfig(enabled=True, level=level, target_epsilon=4.0))
        assert bool(refused) == (level == "client"), (level, refused)


def test_a_node_that_requires_secure_aggregation_never_sends_its_update_in_the_clear(
    node_file, tmp_path, monkeypatch, flower_identity
):
    """A server that switches secure aggregation off (in the config it sends, or by skipping SecAgg+) to read one
    node's update: the node refuses before training, whatever the config says."""
    monkeypatch.delenv(POLICY_ENV, raising=False)
    node = {
        "partition-id": 0,
        "data-path": str(node_file),
        "state-dir": str(tmp_path),
        "dp-opt-out": "true",
        "require-secure-aggregation": "true",
    }
    for cfg in (_cfg("dp.enabled=false"), _cfg("dp.enabled=false", "federation.secure_aggregation=true")):
        reply = _send("train", cfg, node, 1)
        assert isinstance(reply, str) and "only through secure aggregation" in reply
    unguarded = {k: v for k, v in node.items() if k != "require-secure-aggregation"}
    assert "arrays" in _send("train", _cfg("dp.enabled=false"), unguarded, 1).content.array_records
