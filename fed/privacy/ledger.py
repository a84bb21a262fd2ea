"""Each client's privacy ledger: the DP-SGD events it ran, composed by an Opacus accountant.

The ledger is the accountant's state: a list of (noise multiplier, sample rate, steps) events that
outlives rounds, processes, crashes and runs (it serialises to JSON and is written atomically). Epsilon
is always recomputed from the *whole* list, never reported per round: a fresh accountant per round is
exactly the under-reporting this module exists to prevent. Events are hyper-parameters, not data, so
re-accounting them under another delta or accountant is exact, and the union of two copies of a
ledger (the client's file and the server's book) can only count more, never less.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any

import numpy as np

from fed.privacy.policy import Policy


@dataclass(frozen=True)
class DpSgdEvent:
    """One round of local DP-SGD: ``steps`` Poisson-sampled steps at ``sample_rate`` with this noise."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    run: int = 0
    """The Flower run it belongs to: every run on the same data counts against the same budget."""


def epsilon(events: Iterable[DpSgdEvent], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all events composed; 0 when nothing was spent."""
    return _epsilon(tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in events), delta, accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Memoised: a ledger is re-accounted often (every reply, report and budget check) and rarely changes."""
    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    # Opacus on first use: a client that spends nothing never loads it
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's RDP accountant, with each (noise, rate) curve computed once: its RDP is linear in the steps
    (``compute_rdp`` multiplies one step's curve by them), and a ledger grows by events at the same settings,
    so a new round costs a sum instead of the curve again (tenths of a second per event)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(steps * _rdp_step(sigma, rate) for sigma, rate, steps in history)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=1024)
def _rdp_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at Opacus's default orders (read-only: it is shared by every history that uses it)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )
    curve.flags.writeable = False
    return curve


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: Iterable[DpSgdEvent] = (),
) -> float:
    """The smallest noise multiplier (to 0.1%) for which ``steps`` more steps at ``sample_rate``, after
    the ``prior`` events, spend at most ``target_epsilon``.

    Bisection on the composed epsilon, which falls as the noise grows. Opacus's ``get_noise_multiplier``
    does the same for a fresh accountant only; a client that already spent budget (an earlier run on the
    same data) must plan the remainder. Raises ValueError when the prior events alone exceed the target.
    """
    history = list(prior)

    def spent(sigma: float) -> float:
        return epsilon([*history, DpSgdEvent(0, sigma, sample_rate, steps)], delta, accountant)

    if epsilon(history, delta, accountant) >= target_epsilon:
        raise ValueError(
            f"no budget left: earlier events already spend {epsilon(history, delta, accountant):.3g}"
            f" of the target {target_epsilon:g}"
        )
    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(
                f"target epsilon {target_epsilon:g} is out of reach for {steps} steps at sample rate {sample_rate:g}"
            )
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high


MAX_EVENT_STEPS = 10**6
"""Most steps one event may claim when it comes from the network: far beyond any honest round, small enough
that every accountant composes it in bounded memory."""
MIN_EVENT_NOISE = 0.1
"""Least noise multiplier an event from the network may claim: below it PRV's grid grows without bound (a
noise of 0.05 at rate 1 and 10^6 steps asked for a petabyte), and no honest plan uses it."""


def event_problems(event: DpSgdEvent) -> list[str]:
    """Why an event from the network cannot enter an accountant (empty when it can)."""
    e = event
    if not (math.isfinite(e.noise_multiplier) and MIN_EVENT_NOISE <= e.noise_multiplier <= 1e6):
        return [f"noise_multiplier={e.noise_multiplier} outside [{MIN_EVENT_NOISE}, 1e6]"]
    if not (0 < e.sample_rate <= 1 and 0 <= e.steps <= MAX_EVENT_STEPS):
        return [f"sample_rate={e.sample_rate} must be in (0, 1] and steps={e.steps} in [0, {MAX_EVENT_STEPS}]"]
    return []


@dataclass(frozen=True)
class SplitPin:
    """A node's own train/held-out split, fixed at its first contact and kept in its ledger file.

    ``secret`` (from the OS CSPRNG, never sent) orders the held-out draw of a node's own file, so no
    server can compute which rows are held out; the other fields are the data settings of that first
    contact, used from then on whatever later messages say (a node reads its data as it first did).
    """

    secret: int
    test_fraction: float
    seed: int
    max_examples: int
    labels: tuple[str, ...] | None = None
    """The run's class names at first contact: a later message naming others is refused whatever the file
    holds, so whether a node answers cannot tell the server which labels its file contains."""

    @classmethod
    def first(cls, test_fraction: float, seed: int, max_examples: int, labels: tuple[str, ...] | None) -> SplitPin:
        return cls(secrets.randbits(63), test_fraction, seed, max_examples, labels)

    def public(self) -> dict[str, Any]:
        """The pin less its secret: the data settings of the first contact, all of them the server's own values."""
        return {"test_fraction": self.test_fraction, "seed": self.seed, "max_examples": self.max_examples,
                "labels": None if self.labels is None else list(self.labels)}  # fmt: skip

    @classmethod
    def redrawn(cls, public: Mapping[str, Any]) -> SplitPin:
        """A lost split rebuilt from its public part: the same data settings and labels, a fresh secret (the
        old held-out draw cannot be recovered, so its node no longer knows which rows it trained on)."""
        labels = public["labels"]
        return cls.first(
            public["test_fraction"], public["seed"], public["max_examples"], None if labels is None else tuple(labels)
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitPin:
        labels = data.get("labels")
        return cls(
            int(data["secret"]),
            float(data["test_fraction"]),
            int(data["seed"]),
            int(data["max_examples"]),
            None if labels is None else tuple(str(x) for x in labels),
        )


PINNED = tuple(f.name for f in fields(Policy) if f.name != "reply_delay")
"""The policy fields a pin fixes (the reply grid is the operator's current setting, never pinned)."""
MAX_PIN_CHARS = 1 << 20
"""Longest pin accepted from the network: far beyond any label set, small enough to parse at once."""


@dataclass(frozen=True)
class NodePin:
    """What a node pinned, less its secret seed: sent with its DP train replies, kept by the server beside its
    events and returned with them, so a node that lost its state dir restores its whole pin (DP required, the
    caps, evaluation, the split's data settings), not only "DP required"."""

    policy: Policy
    split: Mapping[str, Any] | None = None
    """``SplitPin.public()``: the first contact's data settings, without the secret."""
    reply_delay: float = 0.0
    """The node's reply grid (not pinned, declared in privacy.json): what timing its replies show."""

    def to_json(self) -> str:
        policy = {k: v for k, v in self.policy.to_dict().items() if k in PINNED}
        return json.dumps({"policy": policy, "split": self.split, "reply_delay": self.reply_delay})

    @classmethod
    def from_json(cls, text: str) -> NodePin:
        """A pin from the network, every field checked: ValueError names the first bad one."""
        if len(text) > MAX_PIN_CHARS:
            raise ValueError(f"a pin of {len(text)} characters (at most {MAX_PIN_CHARS})")
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"policy", "split", "reply_delay"}:
            raise ValueError(f"not a pin: keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        policy, split = data["policy"], data["split"]
        if not isinstance(policy, dict) or set(policy) != set(PINNED):
            raise ValueError(f"a pin's policy must have exactly the keys {sorted(PINNED)}")
        for key, value in [*policy.items(), ("reply_delay", data["reply_delay"])]:
            check, accepted = _PIN_CHECKS[key]
            if not check(value):
                raise ValueError(f"pin {key}={value!r}: expected {accepted}")
        if split is not None and not _public_split(split):
            raise ValueError(
                f"pin split={split!r}: expected test_fraction in [0, 1), whole seed and max_examples, labels"
            )
        return cls(Policy.from_dict({**policy, "reply_delay": 0.0}), split, float(data["reply_delay"]))


def _number_in(value: Any, low: float, high: float) -> bool:
    """A finite number in (low, high] (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


_PIN_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dp_required": (lambda v: isinstance(v, bool), "true or false"),
    "evaluate": (lambda v: isinstance(v, bool), "true or false"),
    "max_epsilon": (lambda v: v is None or _number_in(v, 0, 1e9), "null or a number in (0, 1e9]"),
    "delta": (lambda v: _number_in(v, 0, 1), "a number in (0, 1]"),
    "min_noise_multiplier": (lambda v: v == 0 or _number_in(v, 0, 1e6), "a number in [0, 1e6]"),
    "max_grad_norm": (lambda v: v is None or _number_in(v, 0, 1e9), "null or a number in (0, 1e9]"),
    "min_eval_rows": (lambda v: _int_in(v, 0, 10**9), "a whole number in [0, 1e9]"),
    "reply_delay": (lambda v: v == 0 or _number_in(v, 0, 86400), "seconds in [0, 86400]"),
}
"""Each field of a pin from the network: its check and, for the error, what is accepted."""


def _public_split(split: Any) -> bool:
    """Whether ``split`` is a ``SplitPin.public()`` a node can rebuild its split from."""
    if not isinstance(split, dict) or set(split) != {"test_fraction", "seed", "max_examples", "labels"}:
        return False
    labels = split["labels"]
    return (
        (split["test_fraction"] == 0 or _number_in(split["test_fraction"], 0, 0.99))
        and _int_in(split["seed"], -(2**63), 2**63 - 1)
        and _int_in(split["max_examples"], 0, 10**12)
        and (
            labels is None or (isinstance(labels, list) and all(isinstance(x, str) and len(x) <= 1000 for x in labels))
        )
    )


@dataclass
class Ledger:
    """A client's privacy account across runs: its events, and the policy its first DP round pinned."""

    accountant: str
    delta: float
    target_epsilon: float = 0.0
    """The cap the budget guard enforces in this run (0 = none)."""
    noise_multiplier: float = 0.0
    """Planned once per run for the whole schedule and reused every round, so the plan's guarantee holds."""
    run: int = 0
    """The run ``noise_multiplier`` was planned for."""
    policy: Policy | None = None
    """Pinned at the first DP round; every later round (of any run) must be at least as strict."""
    events: list[DpSgdEvent] = field(default_factory=list)
    split: SplitPin | None = None
    """The node's pinned data split (client-side only: the server's book never holds one)."""

    def epsilon(self) -> float:
        return epsilon(self.events, self.delta, self.accountant)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.events)

    def affordable_steps(self, event: DpSgdEvent) -> int:
        """How many of ``event.steps`` fit under the target (all of them when no target is set).

        Binary search over the composed epsilon, which is monotone in steps.
        """

        def fits(steps: int) -> bool:
            trial = [*self.events, DpSgdEvent(event.round, event.noise_multiplier, event.sample_rate, steps)]
            return epsilon(trial, self.delta, self.accountant) <= self.target_epsilon

        if self.target_epsilon <= 0 or fits(event.steps):
            return event.steps
        if not fits(0):
            return 0
        low, high = 0, event.steps  # fits(low) holds, fits(high) does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def record(self, event: DpSgdEvent) -> None:
        self.events.append(event)

    def merge(self, events: Iterable[DpSgdEvent]) -> int:
        """Add the events this ledger lacks (e.g. the server's copy after the client lost its file).

        A multiset union: an event that happened k times in either copy is counted max(k) times (a round
        replayed three times spent three times; the same event held by both copies spent once), so a merge
        can only raise epsilon. Returns how many were added.
        """
        have = Counter(self.events)
        missing = []
        for event, count in Counter(events).items():
            missing += [event] * max(0, count - have[event])
        self.events = [*self.events, *missing]  # arrival order: run ids are random, so they do not sort runs
        return len(missing)

    def to_dict(self, epsilon: float | None = None) -> dict[str, Any]:
        """Plain data; ``epsilon`` is this ledger's figure when the caller already holds it (the server's
        book memoises it per client), else it is recomputed."""
        data = {**asdict(self), "epsilon": self.epsilon() if epsilon is None else epsilon, "steps": self.steps}
        data["policy"] = self.policy.to_dict() if self.policy else None
        data["split"] = asdict(self.split) if self.split else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        events = [DpSgdEvent(**e) for e in data.get("events", [])]
        policy = Policy.from_dict(data["policy"]) if data.get("policy") else None
        split = SplitPin.from_dict(data["split"]) if data.get("split") else None
        return cls(
            accountant=data["accountant"],
            delta=float(data["delta"]),
            target_epsilon=float(data.get("target_epsilon", 0.0)),
            noise_multiplier=float(data.get("noise_multiplier", 0.0)),
            run=int(data.get("run", 0)),
            policy=policy,
            events=events,
            split=split,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        return cls.from_dict(json.loads(text))


def events_to_json(events: Iterable[DpSgdEvent]) -> str:
    return json.dumps([asdict(e) for e in events])


def events_from_json(text: str) -> list[DpSgdEvent]:
    """Events from the network (the server's copy): every field checked, anything else refused."""
    events = []
    for item in json.loads(text):
        if not isinstance(item, dict) or set(item) != {"round", "noise_multiplier", "sample_rate", "steps", "run"}:
            raise ValueError(f"not a DP event: {item!r}")
        event = DpSgdEvent(
            int(item["round"]),
            float(item["noise_multiplier"]),
            float(item["sample_rate"]),
            int(item["steps"]),
            int(item["run"]),
        )
        if problems := event_problems(event):
            raise ValueError(f"impossible DP event {item!r}: {problems[0]}")
        events.append(event)
    return events
