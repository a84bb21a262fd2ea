"""A canary experiment at the client level: one whole client, whose update is a fixed large direction, in or out.

Two federations differ in one client. The canary's round update is ``scale`` times a fixed unit direction u
(far beyond the clip, so the server clips it to C); the honest clients send small random updates. Each run
is one round of the real strategy core with the ``ClientLevelDP`` stage (every client sampled, q = 1, so the
canary is there whenever its world says so); the attacker sees only the released global adapter and scores
its projection on u. ``fed.privacy.audit.audit`` turns the scores of both worlds into a lower bound on
epsilon; ``tpr_at_fpr`` reads the attack's true-positive rate at a low false-positive rate, which an
(epsilon, delta)-DP release keeps under ``e^epsilon FPR + delta``.

    python -m bench.security.client_canary            # 2,000 runs per world
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from unittest import mock

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fed.adapters import Aggregation, Structure
from fed.config import DPConfig, FederationConfig
from fed.privacy.audit import AuditResult, audit, clopper_pearson
from fed.privacy.client_level import ClientAccount, ClientMechanism, client_epsilon
from fed.wire import from_record, metas, to_record
from strategies.client_dp import ClientLevelDP
from strategies.core import AdapterStrategy
from strategies.pipeline import AdapterModel, Reply, RoundState, Stage


@dataclass(frozen=True)
class ClientCanary:
    honest: int = 5
    dim: int = 64
    noise_multiplier: float = 1.0
    """What the guarantee claims."""
    actual_noise_multiplier: float = 0.0
    """What the server really adds (0: the claimed one; less: a broken mechanism the audit must catch)."""
    clip: float = 1.0
    scale: float = 10.0
    """The canary's update norm, in units of the clip."""
    delta: float = 1e-5
    runs: int = 2000
    """Runs per world (half choose the threshold, half measure)."""

    def claimed_epsilon(self) -> float:
        return client_epsilon(self.noise_multiplier, 1.0, 1, self.delta, "rdp")

    def strategy(self) -> AdapterStrategy:
        """The core with the client-level stage, for a federation of the honest clients plus the canary's seat."""
        dp = DPConfig(
            enabled=True, level="client", client_noise_multiplier=self.noise_multiplier, client_clip=self.clip
        )
        account = ClientAccount.of(dp, FederationConfig(num_clients=self.honest + 1, fraction_train=1.0))
        if self.actual_noise_multiplier:
            account.mechanism = ClientMechanism(self.actual_noise_multiplier, 1.0, self.honest + 1, self.clip)
        strategy = AdapterStrategy(model=MODEL(self.dim), stages=[ClientLevelDP(account), _Decode(self.dim)])
        strategy._global = {"w": torch.zeros(self.dim)}
        return strategy

    def score(self, canary_in: bool, direction: torch.Tensor, generator: torch.Generator) -> float:
        """One round in one world: the released update's projection on the canary's direction."""
        updates = [torch.randn(self.dim, generator=generator) * 0.01 for _ in range(self.honest)]
        if canary_in:
            updates.append(direction * self.scale * self.clip)
        replies = [
            Message(
                RecordDict({"arrays": to_record({"w": u}), "metrics": MetricRecord({"num-examples": 10})}), 1, "train"
            )
            for u in updates
        ]
        arrays, _ = self.strategy().aggregate_train(1, replies)
        return float(from_record(arrays, MODEL(self.dim).expected)["w"] @ direction)

    def worlds(self, seed: int = 0) -> tuple[list[float], list[float]]:
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(self.dim, generator=generator)
        direction /= direction.norm()
        quiet = logging.getLogger("flwr")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # Flower logs every aggregation at INFO
        with mock.patch.multiple(TaskIdentity, _run_id=1, _node_id=1, _task_id=1):  # what Flower would have set
            inside = [self.score(True, direction, generator) for _ in range(self.runs)]
            outside = [self.score(False, direction, generator) for _ in range(self.runs)]
        quiet.setLevel(level)
        return inside, outside

    def run(self, seed: int = 0) -> tuple[AuditResult, tuple[float, float]]:
        """The audit's epsilon lower bound, and (TPR, FPR) at a 1% false-positive threshold."""
        inside, outside = self.worlds(seed)
        result = audit([{"projection": s} for s in inside], [{"projection": s} for s in outside], self.delta)
        return result, tpr_at_fpr(inside, outside, 0.01)


def tpr_at_fpr(inside: list[float], outside: list[float], fpr: float) -> tuple[float, float]:
    """(TPR, FPR) on the second half of each world at the threshold the first half of ``outside`` puts at
    ``fpr`` false positives."""
    half_in, half_out = len(inside) // 2, len(outside) // 2
    calibration = sorted(outside[:half_out])
    threshold = calibration[min(len(calibration) - 1, math.ceil((1 - fpr) * len(calibration)))]
    tp = sum(s > threshold for s in inside[half_in:])
    fp = sum(s > threshold for s in outside[half_out:])
    return tp / (len(inside) - half_in), fp / (len(outside) - half_out)


def within_epsilon(tpr: float, fpr: float, runs: int, epsilon: float, delta: float, alpha: float = 0.05) -> bool:
    """Whether the measured rates are consistent with ``TPR <= e^epsilon FPR + delta`` at confidence 1 - alpha
    (the lower end of TPR's interval against the upper end of FPR's)."""
    tpr_lo, _ = clopper_pearson(round(tpr * runs), runs, alpha)
    _, fpr_hi = clopper_pearson(round(fpr * runs), runs, alpha)
    return tpr_lo <= math.exp(epsilon) * fpr_hi + delta


def MODEL(dim: int) -> AdapterModel:
    return AdapterModel(metas({"w": torch.zeros(dim)}), Structure({"w": Aggregation.MEAN}))


class _Decode(Stage):
    """The least intake the core needs (the real validation stage is tested elsewhere)."""

    def __init__(self, dim: int) -> None:
        self.expected = MODEL(dim).expected

    def arrive(self, state: RoundState, reply: Reply) -> None:
        reply.delta = from_record(reply.message.content.array_records["arrays"], self.expected)
        reply.weight = float(reply.metrics["num-examples"])


def main() -> None:
    canary = ClientCanary()
    result, (tpr, fpr) = canary.run()
    print(json.dumps({**asdict(result), "tpr_at_1pct": tpr, "fpr": fpr, "claimed_epsilon": canary.claimed_epsilon()}))


if __name__ == "__main__":
    main()
