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

from bench.results import Column, save
from bench.security.canary import Canary, Experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per world (half choose, half measure)")
    parser.add_argument("--sigma", type=float, nargs="+", default=[2.0], help="noise multipliers to audit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for sigma in args.sigma:
        canary = Canary(noise_multiplier=sigma)
        experiment = Experiment(canary)
        claimed = canary.claimed_epsilon()
        for name, reply in (("foundation", experiment.foundation_reply), ("today", experiment.client_reply)):
            start = time.perf_counter()
            result = experiment.run(reply, args.runs)
            verdict = "VIOLATED" if result.violates(claimed) else "holds"
            rows.append(
                (
                    sigma,
                    claimed,
                    name,
                    result.attack,
                    result.tpr,
                    result.fpr,
                    result.epsilon_lower,
                    verdict,
                    time.perf_counter() - start,
                )
            )
            print(rows[-1], flush=True)
    about = (
        f"The canary audit with {args.runs} runs per world (Clopper-Pearson, 95%): the epsilon one round's ledger "
        "claims against the lower bound the attack proves, on the foundation's DP reply (update and raw loss) and on "
        "what a DP client sends today (update and public fields). A lower bound above the claim is a broken "
        "guarantee: the foundation's reply, which released the raw training loss, is the leak the audit was built "
        "to catch and should read VIOLATED; today's reply must hold."
    )
    columns = (
        Column("sigma", digits=2),
        Column("claimed epsilon", digits=3),
        Column("reply"),
        Column("attack"),
        Column("TPR", digits=2),
        Column("FPR", digits=2),
        Column("epsilon lower bound", digits=3),
        Column("verdict"),
        Column("wall", "s", digits=0),
    )
    save("privacy_audit", "Canary audit of a DP client's reply", about, columns, rows)


if __name__ == "__main__":
    main()
