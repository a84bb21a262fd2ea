"""Decide a client's DP-SGD mechanism for a round, and how many steps its budget still allows.

The client, not the server, decides: the server's DP settings are checked against the client's own
policy (and the pin of its first DP round) and refused when weaker. With a target epsilon the noise is
calibrated once per run, over the whole planned schedule (every round the client may join times the
local steps) *after* whatever earlier runs already spent on the same data; each round then trains only
the steps that still fit under the target, so a client never trains past its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed.config import DPConfig
from fed.privacy.ledger import DpSgdEvent, Ledger, calibrate_noise, epsilon
from fed.privacy.mechanism import DpSettings
from fed.privacy.policy import Policy


@dataclass(frozen=True)
class RoundPlan:
    dp: DpSettings | None
    steps: int
    """Steps this round may take; 0 means the client must decline."""
    refused: str = ""
    """Why the server's settings break this client's policy (then steps is 0)."""


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson rate whose expected batch is ``batch_size`` (capped at the whole dataset)."""
    return min(1.0, batch_size / num_examples)


def new_ledger(dp: DPConfig) -> Ledger:
    return Ledger(
        accountant=dp.accountant, delta=dp.delta, target_epsilon=dp.target_epsilon, noise_multiplier=dp.noise_multiplier
    )


def delta_problems(delta: float, num_examples: int) -> list[str]:
    """delta must be at most 1/(10 n): at delta ~ 1/n the mechanism may release one example in the clear."""
    limit = 1.0 / (10 * num_examples)
    if delta <= limit:
        return []
    return [
        f"dp.delta={delta:g} is larger than 1/(10 n) = {limit:.3g} for this client's n={num_examples} "
        "training examples; use a smaller delta"
    ]


def _start_run(dp: DPConfig, ledger: Ledger, policy: Policy, run: int, rate: float, planned_steps: int) -> None:
    """First round of ``run`` on this ledger: re-account under the run's delta and accountant, set the
    cap, and plan the noise for the whole schedule on top of what earlier runs already spent."""
    ledger.accountant, ledger.delta, ledger.run = dp.accountant, dp.delta, run
    cap = min(dp.target_epsilon if dp.target_epsilon > 0 else math.inf, policy.max_epsilon)
    ledger.target_epsilon = 0.0 if math.isinf(cap) else cap
    if dp.target_epsilon <= 0:
        ledger.noise_multiplier = dp.noise_multiplier
        return
    try:
        sigma = calibrate_noise(dp.target_epsilon, dp.delta, rate, planned_steps, dp.accountant, ledger.events)
    except ValueError:  # nothing left of the budget: the guard below lets no step through
        sigma = math.inf
    ledger.noise_multiplier = max(sigma, policy.min_noise_multiplier)


def history_pin(ledger: Ledger) -> Policy:
    """What the ledger pins: its first DP round's settings, or, when only events survive (a lost file
    whose events the server returned), DP itself: a node that ever spent budget never trains without DP."""
    if ledger.policy is not None:
        return ledger.policy
    return Policy(dp_required=bool(ledger.events), min_eval_rows=0)


def plan_round(
    dp: DPConfig,
    ledger: Ledger,
    *,
    num_examples: int,
    batch_size: int,
    local_steps: int,
    rounds: int,
    round_: int,
    policy: Policy = Policy(),
    run: int = 0,
) -> RoundPlan:
    """The mechanism and step count for this round, or a refusal naming what breaks the policy.

    ``policy`` is the node's own floor; the ledger's pin (``history_pin``) tightens it.
    On a DP round the ledger is updated in place: its run settings on first use, its pin.
    """
    effective = policy.strictest(history_pin(ledger))
    problems = effective.violations(dp)
    if dp.example_level:
        problems += delta_problems(dp.delta, num_examples)
    if problems:
        return RoundPlan(None, 0, refused="; ".join(problems))
    if not dp.example_level:
        return RoundPlan(None, local_steps)
    q = sample_rate(batch_size, num_examples)
    if ledger.run != run or ledger.noise_multiplier <= 0 or ledger.policy is None:
        _start_run(dp, ledger, effective, run, q, rounds * local_steps)
    ledger.policy = effective.pinned_by(dp)
    if math.isinf(ledger.noise_multiplier):
        return RoundPlan(None, 0)
    steps = ledger.affordable_steps(DpSgdEvent(round_, ledger.noise_multiplier, q, local_steps, run))
    settings = DpSettings(
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=q,
        num_examples=num_examples,
        mode=dp.grad_sample_mode,
        head_clip_share=dp.head_clip_share,
        loss_noise_multiplier=dp.loss_noise_multiplier,
        loss_clip=dp.loss_clip,
        noise_source=dp.noise_source,
    )
    try:
        settings.gradient_noise_multiplier  # noqa: B018  (the loss release must leave the gradient some budget)
    except ValueError as err:
        return RoundPlan(None, 0, refused=str(err))
    return RoundPlan(settings, steps)


@dataclass(frozen=True)
class ScheduleRow:
    round: int
    steps: int
    """Expected DP steps spent by the end of this round (participation times local steps per round)."""
    epsilon_rdp: float
    epsilon_prv: float


@dataclass(frozen=True)
class Schedule:
    """What ``fed plan`` prints: the noise a client will use and what it spends round by round."""

    noise_multiplier: float
    sample_rate: float
    delta_problems: list[str]
    rows: list[ScheduleRow]


def plan_schedule(
    dp: DPConfig, *, num_examples: int, batch_size: int, local_steps: int, rounds: int, participation: float = 1.0
) -> Schedule:
    """The noise multiplier a client calibrates (for all ``rounds``, as ``plan_round`` does: a client may be
    picked every round) and the epsilon after each round at the expected participation, RDP and PRV."""
    q = sample_rate(batch_size, num_examples)
    if dp.target_epsilon > 0:
        sigma = calibrate_noise(dp.target_epsilon, dp.delta, q, rounds * local_steps, dp.accountant)
    else:
        sigma = dp.noise_multiplier
    rows = []
    for r in range(1, rounds + 1):
        steps = round(participation * r * local_steps)
        events = [DpSgdEvent(1, sigma, q, steps)] if steps else []
        rows.append(ScheduleRow(r, steps, epsilon(events, dp.delta, "rdp"), epsilon(events, dp.delta, "prv")))
    return Schedule(sigma, q, delta_problems(dp.delta, num_examples), rows)
