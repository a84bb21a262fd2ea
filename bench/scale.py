"""Many virtual clients on a small machine: wall time per round and peak memory at 10, 100 and 1,000 clients.

Each size is one ``fed simulate`` run in its own process (Ray started afresh), 10% of the clients sampled
per round for training and for evaluation, 2 local steps each, DP-SGD on (sigma = 1), and a fixed, tiny
share of data per client (``--rows`` examples each, from the 23k-row sentiment set), so that what grows
with the number of clients is the federation's own bookkeeping, not the training work per client:

    python -m bench run scale                        # 10, 100, 1000 clients, 2 rounds, tiny-bert
    python -m bench run scale --clients 10 100 --model default --set train.precision=bf16

The model defaults to the tiny random BERT: with it a round is mostly the per-client overhead (messages,
ledgers, privacy accounting, data splits) this bench exists to watch. Peak memory is the whole process
tree (driver, Ray's daemons, the actors), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.results import Column, save
from bench.treemem import run_measured

ROOT = Path(__file__).resolve().parents[1]


def overrides(clients: int, args: argparse.Namespace) -> list[str]:
    return [
        f"model.name={args.model}",
        "data.name=sentiment",
        "data.partition=iid",
        f"data.max_examples={clients * args.rows}",
        f"federation.num_clients={clients}",
        f"federation.rounds={args.rounds}",
        "federation.fraction_train=0.1",
        "federation.fraction_evaluate=0.1",
        "train.local_steps=2",
        "train.batch_size=8",
        "dp.enabled=true",
        "dp.noise_multiplier=1.0",
        *args.set,
    ]


def run_size(clients: int, args: argparse.Namespace, out: Path) -> dict:
    argv = [
        sys.executable,
        "-m",
        "simulations.cli",
        "simulate",
        "--preset",
        "quickstart",
        "--out",
        str(out),
        "--name",
        f"n{clients}",
        *[a for o in overrides(clients, args) for a in ("--set", o)],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    measured = run_measured(argv, env=env, cwd=ROOT, log=out / f"n{clients}.log")
    if measured.returncode != 0:
        raise SystemExit(f"{clients} clients: fed simulate exited {measured.returncode}; see {out}/n{clients}.log")
    lines = [json.loads(line) for line in (out / f"n{clients}" / "metrics.jsonl").read_text().splitlines()]
    return {
        "clients": clients,
        "total_s": measured.wall_s,
        "cpu_s": measured.cpu_s,
        "peak_mb": measured.peak_mb,
        "round_s": [line["wall_s"] for line in lines],
        "load": (measured.load_before, measured.load_after),
        "peak_parts_mb": {name: round(mb) for name, mb in measured.peak_parts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20, help="examples per client (train + test)")
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fed override")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in args.clients:
            rows.append(run_size(n, args, out))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["peak_mb"]
    table = [
        (
            r["clients"],
            ", ".join(f"{s:.1f}" for s in r["round_s"]),
            r["total_s"],
            r["cpu_s"],
            r["peak_mb"],
            r["peak_mb"] / base,
            r["load"][0],
            r["load"][1],
        )
        for r in rows
    ]
    columns = (
        Column("clients"),
        Column("rounds", "s"),
        Column("total", "s", digits=0),
        Column("CPU", "s", digits=0),
        Column("peak", "MB", digits=0),
        Column(f"peak / {rows[0]['clients']} clients", "x", digits=2),
        Column("load at start", digits=1),
        Column("load at end", digits=1),
    )
    about = (
        f"Whole simulations of model `{args.model}`, {args.rounds} rounds, {args.rows} examples per client, "
        f"overrides {' '.join(args.set) or 'none'}; peak memory of the whole process tree."
    )
    print(about, *table, sep="\n")
    save("scale", "Many clients: whole simulations", about, columns, table)


if __name__ == "__main__":
    main()
