"""The attack test at full size: MiniLM on the 4-domain sentiment set, 5 clients, one attacker.

    python -m bench.security.attack [--scale -20] [--rounds 3] [--set key=value ...]

Runs the same federation three times, back to back: clean, attacked with the server's defaults
(capped weights, adaptive norm clipping), attacked with them off. The attacker multiplies its delta
by ``--scale`` every round (negative: sign-flipped). Prints the final accuracy and eval loss of each,
and the gap to the clean run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.results import Column, save
from bench.security.redteam import hostile_client
from fed.config.sources import resolve
from simulations.run import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=-20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = ["federation.num_clients=5", f"federation.rounds={args.rounds}", *args.overrides]
    runs = [
        ("clean", [], False),
        ("attacked, defaults", [], True),
        ("attacked, defaults off", ["strategy.weighting=examples", "strategy.clip=off"], True),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name, extra, attacked in runs:
            cfg = resolve("quickstart", [*base, *extra])
            start = time.perf_counter()
            run = simulate(
                cfg,
                out,
                name=name.replace(" ", "-").replace(",", ""),
                **({"client": hostile_client(args.scale)} if attacked else {}),
            )
            results[name] = (run.metrics()[-1], time.perf_counter() - start)
    clean = results["clean"][0]["eval_accuracy"]
    rows = [
        (name, line["eval_accuracy"], line["eval_accuracy"] - clean, line["eval_loss"], line["clipped"], wall)
        for name, (line, wall) in results.items()
    ]
    about = (
        f"The quickstart with 5 clients and {args.rounds} rounds, overrides {' '.join(args.overrides) or 'none'}; "
        f"client 0 sends {args.scale:g} x its delta every round."
    )
    columns = (
        Column("run"),
        Column("accuracy", digits=3),
        Column("vs clean", digits=3),
        Column("eval loss", digits=3),
        Column("clipped"),
        Column("wall", "s", digits=0),
    )
    print(about, *rows, sep="\n")
    save("attack", "One hostile client against the server's bounded influence", about, columns, rows)


if __name__ == "__main__":
    main()
