"""What the accuracy benchmarks share: one ``fed simulate`` run reduced to the figures a table needs."""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.results import RESULTS, Column
from fed.config import ConfigError, RunConfig
from fed.run.rundir import RunDir


def bench_parser(description: str | None, runs: str, *, seeds: bool = True) -> argparse.ArgumentParser:
    """The options every accuracy bench shares (overrides, where runs and the result go, ``--render``, seeds)."""
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if seeds:
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", default=runs, help="where the runs and their JSONL log go")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the result JSON goes")
    parser.add_argument("--render", action="store_true", help="only write the result from the runs' JSONL log")
    return parser


def record(log: Path, labels: dict[str, Any], cfg: RunConfig, figures: dict[str, Any]) -> None:
    """Append one finished cell (its labels, figures and full config) to the bench's JSONL log at once: a
    crash loses only the cell that was running, and ``held`` can tell the cell from one with other settings."""
    log.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**labels, **figures, "config": _flat(cfg)})
    with open(log, "a") as handle:
        handle.write(line + "\n")
    print(line, flush=True)


def finished(log: Path) -> list[dict[str, Any]]:
    """Every cell ``log`` holds (none before the first)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_grid(log: Path, runs: Path, grid: list[tuple[dict[str, Any], RunConfig]]) -> None:
    """Run each (labels, config) cell of ``grid`` that ``log`` does not hold yet, and record it.

    A cell counts as done when a line has the same labels and the same full config, so a grid
    interrupted (a crash, a session's end) resumes where it stopped and never mixes settings. The
    cells run seed by seed: an interrupted grid leaves every family's first seeds rather than
    some families' all seeds.
    """
    todo = [cell for cell, record in zip(grid, held(log, grid)) if record is None]
    todo.sort(key=lambda cell: cell[0].get("seed", 0))  # stable: the grid's order within a seed
    print(f"{len(grid) - len(todo)} of {len(grid)} cells already in {log}; {len(todo)} to run", flush=True)
    for i, (labels, cfg) in enumerate(todo, 1):
        name = "-".join(str(v) for v in labels.values()).replace(" ", "_").replace("/", "_")[:60]
        print(f"[{i}/{len(todo)}] {labels}", flush=True)
        figures = run_cell(cfg, runs, name)
        if (why := incomplete(figures)) is not None:  # not booked: the next call runs it again
            print(f"[{i}/{len(todo)}] not recorded: {why}", flush=True)
            continue
        record(log, labels, cfg, figures)


def incomplete(figures: dict[str, Any]) -> str | None:
    """Why a run does not measure its cell, or None: a client's reply lost in some round (a worker killed, a
    timeout) makes it a run with fewer clients, and a run with no final score has nothing to tabulate."""
    if figures.get("dropped"):
        return f"{figures['dropped']} replies dropped (first: {figures.get('first_drop', '?')})"
    if figures.get("accuracy") is None:
        return "no final accuracy"
    return None


def held(log: Path, grid: list[tuple[dict[str, Any], RunConfig]]) -> list[dict[str, Any] | None]:
    """For each (labels, config) cell of ``grid``, the record ``log`` holds for it, or None. A record counts
    when it has the cell's labels and its full config, so one made with other settings under the same labels
    (an older version of the grid) neither counts as done nor enters a table."""
    done = [(r, _recorded_config(r)) for r in finished(log)]
    return [
        next(
            (
                r
                for r, c in done
                if c is not None and same_cell(c, cfg) and all(r.get(k) == v for k, v in labels.items())
            ),
            None,
        )
        for labels, cfg in grid
    ]


EXECUTION_ONLY = ("train.micro_batch", "train.eval_batch_size", "train.max_eval_examples")
"""Settings that change how fast a cell runs, not what it measures: a batch run in chunks takes the same step
(tests/privacy/test_dpsgd.py holds a chunked DP step to the per-example loop), evaluation sums over its batches, and the
cap on the rows scored per round leaves the last round's score alone (it counts every held-out row)."""


def same_cell(a: RunConfig, b: RunConfig) -> bool:
    """Whether runs of ``a`` and ``b`` measure the same thing: equal configs up to ``EXECUTION_ONLY``."""
    other = b.to_flat()  # the same keys: both are read on today's RunConfig
    return all(value == other[key] for key, value in a.to_flat().items() if key not in EXECUTION_ONLY)


def _recorded_config(result: dict[str, Any]) -> RunConfig | None:
    """The config a recorded cell ran with, read on today's defaults: a key added since (at its default)
    leaves the cell done; a key that no longer exists, or none recorded, makes it not done."""
    try:
        return RunConfig.from_flat(result["config"]) if "config" in result else None
    except ConfigError:
        return None


def _flat(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as its JSON line holds it (tuples as lists), so a recorded config compares equal."""
    return json.loads(json.dumps(cfg.to_flat()))


def settings(overrides: list[str]) -> str:
    """The overrides a section was measured with, as Markdown."""
    return " ".join(f"`{o}`" for o in overrides) or "none"


def run_cell(cfg: RunConfig, runs: Path, name: str) -> dict[str, Any]:
    """Run ``cfg`` as ``fed simulate`` does and summarise it."""
    from simulations.run import simulate  # Flower and Ray only once the grid is set up

    return summarise(simulate(cfg, runs, name=name, console=Console(stderr=True, quiet=True)))


def summarise(run: RunDir) -> dict[str, Any]:
    """A finished run's final accuracy, accuracy curve, largest client epsilon, mean aggregation error,
    bytes up per client per round, wall time and the client replies it lost."""
    lines = run.metrics()
    if not lines:
        raise ValueError(f"{run.path} has no finished round in metrics.jsonl")
    last = lines[-1]
    errors = [line["aggregation_error"] for line in lines if line.get("aggregation_error") is not None]
    drops = [str(d) for line in lines for d in line.get("dropped", [])]
    return {
        "accuracy": last["eval_accuracy"],
        "epsilon": last["epsilon_max"],
        "curve": [line.get("eval_accuracy") for line in lines],
        "aggregation_error": statistics.fmean(errors) if errors else None,
        "bytes_up": statistics.fmean(line["bytes_up"] / max(line["clients"], 1) for line in lines),
        "wall_s": sum(line.get("wall_s", 0.0) for line in lines),
        "dropped": len(drops),
        **({"first_drop": drops[0][:200]} if drops else {}),
        "run": str(run.path),
    }


def spread(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, standard deviation (None for one seed: no spread to show) and count of a cell's seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


SPREAD = (Column("accuracy, mean", digits=3), Column("std", digits=3), Column("seeds"))
"""The columns ``spread``'s figures fill."""
