"""What the accuracy benchmarks share: one ``fed simulate`` run reduced to the figures a table needs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console

from fed.config import RunConfig


def run_cell(cfg: RunConfig, runs: Path, name: str) -> dict[str, Any]:
    """Run ``cfg`` as ``fed simulate`` does and keep the final accuracy, the accuracy curve, the largest
    client epsilon, the mean aggregation error, bytes up per client per round and the wall time."""
    from simulations.run import simulate  # Flower and Ray only once the grid is set up

    lines = simulate(cfg, runs, name=name, console=Console(stderr=True, quiet=True)).metrics()
    last = lines[-1]
    errors = [line["aggregation_error"] for line in lines if line.get("aggregation_error") is not None]
    return {"accuracy": last["eval_accuracy"], "epsilon": last["epsilon_max"],
            "curve": [line.get("eval_accuracy") for line in lines],
            "aggregation_error": statistics.fmean(errors) if errors else None,
            "bytes_up": statistics.fmean(line["bytes_up"] / max(line["clients"], 1) for line in lines),
            "wall_s": sum(line.get("wall_s", 0.0) for line in lines)}


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds (std 0 for one value), ``-`` for none."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"
