"""Distributed DP's mechanism against independent computations: the Skellam RDP bound against the exact Renyi
divergence (scipy's Skellam pmf), its (eps, delta) against dp_accounting's conversion, the grid against Flower's
own quantiser, and the summed noise's standard deviation against its target over many draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from scipy.stats import skellam as scipy_skellam

from fed.config.sources import resolve
from fed.privacy.client_level import ClientAccount
from fed.privacy.distributed import (
    LEVELS,
    ORDERS,
    SecureGrid,
    SkellamShare,
    max_clients,
    secure_grid,
    skellam,
    skellam_rdp,
)


def exact_renyi(order: float, shift: int, mu: float) -> float:
    """D_order(Sk(mu) + shift || Sk(mu)) from the pmf, summed over the whole support that matters."""
    support = np.arange(-int(40 * math.sqrt(2 * mu)) - 50, int(40 * math.sqrt(2 * mu)) + 50)
    p = scipy_skellam.logpmf(support - shift, mu, mu)
    q = scipy_skellam.logpmf(support, mu, mu)
    terms = order * p + (1 - order) * q
    top = terms.max()
    return float((top + math.log(np.exp(terms - top).sum())) / (order - 1))


@pytest.mark.parametrize(("shift", "mu"), [(1, 2.0), (3, 10.0), (2, 50.0)])
@pytest.mark.parametrize("order", [2.0, 4.0, 8.0])
def test_skellam_rdp_bounds_the_exact_renyi_divergence(shift, mu, order):
    bound = skellam_rdp(order, shift, shift, mu)
    exact = exact_renyi(order, shift, mu)
    assert exact <= bound * (1 + 1e-9)
    assert bound < 3 * exact + 0.1  # a bound, not a vacuous one


def test_at_large_mu_skellam_is_the_gaussian_of_the_same_variance():
    l2 = 1000.0
    mu = (1.3 * l2) ** 2 / 2  # variance 2 mu = (z l2)^2, z = 1.3
    for order in (2.0, 16.0, 64.0):
        assert skellam_rdp(order, l2 * 30, l2, mu) == pytest.approx(order / (2 * 1.3**2), rel=1e-4)


def test_epsilon_matches_dp_accounting_conversion_of_the_same_curve():
    share = SkellamShare.plan(0.1, 1.5, 3, 5000)
    for rounds in (1, 10, 50):
        rdp = [rounds * share.rdp(order) for order in ORDERS]
        theirs, _ = compute_epsilon(list(ORDERS), rdp, 1e-5)
        assert share.epsilon(rounds, 1e-5) == pytest.approx(theirs, rel=0.02)


def test_the_account_reports_skellam_epsilon_without_sampling_credit():
    cfg = resolve(
        "quickstart",
        [
            "federation.secure_aggregation=true",
            "dp.enabled=true",
            "dp.level=client",
            "federation.fraction_train=0.5",
            "federation.num_clients=8",
            "dp.client_noise_multiplier=2",
        ],
    )
    account = ClientAccount.of(cfg.dp, cfg.federation, coordinates=4000)
    for r in (1, 2, 3):
        account.book(r)
    share = SkellamShare.plan(cfg.dp.client_clip, 2.0, 3, 4000)  # min survivors: ceil(0.75 * 0.5 * 8) = 3
    assert account.epsilon() == pytest.approx(share.epsilon(3, cfg.dp.delta))
    report = account.report()
    assert report["mechanism"]["min_survivors"] == 3 and "not credited" in report["mechanism"]["sampling"]
    assert report["epsilon_prv"] is None and report["trust"].startswith("no one")


def test_grid_points_pass_flowers_quantiser_exactly():
    share = SkellamShare.plan(0.2, 1.0, 2, 3000)
    grid = share.grid
    assert math.log2(grid.range).is_integer()
    delta = {"a": torch.randn(30, 100) * 0.05}
    values = share.privatize(delta)
    flat = values["a"].ravel()
    units = flat / grid.step
    assert np.array_equal(units, np.round(units))
    (quantised,) = quantize([flat.astype(np.float32)], grid.range, LEVELS)  # what secaggplus_mod does
    assert np.array_equal(quantised, (units + LEVELS // 2).astype(np.int64))
    (back,) = dequantize([quantised], grid.range, LEVELS)
    assert np.array_equal(back, flat)


def test_rounding_is_unbiased_and_clipping_bounds_the_norm():
    share = SkellamShare.plan(0.5, 1.0, 2, 4)
    big = share.rounded({"a": torch.full((4,), 10.0)})["a"]
    assert np.linalg.norm(big) <= share.l2 and np.linalg.norm(big * share.grid.step) <= 0.5 + 2 * share.grid.step
    small = {"a": torch.full((4000,), 0.3 * share.grid.step)}
    units = share.rounded(small)["a"]
    assert set(np.unique(units)) == {0.0, 1.0}
    assert units.mean() == pytest.approx(0.3, abs=0.03)


def test_the_survivors_noise_std_matches_its_target():
    """m clients' shares of a zero update summed: std z * D2 grid units, within a few percent (60,000 draws)."""
    m, d = 3, 20_000
    share = SkellamShare.plan(0.1, 1.2, m, d)
    zero = {"a": torch.zeros(d)}
    total = sum(share.privatize(zero)["a"] for _ in range(m)) / share.grid.step
    draws = np.concatenate([total, sum(share.privatize(zero)["a"] for _ in range(m)) / share.grid.step])
    target = 1.2 * share.l2
    assert draws.std() == pytest.approx(target, rel=0.03)
    assert abs(draws.mean()) < 5 * target / math.sqrt(draws.size)


def test_skellam_draws_are_fresh_each_call():
    assert not np.array_equal(skellam(5.0, 64), skellam(5.0, 64))


def test_out_of_range_values_and_weights_are_refused_not_clipped():
    grid = SecureGrid(1.0, max_weight=100.0)
    grid.check({"a": np.array([0.9, -1.0])}, weight=100)
    with pytest.raises(ValueError, match="outside SecAgg"):
        grid.check({"a": np.array([0.5, -1.5])}, weight=100)
    assert grid.check({"a": np.array([1.5])}, weight=50) is None  # weighted: 0.75
    with pytest.raises(ValueError, match="max_weight"):
        grid.check({"a": np.array([0.1])}, weight=101)


def test_both_sides_derive_the_same_grid_from_the_config():
    plain = resolve("quickstart", ["federation.secure_aggregation=true", "train.lr=0.001", "train.local_steps=10"])
    grid, share = secure_grid(plain, 1000)
    assert share is None and grid.range == 0.0625  # 4 x 0.001 x 10 = 0.04, rounded up to a power of two
    dp = resolve("quickstart", ["federation.secure_aggregation=true", "dp.enabled=true", "dp.level=client"])
    grid, share = secure_grid(dp, 1000)
    assert share is not None and grid == share.grid and grid.max_weight == 1.0
    assert max_clients() == 1023
