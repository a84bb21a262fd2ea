"""Accuracy against the privacy budget: epsilon in (inf, 8, 3, 1) for LoRA and FFA-LoRA, IID and
Dirichlet(0.5), several seeds, on the ``private`` preset (``bench/dp_levers.py`` compares the levers).

Every cell is a real ``fed simulate`` run. epsilon is per client, sample-level, delta 1e-5, RDP, over the
whole run; "inf" is the same run without DP at the preset's documented no-DP rate, lr 0.02 (at the DP rate,
lr 1, nothing clips the steps and it diverges: the scaled features give the head per-example gradients of
norm about 15 at the start, and lr 0.5 diverged too). The table (final-round accuracy, mean and std over seeds) and a
plot (accuracy against epsilon) go to bench/results/dp_utility.json and docs/img/dp_utility.png.

    python -m bench run dp_utility                          # the full grid: 2 adapters x 2 splits x 4 eps x 3 seeds
    python -m bench run dp_utility --adapters ffa-lora --splits iid --seeds 0      # one row

Finished cells are appended to ``<runs>/results.jsonl`` at once; ``--render`` redraws table and plot from it;
``--add RUN_DIR ...`` books runs made by hand (``fed simulate --preset private ...``) as cells, after checking
that each is the preset with nothing changed but a cell's own settings (and settings of speed only, such as
``train.micro_batch``: ``cells.EXECUTION_ONLY``). Each booked line carries the run's full config, so a resumed
grid skips the cell.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.cells import (
    EXECUTION_ONLY,
    SPREAD,
    bench_parser,
    held,
    record,
    run_grid,
    same_cell,
    settings,
    spread,
    summarise,
)
from bench.results import DOC, ROOT, Column, save
from fed.config.sources import resolve
from fed.run.rundir import RunDir

EPSILONS = {
    "inf": ["dp.enabled=false", "train.lr=0.02"],
    "8": ["dp.target_epsilon=8"],
    "3": ["dp.target_epsilon=3"],
    "1": ["dp.target_epsilon=1"],
}
SPLITS = {"iid": ["data.partition=iid"], "dirichlet-0.5": ["data.partition=dirichlet", "data.alpha=0.5"]}
ADAPTERS = ("lora", "ffa-lora")
TARGETS = {"8": 0.80, "3": 0.78, "1": 0.76}
"""The final accuracy the private preset aims for at each epsilon (docs/privacy.md, "Utility"), drawn on the
round-by-round plot so a run's distance to it shows."""


def cells(
    adapters: list[str], splits: list[str], epsilons: list[str], seeds: list[int]
) -> list[tuple[dict[str, Any], list[str]]]:
    """(labels, overrides) of every cell of that grid."""
    return [
        (
            {"adapter": a, "split": sp, "epsilon_target": e, "seed": s},
            [f"adapter.kind={a}", *SPLITS[sp], *EPSILONS[e], f"seed={s}"],
        )
        for a in adapters
        for sp in splits
        for e in epsilons
        for s in seeds
    ]


def cell_of(run: RunDir) -> dict[str, Any]:
    """The labels of the grid cell a finished run belongs to, refused unless its config is that cell's (up to
    settings that change only its speed)."""
    cfg = run.config()
    split = "iid" if cfg.data.partition == "iid" else f"{cfg.data.partition}-{cfg.data.alpha:g}"
    eps = "inf" if not cfg.dp.enabled else f"{cfg.dp.target_epsilon:g}"
    labels = {"adapter": cfg.adapter.kind, "split": split, "epsilon_target": eps, "seed": cfg.seed}
    if split not in SPLITS or eps not in EPSILONS or cfg.adapter.kind not in ADAPTERS:
        raise ValueError(f"{run.path} is not a grid cell: {labels}")
    overrides = [f"adapter.kind={cfg.adapter.kind}", *SPLITS[split], *EPSILONS[eps], f"seed={cfg.seed}"]
    if not same_cell(cfg, resolve("private", overrides)):
        raise ValueError(
            f"{run.path} is not the private preset with only {overrides} changed "
            f"(or one of {', '.join(EXECUTION_ONLY)})"
        )
    return labels


COLUMNS = (
    Column("adapter"),
    Column("split"),
    Column("epsilon", none="no DP"),
    *SPREAD,
    Column("median wall", "min", digits=1),
)


def grid_table(results: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    """Accuracy per adapter, split and epsilon, and each cell's median wall: a median, since a run that
    shared the cores with another job would pull a mean far past what a run takes alone."""
    rows = []
    for a in ADAPTERS:
        for sp in SPLITS:
            for e in EPSILONS:
                mine = [r for r in results if (r.get("adapter"), r.get("split"), r.get("epsilon_target")) == (a, sp, e)]
                if mine:
                    wall = statistics.median(r["wall_s"] for r in mine) / 60
                    rows.append((a, sp, None if e == "inf" else e, *spread([r["accuracy"] for r in mine]), wall))
    return rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """Accuracy against epsilon (no DP drawn at the right edge), one line per adapter and split."""
    plt = _pyplot()
    eps = [e for e in EPSILONS if any(r.get("epsilon_target") == e for r in results)]
    xs = {e: (i + 1) for i, e in enumerate(sorted(eps, key=lambda e: float(e)))}
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in ADAPTERS:
        for sp in SPLITS:
            points = [
                (
                    xs[e],
                    [
                        r["accuracy"]
                        for r in results
                        if (r.get("adapter"), r.get("split"), r.get("epsilon_target")) == (a, sp, e)
                    ],
                )
                for e in eps
            ]
            points = sorted((x, v) for x, v in points if v)
            if points:
                ax.errorbar(
                    [x for x, _ in points],
                    [statistics.fmean(v) for _, v in points],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in points],
                    marker="o",
                    capsize=3,
                    label=f"{a}, {sp}",
                )
    ax.set_xticks(list(xs.values()), [("no DP" if e == "inf" else f"eps {e}") for e in xs])
    top = max((r["accuracy"] for r in results), default=0.8)
    ax.set_ylim(0.45, max(0.85, top + 0.02))  # a full scale: differences of a point are eval noise, not a trend
    ax.axhline(0.53, color="grey", linestyle=":", linewidth=1, label="majority class")
    ax.set_ylabel("final eval accuracy")
    ax.set_title("private preset: accuracy against the per-client budget")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_curves(results: list[dict[str, Any]], out: Path) -> None:
    """Accuracy by round, one panel per adapter and split, one line per epsilon (the mean over its seeds,
    shaded from the lowest seed to the highest; dotted: its target): where a run levels off, and whether
    epsilon moves the level or only the climb."""
    plt = _pyplot()
    panels = [
        (a, sp)
        for a in ADAPTERS
        for sp in SPLITS
        if any((r.get("adapter"), r.get("split")) == (a, sp) for r in results)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (a, sp) in zip(axes[0], panels):
        for i, e in enumerate(EPSILONS):
            curves = [
                r["curve"] for r in results if (r.get("adapter"), r.get("split"), r.get("epsilon_target")) == (a, sp, e)
            ]
            if curves:
                rounds = range(1, min(len(c) for c in curves) + 1)
                by_round = [[c[i - 1] for c in curves] for i in rounds]
                ax.plot(
                    rounds,
                    [statistics.fmean(v) for v in by_round],
                    marker=".",
                    color=f"C{i}",
                    label=("no DP" if e == "inf" else f"eps {e}") + f" ({len(curves)})",
                )
                ax.fill_between(
                    rounds, [min(v) for v in by_round], [max(v) for v in by_round], color=f"C{i}", alpha=0.15
                )
                if e in TARGETS:
                    ax.axhline(TARGETS[e], color=f"C{i}", linestyle=":", linewidth=1)
        ax.set_title(f"{a}, {sp}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("eval accuracy")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-dp-utility")
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=ADAPTERS)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--epsilons", nargs="+", default=list(EPSILONS), choices=list(EPSILONS))
    parser.add_argument("--add", nargs="+", default=[], metavar="RUN_DIR", help="book finished private-preset runs")
    parser.add_argument("--figures", type=Path, default=DOC.parent / "img", help="where the two plots go")
    args = parser.parse_args()
    log = Path(args.runs) / "results.jsonl"
    for path in args.add:
        run = RunDir(Path(path))
        record(log, cell_of(run), run.config(), summarise(run))

    def grid(*axes: list) -> list[tuple[dict[str, Any], Any]]:
        return [(labels, resolve("private", [*args.overrides, *extra])) for labels, extra in cells(*axes)]

    if not args.render and not args.add:
        run_grid(log, Path(args.runs), grid(args.adapters, args.splits, args.epsilons, args.seeds))
    # the table holds every cell of the whole grid the log has, whatever subset this call ran: a one-row
    # call must not shrink it; only these settings enter it
    everything = grid(list(ADAPTERS), list(SPLITS), list(EPSILONS), args.seeds)
    results = [r for r in held(log, everything) if r is not None]
    seeds = sorted({r["seed"] for r in results})
    figures = [args.figures / "dp_utility.png", args.figures / "dp_utility_rounds.png"]
    plot(results, figures[0])
    plot_curves(results, figures[1])
    about = (
        f"`python -m bench run dp_utility` with overrides {settings(args.overrides)}, on top of the `private` preset. "
        f"Final-round "
        f"eval accuracy over the seeds a cell ran of {seeds}; epsilon per client, delta 1e-5, RDP. The figures: "
        f"accuracy against epsilon, then accuracy by round (mean over seeds, shaded from the lowest seed to the "
        f"highest; dotted, in the same colour: the target at that epsilon). Each round scores up to "
        f"`train.max_eval_examples` held-out rows per client, the last round every one, so the last point "
        f"can step away from the others by about their standard error."
    )
    shown = [str(f.resolve().relative_to(ROOT)) if f.resolve().is_relative_to(ROOT) else str(f) for f in figures]
    save("dp_utility", "Accuracy against the privacy budget", about, COLUMNS, grid_table(results), args.results, shown)
    print(about, *grid_table(results), sep="\n")


if __name__ == "__main__":
    main()
