"""The client's privacy layer on its own, without Flower or a model: it books a round before training,
refuses and declines with the right flags, and releases only the allowlisted metrics under DP.

Expected epsilons are composed here from the events the round should have booked, with the ledger's
module-level ``epsilon``, not read back from the layer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fed.config import RunConfig
from fed.privacy.client import NodeState, PrivateRound
from fed.privacy.ledger import DpSgdEvent, Ledger, epsilon, events_to_json
from fed.privacy.release import PUBLIC_UNDER_DP

N = 100  # training examples of the client
RUN = 7
DP = {
    "dp.enabled": True,
    "dp.noise_multiplier": 1.5,
    "dp.delta": 1e-5,
    "train.batch_size": 10,
    "train.local_steps": 4,
    "federation.rounds": 3,
}


def _open(tmp_path: Path, overrides: dict, node: dict | None = None, round_: int = 1, events: str = "") -> PrivateRound:
    cfg = RunConfig().with_overrides(overrides)
    return PrivateRound.open(
        cfg,
        {"state-dir": str(tmp_path), **(node or {})},
        partition_id=0,
        round_=round_,
        run=RUN,
        num_examples=N,
        server_events=events,
    )


def _file(tmp_path: Path) -> Ledger:
    return Ledger.from_json((tmp_path / "ledger-0.json").read_text())


def test_the_round_is_booked_on_disk_before_training_so_a_crash_over_counts(tmp_path):
    with pytest.raises(RuntimeError, match="mid-round"):
        private = _open(tmp_path, DP, round_=2)
        assert private.plan.steps == 4 and private.plan.dp is not None
        raise RuntimeError("the node died mid-round")  # where train_round would run
    booked = DpSgdEvent(2, 1.5, 10 / N, 4, RUN)
    assert _file(tmp_path).events == [booked]
    assert _file(tmp_path).epsilon() == pytest.approx(epsilon([booked], 1e-5, "rdp"))


def test_a_trained_dp_round_releases_only_allowlisted_metrics_with_the_composed_epsilon(tmp_path):
    private = _open(tmp_path, DP)
    assert private.verdict() is None
    private_stats = {"train_loss": 0.3, "train_wall_s": 1.2, "usage/expert0": 5.0}
    metrics = {"partition-id": 0, "round": 1, **private.trained(private_stats, released_loss=0.4), "steps": 4}
    released = private.release(metrics)
    assert set(released) <= PUBLIC_UNDER_DP and "train_loss" not in released
    assert released["dp-train-loss"] == 0.4 and released["dp-steps"] == 4 and released["secure-rng"] == 1
    assert released["epsilon"] == pytest.approx(epsilon([DpSgdEvent(1, 1.5, 0.1, 4, RUN)], 1e-5, "rdp"))
    assert private.release({**metrics, "train_loss": 0.3}) == released  # a stray private field is dropped


def test_a_round_without_dp_writes_no_ledger_and_releases_its_statistics(tmp_path):
    private = _open(tmp_path, {"dp.enabled": False, "train.local_steps": 4})
    assert private.verdict() is None and private.plan.steps == 4 and private.plan.dp is None
    stats = {"train_loss": 0.3, "train_wall_s": 1.2}
    assert private.release({"round": 1, **private.trained(stats, None)}) == {"round": 1, **stats}
    assert not (tmp_path / "ledger-0.json").exists()


def test_the_node_policy_refuses_weaker_settings_and_says_why(tmp_path):
    private = _open(tmp_path, {"dp.enabled": False}, node={"dp-required": "true"})
    assert private.verdict() == {"refused": 1, "epsilon": 0.0}
    assert "requires DP" in private.plan.refused
    private = _open(tmp_path, DP, node={"max-grad-norm": 0.5})
    assert private.verdict() == {"refused": 1, "epsilon": 0.0}
    assert "dp.max_grad_norm=1 exceeds this client's limit 0.5" in private.plan.refused
    assert _file(tmp_path).events == []  # nothing booked for a refused round


def test_a_spent_budget_declines_with_the_epsilon_already_spent(tmp_path):
    spent = [DpSgdEvent(1, 0.6, 0.5, 200, run=3)]  # an earlier run on the same data
    (tmp_path / "ledger-0.json").write_text(Ledger("rdp", 1e-5, events=spent).to_json())
    private = _open(tmp_path, {**DP, "dp.noise_multiplier": 0.0, "dp.target_epsilon": 1.0})
    expected = epsilon(spent, 1e-5, "rdp")
    assert expected > 1.0
    assert private.verdict() == {"declined": 1, "epsilon": pytest.approx(expected)}
    assert private.plan.refused == "" and _file(tmp_path).events == spent


def test_the_servers_copy_is_merged_into_a_lost_ledger_and_a_malformed_one_is_ignored(tmp_path, caplog):
    held = [DpSgdEvent(1, 1.5, 0.1, 4, RUN)]
    private = _open(tmp_path, DP, round_=2, events=events_to_json(held))
    assert _file(tmp_path).events == [*held, DpSgdEvent(2, 1.5, 0.1, 4, RUN)]
    assert private.trained({}, None)["epsilon"] == pytest.approx(epsilon(_file(tmp_path).events, 1e-5, "rdp"))
    flwr_log = logging.getLogger("flwr")  # Flower's logger may not propagate: listen on it directly
    flwr_log.addHandler(caplog.handler)
    try:
        _open(tmp_path, DP, round_=3, events=json.dumps([{"round": 1, "steps": -1}]))
    finally:
        flwr_log.removeHandler(caplog.handler)
    assert "ignoring the server's malformed copy" in caplog.text
    assert [e.round for e in _file(tmp_path).events] == [1, 2, 3]


def test_events_the_server_holds_pin_dp_and_keep_a_non_dp_round_private(tmp_path):
    """A client that lost its file (and so its pin) but ever spent budget refuses a round without DP, even
    when its own policy would allow one, and releases only public fields."""
    events = events_to_json([DpSgdEvent(1, 1.5, 0.1, 4, RUN)])
    private = _open(tmp_path, {"dp.enabled": False}, node={"dp-opt-out": "true"}, events=events)
    assert private.verdict() == {"refused": 1, "epsilon": epsilon([DpSgdEvent(1, 1.5, 0.1, 4, RUN)], 1e-5, "rdp")}
    assert "requires DP" in private.plan.refused
    assert private.release({"round": 1, "train_loss": 0.3}) == {"round": 1}


def test_a_dp_reply_leaves_on_the_reply_delay_grid_after_the_request(tmp_path, monkeypatch):
    """Under DP with reply-delay D, the reply leaves at request time + k D, k = ceil(processing / D) (at least
    1), not when the round finished."""
    import fed.privacy.client as layer

    now, slept = 1000.0, []
    monkeypatch.setattr(layer.time, "time", lambda: now)
    monkeypatch.setattr(layer.time, "sleep", slept.append)
    cfg = RunConfig().with_overrides(DP)
    state = layer.NodeState.load(cfg, {"state-dir": str(tmp_path), "reply-delay": "30"}, 0)
    state.hold_reply(cfg.dp, requested_at=now - 12.5)  # the round took 12.5 s
    assert slept == [pytest.approx(17.5)]
    state.hold_reply(cfg.dp, requested_at=now - 40.0)  # longer than D: held to the next multiple, 60 s
    plain = RunConfig().with_overrides({"dp.enabled": False})
    layer.NodeState.load(plain, {"state-dir": str(tmp_path / "plain"), "reply-delay": "30"}, 0).hold_reply(
        plain.dp, requested_at=now
    )
    assert slept == [pytest.approx(17.5), pytest.approx(20.0)]  # a node never held to DP is not delayed


def test_the_split_is_pinned_at_first_contact_and_kept_whatever_later_messages_say(tmp_path):
    cfg = RunConfig().with_overrides(DP)
    first = NodeState.load(cfg, {"state-dir": str(tmp_path)}, 0).split(cfg, ("neg", "pos"))
    other = cfg.with_overrides({"seed": 9, "data.test_fraction": 0.9, "data.max_examples": 5})
    again = NodeState.load(other, {"state-dir": str(tmp_path)}, 0).split(other, ("a", "b"))
    assert first is not None and again == first and first.labels == ("neg", "pos")
    assert (first.seed, first.test_fraction, first.max_examples) == (cfg.seed, cfg.data.test_fraction, 0)


def test_an_unreadable_ledger_names_the_file_and_stops_the_round(tmp_path):
    (tmp_path / "ledger-0.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"privacy ledger .*ledger-0\.json is unreadable"):
        _open(tmp_path, DP)


def test_the_layer_imports_no_flower():
    code = "import sys, fed.privacy.client; print('flwr' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "False"
