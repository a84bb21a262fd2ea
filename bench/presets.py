"""What a user sees running the shipped presets: each one run as ``fed simulate --preset NAME`` in a fresh
process, as the README shows it, and its first and final evaluation, largest client epsilon and wall time.

These rows are README.md's what-to-expect table (``python -m bench report`` renders them there). The wall
time is the whole command, interpreter start to exit, so it grows with outside load: the result records
the load averages with it.

    python -m bench run presets [--presets quickstart instruct private] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import Column, save
from fed.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    Column("run"),
    Column("metric"),
    Column("round 1", digits=3),
    Column("final", digits=3, none="no reply"),
    Column("largest client epsilon", digits=2, none="no DP"),
    Column("wall", "min", digits=1),
)


def run_preset(preset: str, overrides: list[str], out: Path) -> tuple[object, ...]:
    """One preset through the real CLI; its row: the command, the task's metric after round 1 and at the
    end (accuracy for a classifier, loss for a causal LM; null where no client replied that round), the
    largest client epsilon and the wall time."""
    sets = [a for o in overrides for a in ("--set", o)]
    argv = [
        sys.executable,
        "-m",
        "simulations.cli",
        "simulate",
        "--preset",
        preset,
        "--out",
        str(out),
        "--name",
        preset,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([*argv, *sets], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fed simulate --preset {preset} exited {done.returncode}:\n{done.stderr[-3000:]}")
    run = RunDir(out / preset)
    lines = run.metrics()
    metric = "eval_accuracy" if run.config().task == "classification" else "eval_loss"
    command = " ".join(["fed simulate --preset", preset, *(f"--set {o}" for o in overrides)])
    return (
        f"`{command}`",
        metric.replace("_", " "),
        lines[0][metric],
        lines[-1][metric],
        lines[-1]["epsilon_max"],
        wall / 60,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["quickstart", "instruct", "private"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    args = parser.parse_args()
    about = (
        "Each preset run once as `fed simulate --preset NAME` in a fresh process, at its own settings (seed 0); "
        "the metric after round 1 and after the last round, the largest per-client "
        "epsilon (delta 1e-5) and the wall time of the whole command."
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows.append(run_preset(preset, args.set, Path(tmp)))
            print(rows[-1], flush=True)
            save("presets", "The presets as a user runs them", about, COLUMNS, rows)  # an interruption keeps these


if __name__ == "__main__":
    main()
