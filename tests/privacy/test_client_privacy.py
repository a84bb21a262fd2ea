"""The real ClientApp under DP: its ledger file survives restarts, a lost file is rebuilt from the
server's copy, and its own policy refuses weaker settings, saying why in the reply."""

from __future__ import annotations

import json

import pytest

from bench.security.canary import Canary, Experiment
from fed.privacy.ledger import Ledger, events_to_json


@pytest.fixture(scope="module")
def experiment() -> Experiment:
    return Experiment(Canary(examples=60, steps=2))


def _ledger(state) -> Ledger:
    return Ledger.from_json((state / "ledger-0.json").read_text())


def test_ledger_persists_across_restarts_and_a_lost_file_is_merged_back(experiment, tmp_path):
    data = experiment.canary.data(False)
    node = {"state-dir": str(tmp_path)}
    first = experiment.ask(data, node, round_=1)
    assert first.content.metric_records["metrics"]["dp-steps"] == 2
    experiment.ask(data, node, round_=2)  # a new ClientApp call (deployment: a new process) reads the file
    ledger = _ledger(tmp_path)
    assert [e.round for e in ledger.events] == [1, 2]
    (tmp_path / "ledger-0.json").unlink()  # the node lost its state; the server returns what it holds
    reply = experiment.ask(data, node, round_=3, known_events=events_to_json(ledger.events))
    assert [e.round for e in _ledger(tmp_path).events] == [1, 2, 3]
    assert reply.content.metric_records["metrics"]["epsilon"] == pytest.approx(_ledger(tmp_path).epsilon())


def test_an_unreadable_ledger_stops_the_client_instead_of_resetting(experiment, tmp_path):
    (tmp_path / "ledger-0.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        experiment.ask(experiment.canary.data(False), {"state-dir": str(tmp_path)})


def test_policy_refusal_is_in_the_reply_and_the_pin_survives(experiment, tmp_path):
    data = experiment.canary.data(False)
    node = {"state-dir": str(tmp_path), "max-epsilon": 5.0}
    no_dp = experiment.cfg.with_overrides({"dp.enabled": False})
    experiment.ask(data, node, round_=1)  # a DP round pins DP on
    reply = experiment.ask(data, node, cfg=no_dp, round_=2)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["refused"] == 1 and "train_loss" not in metrics
    assert "requires DP" in reply.content.config_records["refusal"]["reason"]
    assert not reply.content.array_records  # nothing trained, nothing sent
    assert json.loads((tmp_path / "ledger-0.json").read_text())["policy"]["dp_required"] is True


def test_one_ledger_write_per_dp_round_booking_the_round_before_it_trains(experiment, tmp_path, monkeypatch):
    import clients.app as client_app
    import fed.privacy.client as client_privacy

    writes: list = []
    real_write = client_privacy.write_atomic
    monkeypatch.setattr(
        client_privacy, "write_atomic", lambda path, text: writes.append(path) or real_write(path, text)
    )
    data, node = experiment.canary.data(False), {"state-dir": str(tmp_path)}
    experiment.ask(data, node, round_=1)
    assert len(writes) == 2  # first contact pins the split, then the round is booked
    experiment.ask(data, node, round_=2)
    assert len(writes) == 3

    def crash(*args, **kwargs):
        raise RuntimeError("the node died mid-round")

    monkeypatch.setattr(client_app, "train_round", crash)
    with pytest.raises(RuntimeError, match="mid-round"):
        experiment.ask(data, node, round_=3)
    assert [e.round for e in _ledger(tmp_path).events] == [1, 2, 3]  # a crash can only over-count
