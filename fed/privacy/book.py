"""The server's copy of every client's ledger, rebuilt from the DP events clients report each round.

Events are hyper-parameters (noise, sample rate, steps), not data, so the server can recompose them
with its own accountant and cross-check each client's own epsilon. The result is ``privacy.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fed.config import DPConfig
from fed.privacy.ledger import DpSgdEvent, Ledger
from fed.privacy.planner import new_ledger

log = logging.getLogger(__name__)

GUARANTEE = ("(epsilon, delta)-DP for each client's training examples: neighbouring datasets differ by "
             "adding or removing one example of that client (DP-SGD with Poisson sampling, per-example "
             "clipping of the trained adapter tensors, Gaussian noise)")


def _event(round_: int, metrics: Mapping[str, Any]) -> tuple[int, DpSgdEvent, float]:
    """Client id, DP event and self-reported epsilon of a reply, or ValueError naming the bad field."""
    cid, steps = metrics["partition-id"], metrics["dp-steps"]
    sigma, rate, eps = (float(metrics[k]) for k in ("dp-noise-multiplier", "dp-sample-rate", "epsilon"))
    if not (isinstance(cid, int) and cid >= 0 and isinstance(steps, int) and steps >= 0):
        raise ValueError(f"partition-id={cid!r} and dp-steps={steps!r} must be non-negative integers")
    if not (sigma > 0 and 0 < rate <= 1 and math.isfinite(sigma) and math.isfinite(eps)):
        raise ValueError(f"dp-noise-multiplier={sigma} must be > 0, dp-sample-rate={rate} in (0, 1], epsilon finite")
    return cid, DpSgdEvent(round_, sigma, rate, steps), eps


@dataclass
class LedgerBook:
    dp: DPConfig
    ledgers: dict[int, Ledger] = field(default_factory=dict)
    reported_epsilon: dict[int, float] = field(default_factory=dict)

    def observe(self, round_: int, metrics: Mapping[str, Any]) -> None:
        """Record the DP event in one client's reply (a reply without DP metrics spent nothing).

        The values come from the network, so they are checked before they enter a ledger; a malformed
        event is logged and left out rather than allowed to stop the run.
        """
        if "dp-steps" not in metrics:
            return
        try:
            cid, event, reported = _event(round_, metrics)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("round %d: ignoring a malformed DP event %s: %s", round_, dict(metrics), err)
            return
        ledger = self.ledgers.setdefault(cid, new_ledger(self.dp))
        ledger.noise_multiplier = event.noise_multiplier
        ledger.record(event)
        self.reported_epsilon[cid] = reported

    def max_epsilon(self) -> float:
        return max((ledger.epsilon() for ledger in self.ledgers.values()), default=0.0)

    def report(self) -> dict[str, Any]:
        clients = {}
        for cid in sorted(self.ledgers):
            entry = self.ledgers[cid].to_dict()
            entry["sample_rate"] = entry["events"][-1]["sample_rate"] if entry["events"] else None
            entry["client_reported_epsilon"] = self.reported_epsilon.get(cid)
            clients[str(cid)] = entry
        return {"enabled": self.dp.enabled, "guarantee": GUARANTEE if self.dp.enabled else "none (DP disabled)",
                "accountant": self.dp.accountant, "delta": self.dp.delta, "target_epsilon": self.dp.target_epsilon,
                "max_epsilon": self.max_epsilon(), "clients": clients}

    def to_json(self) -> str:
        """Everything needed to continue the book after a restart (the checkpoint stores it each round)."""
        return json.dumps({"dp": asdict(self.dp), "ledgers": {str(c): l.to_dict() for c, l in self.ledgers.items()},
                           "reported_epsilon": {str(c): e for c, e in self.reported_epsilon.items()}})

    @classmethod
    def from_json(cls, text: str) -> LedgerBook:
        data = json.loads(text)
        return cls(DPConfig(**data["dp"]), {int(c): Ledger.from_dict(l) for c, l in data["ledgers"].items()},
                   {int(c): float(e) for c, e in data["reported_epsilon"].items()})
