"""Empirical privacy audit, larger than the CI test: more runs per world, optionally several noise levels.

    python -m bench.security.privacy_audit [--runs 200] [--sigma 2 1]

For each noise multiplier: the epsilon the client's ledger claims for one round, and the lower bound
the canary experiment proves (Clopper-Pearson, 95%) against the foundation's DP reply (update + raw
training loss) and against what a DP client sends today (update + public fields). A lower bound above
the claim is a broken guarantee; it is printed as VIOLATED.
"""

from __future__ import annotations

import argparse
import time
import warnings

from bench.security.canary import Canary, Experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per world (half choose, half measure)")
    parser.add_argument("--sigma", type=float, nargs="+", default=[2.0], help="noise multipliers to audit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"{'sigma':>5} {'claimed eps':>11} {'reply':>10} {'attack':>26} {'TPR':>5} {'FPR':>5} {'eps lower':>9} "
        f"{'verdict':>8} {'s':>5}"
    )
    for sigma in args.sigma:
        canary = Canary(noise_multiplier=sigma)
        experiment = Experiment(canary)
        claimed = canary.claimed_epsilon()
        for name, reply in (("foundation", experiment.foundation_reply), ("today", experiment.client_reply)):
            start = time.perf_counter()
            result = experiment.run(reply, args.runs)
            verdict = "VIOLATED" if result.violates(claimed) else "holds"
            print(
                f"{sigma:5.2f} {claimed:11.3f} {name:>10} {result.attack:>26} {result.tpr:5.2f} {result.fpr:5.2f} "
                f"{result.epsilon_lower:9.3f} {verdict:>8} {time.perf_counter() - start:5.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
