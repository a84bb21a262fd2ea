"""Accounting: composition across rounds, calibration over the whole schedule, the budget guard."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fed.config import DPConfig
from fed.privacy.ledger import DpSgdEvent, Ledger, calibrate_noise, epsilon
from fed.privacy.planner import new_ledger, plan_round

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_compose_and_equal_one_accountant_with_all_steps(accountant):
    ledger = Ledger(accountant=accountant, delta=DELTA, noise_multiplier=1.0)
    ledger.record(DpSgdEvent(1, 1.0, 0.02, 50))
    eps1 = ledger.epsilon()
    ledger.record(DpSgdEvent(2, 1.0, 0.02, 50))
    eps2 = ledger.epsilon()
    assert eps2 > eps1 > 0
    single = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(100):  # step-by-step, the way Opacus's own hook records a non-federated run
        single.step(noise_multiplier=1.0, sample_rate=0.02)
    assert eps2 == pytest.approx(single.get_epsilon(delta=DELTA), rel=1e-3 if accountant == "prv" else 1e-9)


def test_rdp_and_prv_agree_roughly():
    events = [DpSgdEvent(r, 1.0, 0.01, 500) for r in (1, 2)]
    rdp, prv = epsilon(events, DELTA, "rdp"), epsilon(events, DELTA, "prv")
    assert prv < rdp < 1.4 * prv  # RDP is an upper bound; PRV is tighter (STACK-NOTES: 2.10 vs 1.84)


def test_calibrated_noise_spends_at_most_the_target_over_the_whole_schedule():
    sigma = calibrate_noise(8.0, DELTA, 0.05, 5 * 10, "rdp")
    events = [DpSgdEvent(r, sigma, 0.05, 10) for r in range(1, 6)]
    assert 7.5 < epsilon(events, DELTA, "rdp") <= 8.0


def test_plan_calibrates_once_and_guard_stops_past_the_budget():
    dp = DPConfig(enabled=True, target_epsilon=2.0, delta=DELTA)
    ledger = new_ledger(dp)
    plan = plan_round(dp, ledger, num_examples=500, batch_size=25, local_steps=10, rounds=3, round_=1)
    assert plan.steps == 10 and plan.dp is not None and ledger.noise_multiplier > 0
    for r in range(1, 4):
        ledger.record(DpSgdEvent(r, ledger.noise_multiplier, plan.dp.sample_rate, 10))
    assert ledger.epsilon() <= 2.0
    # A fourth round (beyond the plan) must be cut short so the target still holds.
    extra = plan_round(dp, ledger, num_examples=500, batch_size=25, local_steps=10, rounds=3, round_=4)
    assert extra.steps < 10
    ledger.record(DpSgdEvent(4, ledger.noise_multiplier, plan.dp.sample_rate, extra.steps))
    assert ledger.epsilon() <= 2.0


def test_ledger_round_trips_through_json():
    ledger = Ledger(
        accountant="rdp", delta=DELTA, target_epsilon=8, noise_multiplier=0.9, events=[DpSgdEvent(1, 0.9, 0.1, 10)]
    )
    again = Ledger.from_json(ledger.to_json())
    assert again == ledger and math.isclose(again.epsilon(), ledger.epsilon())


def test_no_dp_plan_trains_all_steps():
    plan = plan_round(
        DPConfig(), new_ledger(DPConfig()), num_examples=10, batch_size=5, local_steps=7, rounds=1, round_=1
    )
    assert plan.dp is None and plan.steps == 7


def test_server_book_recomposes_events_and_ignores_malformed_ones():
    from fed.privacy.book import LedgerBook

    book = LedgerBook(DPConfig(enabled=True, noise_multiplier=1.0))
    good = {"partition-id": 0, "dp-steps": 10, "dp-noise-multiplier": 1.0, "dp-sample-rate": 0.05, "epsilon": 1.0}
    book.observe(1, good)
    book.observe(2, good)
    book.observe(2, {**good, "partition-id": 1, "dp-sample-rate": 7.0})  # impossible rate: never enters a ledger
    book.observe(2, {**good, "partition-id": "x"})
    report = book.report()
    assert set(report["clients"]) == {"0"}
    assert report["clients"]["0"]["steps"] == 20
    assert report["max_epsilon"] == pytest.approx(epsilon([DpSgdEvent(1, 1.0, 0.05, 20)], DELTA, "rdp"))


# --- the client owns its privacy: policy, pin, persistent ledger, stale files, lost files ---------------

from opacus.accountants.utils import get_noise_multiplier  # noqa: E402  (this section's imports open it)

from fed.privacy.ledger import events_from_json, events_to_json  # noqa: E402  (this section's imports open it)
from fed.privacy.policy import Policy, PolicyError  # noqa: E402  (this section's imports open it)

PLAN = dict(num_examples=800, batch_size=32, local_steps=10, rounds=5)


def test_calibration_matches_opacus_on_a_fresh_ledger_and_plans_the_remainder_after_prior_spending():
    ours = calibrate_noise(3.0, DELTA, 0.04, 50, "rdp")
    theirs = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.04, steps=50, accountant="rdp", epsilon_tolerance=0.001
    )
    assert ours == pytest.approx(theirs, rel=5e-3)
    prior = [DpSgdEvent(1, 1.0, 0.04, 50, run=1)]
    sigma = calibrate_noise(3.0, DELTA, 0.04, 50, "rdp", prior)
    assert epsilon([*prior, DpSgdEvent(1, sigma, 0.04, 50, run=2)], DELTA, "rdp") <= 3.0
    assert sigma > ours  # less left to spend: more noise


def test_stale_ledger_from_an_earlier_run_cannot_push_past_the_new_cap():
    """The reproduction: an old file (sigma 0.3, delta 1e-3, no target, 50 steps spent) meets a run whose
    target is 1.0 at 1e-5. The foundation trained all 50 steps (true eps 50.2); now nothing trains."""
    old = Ledger(
        accountant="rdp",
        delta=1e-3,
        noise_multiplier=0.3,
        run=1,
        events=[DpSgdEvent(r, 0.3, 0.04, 10, run=1) for r in range(1, 6)],
    )
    stale = Ledger.from_json(old.to_json())
    dp = DPConfig(enabled=True, target_epsilon=1.0, delta=1e-5)
    plans = [plan_round(dp, stale, **PLAN, round_=r, run=2) for r in range(1, 6)]
    assert all(p.steps == 0 for p in plans)
    assert stale.delta == 1e-5 and stale.epsilon() > 1.0  # re-accounted at the run's delta


def test_policy_refuses_weaker_settings_and_the_first_dp_round_pins_them():
    policy = Policy.from_node_config(
        {
            "dp-required": "true",
            "max-epsilon": 4,
            "delta": 1e-5,
            "min-noise-multiplier": 0.5,
            "max-grad-norm": 2,
            "partition-id": 0,
        }
    )
    ledger = new_ledger(DPConfig())
    assert plan_round(DPConfig(enabled=False), ledger, **PLAN, round_=1, policy=policy).refused
    assert (
        "exceeds"
        in plan_round(DPConfig(enabled=True, target_epsilon=9), ledger, **PLAN, round_=1, policy=policy).refused
    )
    assert (
        "below"
        in plan_round(DPConfig(enabled=True, noise_multiplier=0.2), ledger, **PLAN, round_=1, policy=policy).refused
    )
    ok = plan_round(DPConfig(enabled=True, target_epsilon=3), ledger, **PLAN, round_=1, run=5)
    assert ok.steps == 10 and not ok.refused
    # no node policy at all: round 1's settings are now the floor, pinned in the (saved) ledger
    again = Ledger.from_json(ledger.to_json())
    for weaker in (
        DPConfig(enabled=False),
        DPConfig(enabled=True, target_epsilon=6),
        DPConfig(enabled=True, target_epsilon=3, delta=1e-4),
        DPConfig(enabled=True, target_epsilon=3, max_grad_norm=5),
    ):
        assert plan_round(weaker, again, **PLAN, round_=2, run=5).refused, weaker
    assert not plan_round(DPConfig(enabled=True, target_epsilon=2), again, **PLAN, round_=2, run=5).refused


@pytest.mark.parametrize("bad", [{"max-epsilon": "lots"}, {"delta": -1}, {"dp-required": "maybe"}])
def test_bad_node_policy_names_the_key(bad):
    with pytest.raises(PolicyError, match=next(iter(bad))):
        Policy.from_node_config(bad)


def test_delta_above_one_over_ten_n_is_refused_at_planning():
    plan = plan_round(DPConfig(enabled=True, target_epsilon=3, delta=1e-3), new_ledger(DPConfig()), **PLAN, round_=1)
    assert "1/(10 n)" in plan.refused and plan.steps == 0


def test_a_client_that_lost_its_file_merges_the_servers_copy_and_cannot_spend_again():
    dp = DPConfig(enabled=True, target_epsilon=2.0, delta=DELTA)
    ledger = new_ledger(dp)
    for r in range(1, 6):
        plan = plan_round(dp, ledger, **PLAN, round_=r, run=3)
        ledger.record(DpSgdEvent(r, plan.dp.noise_multiplier, plan.dp.sample_rate, plan.steps, run=3))
    spent = ledger.epsilon()
    assert spent <= 2.0
    lost = new_ledger(dp)  # the file is gone; the server's copy comes back with the next message
    assert lost.merge(events_from_json(events_to_json(ledger.events))) == 5
    assert lost.merge(ledger.events) == 0  # a union: merging twice adds nothing
    extra = plan_round(dp, lost, **PLAN, round_=6, run=3)
    lost.record(DpSgdEvent(6, extra.dp.noise_multiplier if extra.dp else 1.0, 0.04, extra.steps, run=3))
    assert lost.epsilon() <= 2.0 + 1e-9


@pytest.mark.parametrize(
    "text",
    ['[{"round": 1}]', '[{"round": 1, "noise_multiplier": 0, "sample_rate": 0.1, "steps": 1, "run": 1}]', '{"a": 1}'],
)
def test_server_events_are_validated(text):
    with pytest.raises((ValueError, TypeError)):
        events_from_json(text)
