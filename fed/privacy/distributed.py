"""Distributed DP under secure aggregation: each client clips, rounds onto SecAgg+'s integer grid and adds its
share of Skellam noise; the server only ever unmasks the noised sum.

The mechanism is the distributed Skellam mechanism (Agarwal, Kairouz and Liu, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS 2021). A client's update, all its sent tensors together,
is clipped to L2 norm C and scaled to grid units (one unit = SecAgg+'s quantisation step); each coordinate is
rounded up or down at random with the probabilities that keep it unbiased, so the rounded vector's L2 norm is
at most ``C / step + sqrt(d)`` (each coordinate moves by less than 1) and its L1 norm at most ``sqrt(d)``
times that. Then it adds ``Sk(mu / m)`` to every coordinate, ``Sk(lam) = Poisson(lam) - Poisson(lam)``. A sum
of independent Skellams is Skellam, so once at least ``m`` clients survive the sum carries at least
``Sk(mu)``, whichever clients they are: the accountant assumes exactly ``m`` (the worst case it allows; a
round with fewer survivors is never unmasked, ``strategies.secure``).

Its Renyi DP (the paper's Theorem 3.5) with L2 and L1 sensitivities D2 and D1, in grid units:

    eps(alpha) = alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu)),

a Gaussian of variance 2 mu (the first term) plus a discreteness term that vanishes as mu grows. Sizing
``2 mu = (z D2)^2`` makes z the Gaussian-equivalent noise multiplier of the sum. Rounds compose additively;
client sampling is not credited (no amplification), which can only over-state epsilon.

SecAgg+ itself (Flower's ``secaggplus_mod``) maps a value v in [-c, c] to the integer ``(v + c) T / (2c)``
with stochastic rounding and clips anything outside [-c, c] silently. With c and T powers of two every
grid point ``k * step`` maps exactly to ``k + T/2``, so its rounding leaves our integers as they are; and
every value is checked against [-c, c] before it is handed over, so nothing is clipped: c is sized so
that the clipped update plus ``TAIL`` noise standard deviations fits, and a client whose values still
exceed it (probability below ``tail_probability`` per coordinate) refuses the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fed.config import FederationConfig, RunConfig
from fed.privacy import secure_rng

LEVELS = 2**22
"""SecAgg+'s quantisation range T (Flower's default): integers 0..T per coordinate per client."""
MODULUS = 2**32
"""SecAgg+'s modulus (Flower's default): the sum of n clients' integers must stay below it."""
TAIL = 16.0
"""Noise standard deviations of headroom between the clipped update and the edge of the range."""
ORDERS = tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(range(12, 64)) + (128, 256)
"""Renyi orders the accountant minimises over (Opacus's default grid)."""


def max_clients(levels: int = LEVELS, modulus: int = MODULUS) -> int:
    """How many clients' integers in [0, levels] can be summed below ``modulus`` without wrapping."""
    return modulus // levels - 1


def power_of_two_above(value: float) -> float:
    """The smallest power of two >= ``value`` (> 0): grid points of a power-of-two range are exact floats."""
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"a SecAgg+ range must be a positive finite number, got {value!r}")
    return 2.0 ** math.ceil(math.log2(value))


@dataclass(frozen=True)
class SecureGrid:
    """The integer grid SecAgg+ sums on, as both sides derive it from the run's config."""

    range: float
    """c: Flower's ``clipping_range``, a power of two; a weighted value outside [-c, c] is never handed over."""
    max_weight: float = 1.0
    """Flower's ``max_weight``: a client's weight is its example count over this (1 under DP: weight 1 each)."""
    levels: int = LEVELS

    @property
    def step(self) -> float:
        """One grid unit: a power of two, so ``k * step`` is exact for every |k| <= levels / 2."""
        return 2 * self.range / self.levels

    def check(self, values: Mapping[str, np.ndarray], weight: float = 1.0) -> None:
        """Raise (naming the tensor and the value) if a value times its weight ratio falls outside [-c, c],
        where SecAgg+ would clip it silently."""
        ratio = weight / self.max_weight
        if ratio > 1:
            raise ValueError(
                f"this client's weight {weight:g} exceeds SecAgg+'s max_weight {self.max_weight:g} "
                "(federation.secure_max_weight): its weighted update would overflow"
            )
        for name, array in values.items():
            peak = float(np.abs(array).max(initial=0.0)) * ratio
            if not peak <= self.range:
                raise ValueError(
                    f"{name}: a weighted value {peak:.4g} lies outside SecAgg+'s range +-{self.range:g}; it would be "
                    "clipped silently, so this client refuses the round (federation.secure_range sets the range)"
                )


@dataclass(frozen=True)
class SkellamShare:
    """One client's part of the distributed Skellam mechanism, and the sum's sensitivity in grid units."""

    clip: float
    """C: the L2 bound of a client's update, all its sent tensors together."""
    noise_multiplier: float
    """z: the sum's Gaussian-equivalent noise multiplier once ``min_survivors`` clients survive."""
    min_survivors: int
    """m: each client adds 1/m of the noise; the accountant assumes exactly m survive."""
    coordinates: int
    """d: how many numbers a client's update holds."""
    grid: SecureGrid

    @classmethod
    def plan(cls, clip: float, noise_multiplier: float, min_survivors: int, coordinates: int) -> SkellamShare:
        """The share for these settings, on the smallest power-of-two range that holds a clipped update, its
        rounding and ``TAIL`` standard deviations of one client's noise."""
        if min_survivors < 1 or coordinates < 1 or clip <= 0 or noise_multiplier <= 0:
            raise ValueError(
                f"distributed DP needs clip > 0, noise multiplier > 0, min survivors >= 1 and a non-empty update "
                f"(got {clip!r}, {noise_multiplier!r}, {min_survivors!r}, {coordinates!r})"
            )
        # c (1 - 2 (1 + t z sqrt(d/m)) / T) >= C (1 + t z / sqrt(m)): the update and the noise on it fit in +-c
        spread = TAIL * noise_multiplier / math.sqrt(min_survivors)
        slack = 1 - 2 * (1 + spread * math.sqrt(coordinates)) / LEVELS
        if slack <= 0:
            raise ValueError(f"an update of {coordinates} numbers is too large for SecAgg+'s {LEVELS}-level grid")
        grid = SecureGrid(power_of_two_above(clip * (1 + spread) / slack))
        return cls(clip, noise_multiplier, min_survivors, coordinates, grid)

    @property
    def l2(self) -> float:
        """D2: one client's rounded, clipped update's largest L2 norm, in grid units."""
        return self.clip / self.grid.step + math.sqrt(self.coordinates)

    @property
    def l1(self) -> float:
        """D1: its largest L1 norm, in grid units."""
        return min(math.sqrt(self.coordinates) * self.l2, self.coordinates * (self.clip / self.grid.step + 1))

    @property
    def mu(self) -> float:
        """The sum's Skellam parameter once m clients survive: variance 2 mu = (z D2)^2."""
        return (self.noise_multiplier * self.l2) ** 2 / 2

    def rounded(self, delta: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``delta`` clipped to C and rounded to integer grid units at random, unbiased: each coordinate moves by
        less than one unit, so the L2 norm stays below ``C / step + sqrt(d)`` (flat float64 arrays)."""
        flat = {name: t.detach().double().cpu().numpy().ravel() for name, t in delta.items()}
        norm = math.sqrt(sum(float(v @ v) for v in flat.values()))
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        out = {}
        for name, values in flat.items():
            units = values * (scale / self.grid.step)
            low = np.floor(units)
            out[name] = low + (secure_rng.uniform(units.size).numpy() < units - low)  # E[rounded] = units
        return out

    def privatize(self, delta: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``delta`` clipped, rounded to the grid and noised with this client's share, as float64 grid points
        ``k * step`` (what ``secaggplus_mod`` quantises back to k exactly); raises if one falls outside the range."""
        lam = self.mu / self.min_survivors
        out = {
            name: ((units + skellam(lam, units.size)) * self.grid.step).reshape(tuple(delta[name].shape))
            for name, units in self.rounded(delta).items()
        }
        self.grid.check(out)
        return out

    def rdp(self, order: float) -> float:
        """The sum's Renyi DP at ``order`` for one round (Theorem 3.5 of the Skellam paper)."""
        return skellam_rdp(order, self.l1, self.l2, self.mu)

    def epsilon(self, rounds: int, delta: float) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds, every one at the worst-case m survivors."""
        return skellam_epsilon(self.l1, self.l2, self.mu, rounds, delta)

    def tail_probability(self) -> float:
        """A bound on the chance that one round pushes some coordinate of one client out of range, so that it
        refuses the round: Bennett's inequality for each Poisson half of the noise, over all coordinates."""
        lam = self.mu / self.min_survivors
        room = self.grid.range / self.grid.step - self.clip / self.grid.step - 1  # units left for the noise
        half = room / 2  # |P1 - P2| > room needs one Poisson half beyond room / 2 from its mean
        per_side = math.exp(-(half**2) / (2 * (lam + half / 3)))
        return min(1.0, 4 * per_side * self.coordinates)


def skellam_rdp(order: float, l1: float, l2: float, mu: float) -> float:
    """Renyi DP at ``order`` of adding ``Sk(mu)`` per coordinate to an integer vector of L1 / L2 sensitivity
    ``l1`` / ``l2`` (Agarwal et al. 2021, Theorem 3.5; ``Sk(mu) = Poisson(mu) - Poisson(mu)``)."""
    return order * l2**2 / (4 * mu) + min(((2 * order - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))


def skellam_epsilon(l1: float, l2: float, mu: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` Skellam releases composed in RDP (Opacus's conversion to (eps, delta))."""
    if rounds <= 0:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = [rounds * skellam_rdp(order, l1, l2, mu) for order in ORDERS]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def skellam(lam: float, size: int) -> np.ndarray:
    """``size`` draws of ``Sk(lam)``: numpy's Poisson sampler on a Philox generator keyed with 128 fresh bits
    from the OS CSPRNG for every call (no seed is kept or sent: nothing to search or replay)."""
    key = int.from_bytes(secure_rng.random_bytes(16), "little")
    gen = np.random.Generator(np.random.Philox(key=key))
    return (gen.poisson(lam, size) - gen.poisson(lam, size)).astype(np.float64)


def min_survivors(federation: FederationConfig) -> int:
    """Fewest clients a secure round may unmask (``federation.secure_min_survivors``; 0: three quarters of the
    expected sample, at least 2)."""
    expected = federation.fraction_train * federation.num_clients
    return federation.secure_min_survivors or max(2, math.ceil(0.75 * expected))


def secure_grid(cfg: RunConfig, coordinates: int) -> tuple[SecureGrid, SkellamShare | None]:
    """The SecAgg+ grid of this run, as server and clients both derive it, and under distributed DP
    (``dp.level = "client"``) each client's Skellam share (None without DP)."""
    if cfg.dp.client_level:
        share = SkellamShare.plan(
            cfg.dp.client_clip, cfg.dp.client_noise_multiplier, min_survivors(cfg.federation), coordinates
        )
        return share.grid, share
    bound = cfg.federation.secure_range or 4 * cfg.train.lr * cfg.train.local_steps
    return SecureGrid(power_of_two_above(bound), max_weight=float(cfg.federation.secure_max_weight)), None
