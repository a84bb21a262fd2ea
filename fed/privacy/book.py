"""The server's copy of every client's ledger, rebuilt from the DP events clients report each round.

Events are hyper-parameters (noise, sample rate, steps), not data, so the server can recompose them
with its own accountant and cross-check each client's own epsilon. The result is ``privacy.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from fed.config import DPConfig
from fed.privacy.ledger import DpSgdEvent, Ledger
from fed.privacy.planner import new_ledger

GUARANTEE = ("(epsilon, delta)-DP for each client's training examples: neighbouring datasets differ by "
             "adding or removing one example of that client (DP-SGD with Poisson sampling, per-example "
             "clipping of the trained adapter tensors, Gaussian noise)")


@dataclass
class LedgerBook:
    dp: DPConfig
    ledgers: dict[int, Ledger] = field(default_factory=dict)
    reported_epsilon: dict[int, float] = field(default_factory=dict)

    def observe(self, round_: int, metrics: Mapping[str, Any]) -> None:
        """Record the DP event in one client's reply (a reply without DP metrics spent nothing)."""
        if "dp-steps" not in metrics:
            return
        cid = int(metrics["partition-id"])
        ledger = self.ledgers.setdefault(cid, new_ledger(self.dp))
        ledger.noise_multiplier = float(metrics["dp-noise-multiplier"])
        ledger.record(DpSgdEvent(round_, ledger.noise_multiplier, float(metrics["dp-sample-rate"]),
                                 int(metrics["dp-steps"])))
        self.reported_epsilon[cid] = float(metrics["epsilon"])

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
