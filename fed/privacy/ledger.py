"""Each client's privacy ledger: the DP-SGD events it ran, composed by an Opacus accountant.

The ledger is the accountant's state: a list of (noise multiplier, sample rate, steps) events that
outlives rounds, processes and crashes (it serialises to JSON and is written atomically). Epsilon is
always recomputed from the *whole* list, never reported per round: a fresh accountant per round is
exactly the under-reporting this module exists to prevent.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class DpSgdEvent:
    """One round of local DP-SGD: ``steps`` Poisson-sampled steps at ``sample_rate`` with this noise."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon(events: list[DpSgdEvent], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all events composed; 0 when nothing was spent."""
    if not events:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier for which ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


@dataclass
class Ledger:
    """A client's privacy account across the whole run."""

    accountant: str
    delta: float
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    """Planned once for the whole schedule and reused every round, so the plan's guarantee holds."""
    events: list[DpSgdEvent] = field(default_factory=list)

    def epsilon(self) -> float:
        return epsilon(self.events, self.delta, self.accountant)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.events)

    def affordable_steps(self, round_: int, sample_rate: float, wanted: int) -> int:
        """How many of ``wanted`` steps fit under the target (all of them when no target is set).

        Binary search over the composed epsilon, which is monotone in steps.
        """
        def fits(steps: int) -> bool:
            trial = [*self.events, DpSgdEvent(round_, self.noise_multiplier, sample_rate, steps)]
            return epsilon(trial, self.delta, self.accountant) <= self.target_epsilon

        if self.target_epsilon <= 0 or fits(wanted):
            return wanted
        low, high = 0, wanted  # fits(low) holds (spent so far is within target), fits(high) does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def record(self, event: DpSgdEvent) -> None:
        self.events.append(event)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epsilon": self.epsilon(), "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        events = [DpSgdEvent(**e) for e in data.get("events", [])]
        return cls(accountant=data["accountant"], delta=float(data["delta"]),
                   target_epsilon=float(data.get("target_epsilon", 0.0)),
                   noise_multiplier=float(data.get("noise_multiplier", 0.0)), events=events)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        return cls.from_dict(json.loads(text))


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
