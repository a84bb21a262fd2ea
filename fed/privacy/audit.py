"""Empirical privacy auditing: a lower bound on epsilon from a distinguishing experiment.

If a mechanism is (epsilon, delta)-DP, every test that tells "canary in" from "canary out" apart has
TPR <= e^epsilon * FPR + delta. Run the mechanism many times in each world, pick a threshold on a
calibration half, count hits on the other half, and bound TPR from below and FPR from above with
Clopper-Pearson intervals: the epsilon these bounds imply is a statistically valid lower bound, so a
claimed epsilon below it is a broken guarantee (Jagielski et al. 2020, Nasr et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import beta


def clopper_pearson(hits: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 - alpha) confidence interval of a binomial proportion (exact, conservative)."""
    low = 0.0 if hits == 0 else float(beta.ppf(alpha / 2, hits, trials - hits + 1))
    high = 1.0 if hits == trials else float(beta.ppf(1 - alpha / 2, hits + 1, trials - hits))
    return low, high


def epsilon_lower_bound(tp: int, positives: int, fp: int, negatives: int, delta: float, alpha: float = 0.05) -> float:
    """The epsilon that (TPR, FPR) at confidence 1 - alpha forces.

    DP bounds every event in both directions, so four ratios count: TPR/FPR and TNR/FNR (the test and its
    complement), and the same with the worlds swapped (a canary that lowers the score).
    """
    tpr_lo, tpr_hi = clopper_pearson(tp, positives, alpha)
    fpr_lo, fpr_hi = clopper_pearson(fp, negatives, alpha)
    pairs = [(tpr_lo, fpr_hi), (1 - fpr_hi, 1 - tpr_lo), (fpr_lo, tpr_hi), (1 - tpr_hi, 1 - fpr_lo)]
    return max([0.0] + [math.log((a - delta) / b) for a, b in pairs if a - delta > 0 and b > 0])


def _hits(scores: Sequence[float], threshold: float) -> int:
    return sum(s > threshold for s in scores)


def _best_threshold(inside: Sequence[float], outside: Sequence[float], delta: float) -> tuple[float, float]:
    """The threshold (and its bound) that maximises the lower bound on these scores."""
    best = (-math.inf, 0.0)
    for threshold in sorted(set(inside) | set(outside)):
        bound = epsilon_lower_bound(
            _hits(inside, threshold), len(inside), _hits(outside, threshold), len(outside), delta
        )
        if bound > best[1]:
            best = (threshold, bound)
    return best


@dataclass(frozen=True)
class AuditResult:
    attack: str
    """The score the calibration half chose (a metric name, or the update attack)."""
    tpr: float
    fpr: float
    epsilon_lower: float
    runs: int
    """Evaluation runs per world."""

    def violates(self, claimed_epsilon: float) -> bool:
        return self.epsilon_lower > claimed_epsilon


def audit(inside: Sequence[Mapping[str, float]], outside: Sequence[Mapping[str, float]], delta: float) -> AuditResult:
    """Score-based audit: each run is a mapping attack name -> score (higher = "canary in").

    The first half of each world's runs chooses the attack and its threshold, the second half measures
    TPR and FPR with them, so choosing never inflates the bound.
    """
    half_in, half_out = len(inside) // 2, len(outside) // 2
    attacks = sorted(set.intersection(*(set(run) for run in [*inside, *outside])))
    chosen, threshold, best = attacks[0], math.inf, -1.0
    for attack in attacks:
        t, bound = _best_threshold(
            [r[attack] for r in inside[:half_in]], [r[attack] for r in outside[:half_out]], delta
        )
        if bound > best:
            chosen, threshold, best = attack, t, bound
    eval_in = [r[chosen] for r in inside[half_in:]]
    eval_out = [r[chosen] for r in outside[half_out:]]
    tp, fp = _hits(eval_in, threshold), _hits(eval_out, threshold)
    return AuditResult(
        chosen,
        tp / len(eval_in),
        fp / len(eval_out),
        epsilon_lower_bound(tp, len(eval_in), fp, len(eval_out), delta),
        len(eval_in),
    )
