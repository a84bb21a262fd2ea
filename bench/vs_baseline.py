"""fedlora against the reference recipe (``bench/baseline/``), back to back, same workload, one table.

    python -m bench.vs_baseline                  # MiniLM, 4 clients x 3 rounds x 10 local steps, batch 32
    python -m bench.vs_baseline --quick          # smoke test: 2 rounds x 3 steps on 800 examples
    python -m bench.vs_baseline --set train.precision=bf16     # extra fed overrides (fedlora only)

Each of the four runs (baseline and fedlora, without and with DP-SGD at sigma = 1) is its own process,
measured from outside: wall time and the peak memory of its whole process tree (driver, Ray daemons and
actors, polled every 0.2 s). Round wall times, bytes and the final accuracy come from each run's own
records: fedlora's ``metrics.jsonl``, the baseline's result JSON. Both evaluate on the same held-out
rows (the union of the four clients' test splits). The 1-minute load average at the start and end of
each run is printed with the table: on a shared machine wall times are only comparable at equal load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.results import Column, save
from bench.treemem import Measured, run_measured

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    Column("run"),
    Column("round wall, mean", "s", digits=1),
    Column("run wall, whole process", "s", digits=1),
    Column("run CPU, process tree", "s", digits=0),
    Column("peak memory, process tree", "MB", digits=0),
    Column("up / client / round", "bytes", digits=0),
    Column("down / client / round", "bytes", digits=0),
    Column("final accuracy", digits=3),
)
KEYS = ("round_s", "wall_s", "cpu_s", "peak_mb", "up", "down", "accuracy")


def _summary(measured: Measured, round_s: list[float], up: float, down: float, accuracy: float) -> dict:
    return {
        "round_s": sum(round_s) / len(round_s),
        "rounds": round_s,
        "wall_s": measured.wall_s,
        "cpu_s": measured.cpu_s,
        "peak_mb": measured.peak_mb,
        "up": up,
        "down": down,
        "accuracy": accuracy,
        "load": (measured.load_before, measured.load_after),
    }


def baseline(dp: bool, work: dict, out: Path) -> dict:
    result = out / f"baseline{'-dp' if dp else ''}.json"
    argv = [
        sys.executable,
        str(ROOT / "bench" / "baseline" / "run.py"),
        "--out",
        str(result),
        "--rounds",
        str(work["rounds"]),
        "--steps",
        str(work["steps"]),
        "--examples",
        str(work["examples"]),
        "--clients",
        str(work["clients"]),
        *(["--dp", "--sigma", "1.0"] if dp else []),
    ]
    log = result.with_suffix(".log")
    measured = run_measured(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, log=log)
    if measured.returncode != 0:
        raise SystemExit(f"baseline exited {measured.returncode}; see {log}")
    r = json.loads(result.read_text())
    per = work["clients"] * work["rounds"]
    return _summary(measured, r["round_s"], r["bytes_up"] / per, r["bytes_down"] / per, r["accuracy"])


def fedlora(dp: bool, work: dict, extra: list[str], out: Path) -> dict:
    name = f"fedlora{'-dp' if dp else ''}"
    sets = [
        f"federation.num_clients={work['clients']}",
        f"federation.rounds={work['rounds']}",
        f"train.local_steps={work['steps']}",
        "train.batch_size=32",
        f"data.max_examples={work['examples']}",
        *(["dp.enabled=true", "dp.noise_multiplier=1.0"] if dp else []),
        *extra,
    ]
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
        name,
        *[a for s in sets for a in ("--set", s)],
    ]
    measured = run_measured(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, log=out / f"{name}.log")
    if measured.returncode != 0:
        raise SystemExit(f"fed simulate exited {measured.returncode}; see {out / name}.log")
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    up = sum(line["bytes_up"] / line["clients"] for line in lines) / len(lines)
    down = sum(line["bytes_down"] / line["clients"] for line in lines) / len(lines)
    final = next(line["eval_accuracy"] for line in reversed(lines) if line["eval_accuracy"] is not None)
    return _summary(measured, [line["wall_s"] for line in lines], up, down, final)


def table(results: dict[str, dict]) -> list[tuple[object, ...]]:
    """One row per run (baseline and fedlora, without and with DP): its figures in ``KEYS``' order."""
    return [(name, *(figures[key] for key in KEYS)) for name, figures in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps on 800 examples (a smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fed override")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    work = (
        {"clients": 4, "rounds": 2, "steps": 3, "examples": 800}
        if args.quick
        else {"clients": 4, "rounds": 3, "steps": 10, "examples": 4000}
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for dp in (False, True):
            for name, run in (
                ("baseline", lambda dp=dp: baseline(dp, work, out)),
                ("fedlora", lambda dp=dp: fedlora(dp, work, args.set, out)),
            ):
                key = f"{name}{'-dp' if dp else ''}"
                results[key] = run()
                print(key, json.dumps(results[key]), flush=True)
    loads = ", ".join(f"{k} {v['load'][0]:.1f}/{v['load'][1]:.1f}" for k, v in results.items())
    about = (
        f"The hand-built Flower + PEFT + Opacus recipe (bench/baseline) against fedlora on the same work {work}, fed "
        f"overrides {' '.join(args.set) or 'none'}, side by side in one run; load average (1 min) at start/end: "
        f"{loads}."
    )
    print(about, *table(results), sep="\n")
    save("vs_baseline", "fedlora against the hand-built Flower + PEFT + Opacus recipe", about, COLUMNS, table(results))


if __name__ == "__main__":
    main()
