"""Client-level DP (DP-FedAvg, McMahan et al. 2018): the server's mechanism, its accountant and its account.

Neighbouring federations differ in one whole client (add or remove it, with everything it holds). Each
round every client is sampled independently with probability q (Poisson sampling, so the accountant's
amplification applies); each sampled client's round update, all its sent tensors together, is clipped
to L2 norm C; the server releases

    (sum_k clip(delta_k, C) + N(0, (z_u C)^2)) / (q N),

a fixed denominator (the expected number of sampled clients), so one client moves the sum by at most C
whether it is there or not. With adaptive clipping (Andrew et al. 2021) the round also releases the
centred count ``sum_k (1[|delta_k| <= C] - 1/2) + N(0, sigma_b^2)`` (sensitivity 1/2), from which C moves
geometrically towards a target quantile. The two releases come from the same sample, so together they are
one sampled Gaussian mechanism of multiplier z with ``z^-2 = z_u^-2 + (2 sigma_b)^-2``: the accountant
composes z, one step per round, and the update's own noise z_u rises above z to leave the count its share.

The server adds the noise: this guarantee trusts it (and protects the released adapters from everyone
else: other clients, whoever receives the model). The example level (DP-SGD) trusts nobody but each
client; ``fed/privacy/ledger.py`` accounts that one, and a run may have both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fed.adapters.base import Aggregation
from fed.config import DPConfig, FederationConfig
from fed.privacy import secure_rng
from fed.privacy.distributed import SkellamShare, min_survivors, skellam_epsilon
from fed.privacy.ledger import _epsilon

GUARANTEE = (
    "(epsilon, delta)-DP of the sequence of global adapters with respect to adding or removing one whole client "
    "(every example it holds, every round it is sampled), under Poisson client sampling; the server adds the "
    "noise, so this guarantee trusts the server and protects the released adapters from everyone else"
)
TRUST = "the server: it clips, samples and adds the noise (clients send clear updates to it)"
DISTRIBUTED_GUARANTEE = (
    "(epsilon, delta)-DP of each round's unmasked sum and of the global adapters, with respect to adding or removing "
    "one whole client, assuming only {m} clients survive each round (the fewest a round may unmask: more survivors "
    "only add noise); client sampling is not credited. It holds against the server as long as at least {m} clients "
    "of a round follow the protocol (their noise shares are what the guarantee counts)"
)
NOT_COVERED = [
    "the server's own records (metrics.jsonl: clients per round, dropped replies; privacy.json's per-client "
    "events): the server is trusted at this level and they are not released",
    "a round whose sampled clients all failed or were dropped keeps the previous adapter instead of releasing "
    "noise: that skip reveals that no sampled reply was valid",
]


def dense_mean_problems(kinds: Mapping[str, Aggregation], what: str = "client-level DP") -> list[str]:
    """Why client-level DP cannot bound these tensors' aggregation (empty when every one is a weighted mean).

    The sensitivity argument needs the round's update to be a sum of per-client clipped dense tensors;
    products re-factorise, masked means divide by how many clients kept an entry, usage weights are
    self-reported counts and allocations are the server's own: none is a sum one client moves by at most C.
    """
    others = sorted({kind.value for kind in kinds.values() if kind != Aggregation.MEAN})
    if not others:
        return []
    names = sorted(name for name, kind in kinds.items() if kind != Aggregation.MEAN)
    return [
        f"{what} needs every sent tensor aggregated as a weighted mean of dense tensors; this adapter "
        f"aggregates {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} by {', '.join(others)} (product: "
        "re-factorised; masked: divided per entry by who kept it; usage: weighted by self-reported counts; "
        "allocation: server-owned), so one client's influence is not bounded by the clip. Use adapter.kind "
        "lora or ffa-lora (strategy.aggregation = mean)"
    ]


@dataclass(frozen=True)
class ClientMechanism:
    """The settings of one round of DP-FedAvg, as the server runs and the accountant composes them."""

    noise_multiplier: float
    """z: what the accountant composes (update and clip count together)."""
    sample_rate: float
    """q: each client's independent chance of being sampled in a round."""
    population: int
    """N: the federation's clients; q N is the fixed denominator."""
    clip: float
    """C at the start (fixed clipping: always)."""
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_multiplier: float = 0.0
    """z_b: the clip count's noise in units of its sensitivity 1/2 (0 with fixed clipping)."""
    skellam_l1: float = 0.0
    skellam_l2: float = 0.0
    skellam_mu: float = 0.0
    """Distributed DP under secure aggregation (``fed.privacy.distributed``): the sum's L1 / L2 sensitivity and
    Skellam parameter in grid units, at the worst case of ``min_survivors`` clients (0: the server adds the noise)."""
    min_survivors: int = 0

    @classmethod
    def of(cls, dp: DPConfig, federation: FederationConfig, coordinates: int = 0) -> ClientMechanism:
        """The run's mechanism; under secure aggregation the clients' Skellam noise on an update of
        ``coordinates`` numbers (required then)."""
        distributed: dict[str, Any] = {}
        if federation.secure_aggregation:
            share = SkellamShare.plan(
                dp.client_clip, dp.client_noise_multiplier, min_survivors(federation), coordinates
            )
            distributed = {
                "skellam_l1": share.l1,
                "skellam_l2": share.l2,
                "skellam_mu": share.mu,
                "min_survivors": share.min_survivors,
            }
        return cls(
            noise_multiplier=dp.client_noise_multiplier,
            sample_rate=federation.fraction_train,
            population=federation.num_clients,
            clip=dp.client_clip,
            adaptive=dp.client_clipping == "adaptive",
            target_quantile=dp.client_target_quantile,
            clip_lr=dp.client_clip_lr,
            count_noise_multiplier=dp.count_noise_multiplier,
            **distributed,
        )

    @property
    def distributed(self) -> bool:
        """Whether the clients add the noise inside a secure sum (Skellam) rather than the server (Gaussian)."""
        return self.skellam_mu > 0

    def epsilon(self, rounds: int, delta: float, accountant: str) -> float:
        """Epsilon at ``delta`` after ``rounds`` releases: the sampled Gaussian (Opacus's ``accountant``), or under
        distributed DP the Skellam sum's RDP composed without crediting client sampling."""
        if self.distributed:
            return skellam_epsilon(self.skellam_l1, self.skellam_l2, self.skellam_mu, rounds, delta)
        return client_epsilon(self.noise_multiplier, self.sample_rate, rounds, delta, accountant)

    @property
    def expected_clients(self) -> float:
        """q N: the fixed denominator of every round's mean."""
        return self.sample_rate * self.population

    @property
    def update_noise_multiplier(self) -> float:
        """z_u: the update's own share, ``z_u^-2 = z^-2 - z_b^-2`` (z itself with fixed clipping)."""
        if not self.adaptive:
            return self.noise_multiplier
        if self.count_noise_multiplier <= self.noise_multiplier:
            raise ValueError(
                f"count noise multiplier {self.count_noise_multiplier:g} must exceed the accounted "
                f"{self.noise_multiplier:g}: the clip count would use the whole budget"
            )
        return (self.noise_multiplier**-2 - self.count_noise_multiplier**-2) ** -0.5

    @property
    def count_std(self) -> float:
        """sigma_b: the std of the noise on the centred count (z_b times its sensitivity 1/2)."""
        return self.count_noise_multiplier / 2

    def noised_mean(self, total: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
        """The round's release from the sum of clipped updates: Gaussian noise of std ``z_u C`` on every
        coordinate (the OS CSPRNG), divided by ``q N``."""
        std = self.update_noise_multiplier * clip
        return {
            name: (t.double() + secure_rng.normal(tuple(t.shape), std, torch.float64))
            .div(self.expected_clients)
            .to(t.dtype)
            for name, t in total.items()
        }

    def next_clip(self, clip: float, within: int, sampled: int) -> float:
        """Andrew et al.'s geometric step from the noised fraction of clients within ``clip``: ``within`` of
        ``sampled`` are, the centred count ``within - sampled/2`` is released with noise, then read against
        the fixed denominator."""
        if not self.adaptive:
            return clip
        released = within - sampled / 2 + float(secure_rng.normal((1,), self.count_std, torch.float64))
        fraction = released / self.expected_clients + 0.5
        return clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))


def client_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of ``rounds`` releases of the sampled Gaussian mechanism (Opacus's ``accountant``)."""
    if rounds <= 0:
        return 0.0
    return _epsilon(((noise_multiplier, sample_rate, rounds),), delta, accountant)


@dataclass(frozen=True)
class ClientRound:
    """One round's client-level release: booked before its noise is drawn."""

    round: int
    noise_multiplier: float
    sample_rate: float
    clip: float
    """C that round."""


@dataclass
class ClientAccount:
    """The server's account of the client-level guarantee: its mechanism, every round released, the clip."""

    mechanism: ClientMechanism
    delta: float
    accountant: str
    target_epsilon: float = 0.0
    rounds: list[ClientRound] = field(default_factory=list)
    clip: float = 0.0
    """The bound of the next round (adaptive clipping moves it)."""
    stopped: int = 0
    """The first round the cap left untrained (0: none)."""
    flags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clip = self.clip or self.mechanism.clip

    def epsilon(self, accountant: str | None = None, extra: int = 0) -> float:
        """Epsilon of the rounds released (plus ``extra`` more at the same settings)."""
        if self.mechanism.distributed:  # every round at the same Skellam settings
            return self.mechanism.epsilon(len(self.rounds) + extra, self.delta, "rdp")
        events = [(r.noise_multiplier, r.sample_rate) for r in self.rounds]
        events += [(self.mechanism.noise_multiplier, self.mechanism.sample_rate)] * extra
        return composed_epsilon(events, self.delta, accountant or self.accountant)

    def allows(self, run_round: int) -> bool:
        """Whether one more round fits under the cap; the first that does not is flagged once."""
        if self.target_epsilon <= 0 or self.epsilon(extra=1) <= self.target_epsilon:
            return True
        if not self.stopped:
            self.stopped = run_round
            self.flags.append(
                f"round {run_round}: stopped before training: one more round would take client-level epsilon from "
                f"{self.epsilon():.4g} past dp.client_target_epsilon={self.target_epsilon:g}"
            )
        return False

    def book(self, run_round: int) -> None:
        self.rounds.append(
            ClientRound(run_round, self.mechanism.noise_multiplier, self.mechanism.sample_rate, self.clip)
        )

    def report(self, cross_check: bool = False) -> dict[str, Any]:
        """The guarantee as privacy.json states it: unit, adjacency, trust, the events and epsilon by round."""
        m = self.mechanism
        by_round = [{"round": r.round, "epsilon": self._epsilon_after(i + 1)} for i, r in enumerate(self.rounds)]
        return {
            "unit": "client",
            "adjacency": "add or remove one whole client (all its examples, every round)",
            **(_distributed(m) if m.distributed else {"trust": TRUST, "guarantee": GUARANTEE}),
            "not_covered": NOT_COVERED,
            "accountant": "rdp" if m.distributed else self.accountant,  # Skellam: RDP only (Theorem 3.5)
            "delta": self.delta,
            "epsilon": self.epsilon(),
            **{
                f"epsilon_{acc}": self.epsilon(acc)
                if (cross_check or acc == self.accountant) and not (m.distributed and acc == "prv")
                else None
                for acc in ("rdp", "prv")
            },
            "target_epsilon": self.target_epsilon,
            "stopped_at_round": self.stopped or None,
            "noise_multiplier": m.noise_multiplier,
            "update_noise_multiplier": m.update_noise_multiplier,
            "count_noise_multiplier": m.count_noise_multiplier,
            "sample_rate": m.sample_rate,
            "population": m.population,
            "expected_clients": m.expected_clients,
            "clipping": "adaptive" if m.adaptive else "fixed",
            "clip": self.clip,
            "rounds": [asdict(r) for r in self.rounds],
            "epsilon_by_round": by_round,
            "rng": secure_rng.SOURCES["os"],  # the server draws its noise from the OS CSPRNG
            "flags": list(self.flags),
        }

    def _epsilon_after(self, rounds: int) -> float:
        """Epsilon once the first ``rounds`` rounds were released."""
        if self.mechanism.distributed:
            return self.mechanism.epsilon(rounds, self.delta, "rdp")
        events = [(r.noise_multiplier, r.sample_rate) for r in self.rounds[:rounds]]
        return composed_epsilon(events, self.delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": asdict(self.mechanism),
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "rounds": [asdict(r) for r in self.rounds],
            "clip": self.clip,
            "stopped": self.stopped,
            "flags": list(self.flags),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientAccount:
        return cls(
            ClientMechanism(**data["mechanism"]),
            float(data["delta"]),
            str(data["accountant"]),
            float(data["target_epsilon"]),
            [ClientRound(**r) for r in data["rounds"]],
            float(data["clip"]),
            int(data["stopped"]),
            list(data["flags"]),
        )

    @classmethod
    def of(cls, dp: DPConfig, federation: FederationConfig, coordinates: int = 0) -> ClientAccount:
        """The account of a run whose clients send updates of ``coordinates`` numbers (needed under secure
        aggregation, where the clients' noise is sized to it)."""
        mechanism = ClientMechanism.of(dp, federation, coordinates)
        return cls(mechanism, dp.delta, dp.accountant, dp.client_target_epsilon)


def composed_epsilon(events: Iterable[tuple[float, float]], delta: float, accountant: str) -> float:
    """Epsilon of one sampled-Gaussian step per ``(noise multiplier, sample rate)`` event, runs of equal
    events folded into one history entry (the accountant's own form)."""
    history: list[tuple[float, float, int]] = []
    for sigma, rate in events:
        if history and history[-1][:2] == (sigma, rate):
            history[-1] = (sigma, rate, history[-1][2] + 1)
        else:
            history.append((sigma, rate, 1))
    return _epsilon(tuple(history), delta, accountant) if history else 0.0


def schedule(dp: DPConfig, federation: FederationConfig, coordinates: int = 0) -> list[tuple[int, float, float]]:
    """``fed plan``'s client-level rows: (round, epsilon RDP, epsilon PRV) after each planned round (under
    distributed DP the Skellam RDP in both columns: the PRV accountant has no Skellam mechanism)."""
    m = ClientMechanism.of(dp, federation, coordinates)
    return [(r, m.epsilon(r, dp.delta, "rdp"), m.epsilon(r, dp.delta, "prv")) for r in range(1, federation.rounds + 1)]


def _distributed(m: ClientMechanism) -> dict[str, Any]:
    """What privacy.json states of distributed DP: who is trusted with what, and the worst case accounted."""
    return {
        "trust": (
            "no one with a single update: each client clips its update and adds its share of Skellam noise; the "
            "server (honest but curious: it follows the protocol) unmasks only the SecAgg+ sum of at least "
            f"{m.min_survivors} clients' updates"
        ),
        "guarantee": DISTRIBUTED_GUARANTEE.format(m=m.min_survivors),
        "mechanism": {
            "name": "distributed Skellam (Agarwal, Kairouz, Liu 2021) inside Flower's SecAgg+",
            "skellam_l1": m.skellam_l1,
            "skellam_l2": m.skellam_l2,
            "skellam_mu": m.skellam_mu,
            "units": "SecAgg+ grid steps (sensitivities of one client's clipped, rounded update; mu of the sum)",
            "gaussian_equivalent_noise_multiplier": m.noise_multiplier,
            "min_survivors": m.min_survivors,
            "sampling": f"Poisson q={m.sample_rate:g}, not credited (no amplification)",
        },
    }
