"""The empirical privacy audit: its statistics, and the canary experiment on what a DP client sends."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from fed.privacy.audit import audit, clopper_pearson, epsilon_lower_bound


@pytest.mark.parametrize("hits, trials", [(0, 30), (17, 30), (30, 30), (3, 100)])
def test_clopper_pearson_matches_scipys_exact_interval(hits, trials):
    ci = binomtest(hits, trials).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(hits, trials, 0.05) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_lower_bound_is_zero_when_worlds_look_alike_and_grows_with_separation():
    assert epsilon_lower_bound(15, 30, 15, 30, 1e-5) == 0.0
    low = clopper_pearson(30, 30, 0.05)[0]
    high = clopper_pearson(0, 30, 0.05)[1]
    assert epsilon_lower_bound(30, 30, 0, 30, 1e-5) == pytest.approx(math.log((low - 1e-5) / high))
    # the complementary test counts too: "in" runs that score *low*
    assert epsilon_lower_bound(0, 30, 30, 30, 1e-5) == pytest.approx(math.log((low - 1e-5) / high))


def test_audit_chooses_on_one_half_and_measures_on_the_other():
    inside = [{"a": 1.0, "b": float(i % 2)} for i in range(40)]
    outside = [{"a": 0.0, "b": float(i % 2)} for i in range(40)]
    result = audit(inside, outside, 1e-5)
    assert result.attack == "a" and result.tpr == 1.0 and result.fpr == 0.0 and result.runs == 20


@pytest.mark.slow
def test_canary_audit_catches_the_loss_leak_and_passes_what_a_dp_client_now_sends():
    """One mislabelled canary, sigma 2, q ~ 0.2, 4 steps (claimed eps 0.77 at delta 1e-3). The foundation's
    DP reply carried the raw training loss: the audit's lower bound exceeds the claim. The client's
    whole reply today (noised update + public metrics) stays under it."""
    from bench.security.canary import Canary, Experiment

    canary = Canary()
    experiment = Experiment(canary)
    claimed = canary.claimed_epsilon()
    # 100 runs a world (50 to choose, 50 to measure): the leak shows only when Poisson sampling drew the
    # canary (about 0.59 of runs), and at 60 runs the bound missed the claim about once in 30 CI runs.
    leaky = experiment.run(experiment.foundation_reply, runs=100)
    assert leaky.attack == "train_loss" and leaky.violates(claimed), leaky
    fixed = experiment.run(experiment.client_reply, runs=60)
    assert not fixed.violates(claimed), fixed


@pytest.mark.slow
def test_a_privatised_training_loss_keeps_the_claim():
    """The same canary, with the client releasing its clipped, noised loss (sigma_l = 4) inside the accounted
    mechanism: the claim (still sigma = 2 overall) survives an audit that sees the released loss."""
    from bench.security.canary import Canary, Experiment

    canary = Canary(loss_noise_multiplier=4.0)
    experiment = Experiment(canary)
    metrics, _ = experiment.client_reply(canary.data(True))
    assert "dp-train-loss" in metrics and "train_loss" not in metrics
    result = experiment.run(experiment.client_reply, runs=40)
    assert not result.violates(canary.claimed_epsilon()), result


def test_the_audited_client_answers_as_a_simulated_node_whatever_the_environment(monkeypatch):
    """``python -m bench run privacy_audit`` runs outside the test session's run-config policy: the audited
    client must still train (a refusal reply carries no update to audit)."""
    from bench.security.canary import Canary, Experiment
    from fed.privacy.client import POLICY_ENV

    monkeypatch.delenv(POLICY_ENV, raising=False)
    experiment = Experiment(Canary())
    metrics, delta = experiment.client_reply(experiment.canary.data(True))
    assert "refused" not in metrics and set(delta) == set(experiment.global_)
