"""How long is one local step of each adapter family, relative to LoRA? All families side by side in one process.

The accuracy grid's per-cell step times come from runs that share the machine with whatever else runs, so
they cannot rank the families. Here every family of the grid (bench/grids/families.toml, at the rank the grid
gives it on ``--task``) trains one client's share, one round of ``--steps`` steps per family per repeat, the
families interleaved in a rotating order after an untimed round each (``clipping_modes.paired``): a slow spell
hits every family alike, and the result is each family's median per-repeat ratio to LoRA. Plain steps, and
DP-SGD steps (per-sample gradient hooks, Poisson batches of the batch size on average) with ``--dp``.

    python -m bench run family_steps [--task mixed-domains] [--steps 4] [--repeats 3] [--dp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

from bench.adapters_accuracy import load_grid, plan
from bench.clipping_modes import _step_s, device_name, paired, ratio
from bench.results import Column, save
from fed.adapters.base import Clock
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.precision import model_device, resolve_precision
from fed.privacy.mechanism import DpSettings
from fed.session import client_session


def configs(task: str) -> dict[str, RunConfig]:
    """Every family of the grid on ``task``, at the rank the grid runs it there (no DP: the step adds it)."""
    grid = load_grid()
    preset, task_overrides = grid.tasks[task]
    ranks = plan(grid, [])[task]
    return {
        family: resolve(
            preset, [*grid.base, *task_overrides, *extra, f"adapter.kind={family}", f"adapter.rank={ranks[family][0]}"]
        )
        for family, extra in grid.families.items()
    }


def main() -> None:
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mixed-domains", help="a task of the grid file")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per family, interleaved")
    parser.add_argument("--dp", action="store_true", help="also time DP-SGD steps")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats {args.repeats} and --steps {args.steps}: each must be at least 1")
    load_before = os.getloadavg()[0]
    cfgs = configs(args.task)
    by_family = {family: client_session(cfg, 0) for family, cfg in cfgs.items()}
    first, cfg = by_family["lora"], cfgs["lora"]
    device = model_device(first.adapter.model)
    precision = resolve_precision(cfg.train.precision, device.type)
    bs = cfg.train.batch_size  # the grid's tasks share it
    columns: dict[str, DpSettings | None] = {"plain": None}
    if args.dp:
        n = len(first.data.train)
        columns["DP-SGD"] = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=bs / n, num_examples=n)
    medians: dict[str, dict[str, float]] = {}
    shown: dict[str, dict[str, str]] = {}
    for column, dp in columns.items():

        def time_round(family: str, dp: DpSettings | None = dp) -> float:
            by_family[family].adapter.begin_round(Clock(1, 1, args.steps))  # as a client opens its round
            return _step_s(
                by_family[family], steps=args.steps, batch_size=bs, micro_batch=0, dp=dp, precision=precision
            )

        times = paired(time_round, {f: f for f in by_family}, args.repeats)
        medians[column] = {f: statistics.median(t) for f, t in times.items()}
        shown[column] = {f: ratio(times, f, against="lora") for f in times}
        about = (
            f"Seconds per local step of each family on {device_name(device)}, task `{args.task}` of the families "
            f"grid (each family at the grid's rank), batch {bs}, {args.steps} steps per timed round, "
            f"{args.repeats} interleaved repeats: medians over the repeats; ratios: median [quartiles] of the "
            f"per-repeat ratios to LoRA. Load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (a "
            f"shared machine: the ratios, not the seconds, are the result)."
        )
        heads = [Column("family"), *(c for m in medians for c in (Column(m, "s", digits=3), Column(f"{m} / LoRA")))]
        rows = [(f, *(v for m in medians for v in (medians[m][f], shown[m][f]))) for f in by_family]
        save(
            "family_steps", "Adapter families: step time relative to LoRA", about, heads, rows
        )  # each column as it ends
    print(about, *rows, sep="\n")


if __name__ == "__main__":
    main()
