"""Decide a client's DP-SGD mechanism for a round, and how many steps its budget still allows.

With a target epsilon the noise is calibrated once, over the whole planned schedule (every round the
client may join times the local steps), and kept in the ledger; each round then trains only the
steps that still fit under the target, so a client never trains past its budget.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from fed.config import DPConfig
from fed.privacy.dpsgd import DpSettings
from fed.privacy.ledger import Ledger, calibrate_noise


@dataclass(frozen=True)
class RoundPlan:
    dp: DpSettings | None
    steps: int
    """Steps this round may take; 0 means the client must decline."""


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson rate whose expected batch is ``batch_size`` (capped at the whole dataset)."""
    return min(1.0, batch_size / num_examples)


def new_ledger(dp: DPConfig) -> Ledger:
    return Ledger(accountant=dp.accountant, delta=dp.delta, target_epsilon=dp.target_epsilon,
                  noise_multiplier=dp.noise_multiplier)


def plan_round(dp: DPConfig, ledger: Ledger, *, num_examples: int, batch_size: int, local_steps: int,
               rounds: int, round_: int) -> RoundPlan:
    """The mechanism and step count for this round; calibrates the ledger's noise on first use."""
    if not dp.enabled:
        return RoundPlan(None, local_steps)
    q = sample_rate(batch_size, num_examples)
    if ledger.noise_multiplier <= 0:
        ledger.noise_multiplier = calibrate_noise(dp.target_epsilon, dp.delta, q, rounds * local_steps,
                                                  dp.accountant)
    steps = ledger.affordable_steps(round_, q, local_steps)
    settings = DpSettings(noise_multiplier=ledger.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                          sample_rate=q, num_examples=num_examples, mode=dp.grad_sample_mode)
    return RoundPlan(settings, steps)


def private_generator() -> torch.Generator:
    """Noise and sampling randomness from OS entropy: never derived from the run seed, which the server
    knows and could use to regenerate (and subtract) the noise."""
    return torch.Generator().manual_seed(secrets.randbits(63))
