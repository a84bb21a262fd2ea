"""Every adapter family against LoRA, and each paper's headline claim, on the grid in bench/grids/families.toml.

The grid file is the experiment as data: its tasks (the ``mixed-domains`` preset, one sentiment domain per
client; TREC's 6 question classes split Dirichlet(0.5)), privacy levels (no DP, epsilon 8), families, seeds
and claims. Each family's rank is matched to LoRA's trainable adapter parameters at ``budget_rank`` (task head
excluded) unless a claim compares it at LoRA's own rank (``unmatched``) or at a rank it fixes (``rank``); a
claim may add its own cells (the MoLE claim's IID control, the heterogeneous-rank pair of aggregation rules).
Every cell is a real ``fed simulate`` run, the same code path as the command line, recorded with its full config.

    python -m bench run adapters_accuracy                       # the whole grid (resumable)
    python -m bench run adapters_accuracy --render              # table, plot and verdicts from the cells so far
    python -m bench run adapters_accuracy --seeds 0 --set federation.rounds=2   # a reduced grid

Per cell: final-round accuracy, trainable adapter parameters, bytes up per client per round, wall seconds per
local step (the round's wall time over its steps, on a shared machine: ``family_steps`` times the families
side by side), mean aggregation error. The result (bench/results/adapters_accuracy.json) holds one row per
arm, task and privacy (mean ± std over seeds; every planned one, empty where no cell is in yet), and as further
tables each claim's verdict and every cell, seed by seed; the plot goes to docs/img/adapters_accuracy.png and
``--docs`` rewrites the generated block of docs/families.md. The cells run seed-major (every cell of seed
0, then seed 1, ...), so an interrupted grid has whole seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from bench.cells import SPREAD, bench_parser, held, run_grid, settings, spread
from bench.results import DOC, ROOT, Column, Table, save, table
from fed.adapters import build
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.models import load_model
from fed.session import adapter_spec, num_labels

GRID = Path(__file__).resolve().parent / "grids" / "families.toml"
FIGURE = DOC.parent / "img" / "adapters_accuracy.png"
FAMILIES_DOC = DOC.parent / "families.md"
BEGIN, END = "<!-- adapters_accuracy:begin -->", "<!-- adapters_accuracy:end -->"
TESTS = ("above", "at_or_above", "near")
"""How a claim's paired difference (claimed arm minus the arm it is compared with, seed by seed) is judged:
``above``: its mean is positive by more than one standard error (with one seed: positive); ``at_or_above``:
its mean is at least ``-tolerance``; ``near``: its mean is within ``tolerance`` either way."""


@dataclass(frozen=True)
class Claim:
    """One paper's headline claim as the grid states it (bench/grids/families.toml, ``[[claims]]``)."""

    name: str
    arms: tuple[str, str]
    """The arm claimed and the arm it is compared with: family names, or a claim's own rules."""
    test: str
    tolerance: float = 0.0
    tasks: tuple[str, ...] = ()
    """Tasks the claim is about (empty: every task)."""
    control: tuple[str, ...] = ()
    """Overrides of a control setting where the claimed gap should shrink (its arms run there too)."""
    unmatched: bool = False
    """The claimed family runs at LoRA's rank, not at LoRA's parameter count."""
    rank: int | None = None
    """The claimed family's rank, where the claim fixes it."""
    fewer_params: bool = False
    max_bytes_ratio: float | None = None
    family: str | None = None
    overrides: tuple[str, ...] = ()
    rules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """A claim on one family under different rules (overrides each): its arms are the rules."""


@dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...]
    budget_rank: int
    base: tuple[str, ...]
    tasks: dict[str, tuple[str, tuple[str, ...]]]
    """Task -> (preset, overrides)."""
    privacy: dict[str, tuple[str, ...]]
    families: dict[str, tuple[str, ...]]
    claims: tuple[Claim, ...]

    def fixed_ranks(self) -> dict[str, int]:
        """Families a claim runs at a rank it fixes (its own, else LoRA's) rather than at LoRA's parameter count."""
        return {c.arms[0]: c.rank or self.budget_rank for c in self.claims if c.unmatched or c.rank is not None}


def load_grid(path: Path = GRID) -> Grid:
    """The grid file, checked: every claim names known arms and a known test."""
    raw = tomllib.loads(path.read_text())
    claims = []
    for c in raw.get("claims", []):
        rules = {name: tuple(o) for name, o in c.get("rules", {}).items()}
        arms = tuple(rules) if rules else tuple(c["compare"])
        known = set(raw["families"]) | set(rules)
        if len(arms) != 2 or not set(arms) <= known or c["test"] not in TESTS:
            raise ValueError(
                f"{path}: claim {c['name']!r} compares {arms} by {c['test']!r}; it must compare two of "
                f"{sorted(known)} by one of {TESTS}"
            )
        claims.append(
            Claim(
                name=c["name"],
                arms=(arms[0], arms[1]),
                test=c["test"],
                tolerance=c.get("tolerance", 0.0),
                tasks=tuple(c.get("tasks", ())),
                control=tuple(c.get("control", ())),
                unmatched=c.get("unmatched", False),
                rank=c.get("rank"),
                fewer_params=c.get("fewer_params", False),
                max_bytes_ratio=c.get("max_bytes_ratio"),
                family=c.get("family"),
                overrides=tuple(c.get("overrides", ())),
                rules=rules,
            )
        )
    return Grid(
        seeds=tuple(raw["seeds"]),
        budget_rank=raw["budget_rank"],
        base=tuple(raw.get("base", ())),
        tasks={name: (t["preset"], tuple(t.get("overrides", ()))) for name, t in raw["tasks"].items()},
        privacy={name: tuple(p.get("overrides", ())) for name, p in raw["privacy"].items()},
        families={name: tuple(o) for name, o in raw["families"].items()},
        claims=tuple(claims),
    )


def adapter_parameters(cfg: RunConfig) -> int:
    """Trainable adapter parameters of ``cfg`` on its model, task head excluded."""
    model = load_model(cfg.model.name, cfg.task, num_labels=num_labels(cfg), seed=cfg.seed)
    adapter = build(model, adapter_spec(cfg.adapter, model), cfg.seed)
    return sum(p.numel() for p in adapter.trainable_parameters())


def matched_rank(
    cfg: RunConfig, budget: int, count: Callable[[RunConfig], int] = adapter_parameters, max_rank: int = 64
) -> tuple[int, int]:
    """The rank whose parameter count is closest to ``budget``, and that count.

    Counts are affine in the rank except MoSLoRA's r² mixer, so an affine guess from ranks 1 and 2
    is refined by exact counts at the guess and its neighbours.
    """
    one, two = (count(cfg.with_overrides({"adapter.rank": r})) for r in (1, 2))
    guess = min(range(1, max_rank + 1), key=lambda r: abs(one + (two - one) * (r - 1) - budget))
    exact = {
        r: count(cfg.with_overrides({"adapter.rank": r}))
        for r in range(max(1, guess - 2), min(max_rank, guess + 2) + 1)
    }
    rank = min(exact, key=lambda r: abs(exact[r] - budget))
    return rank, exact[rank]


Cell = tuple[dict[str, Any], list[str]]
"""A cell's labels (task, privacy, arm, seed) and its overrides on top of its task's preset."""


def plan(
    grid: Grid, overrides: list[str], count: Callable[[RunConfig], int] = adapter_parameters
) -> dict[str, dict[str, tuple[int, int]]]:
    """Per task, each arm's (rank, trainable parameters): families matched to LoRA at ``budget_rank`` (or at its
    rank when a claim says so), a rules claim's arms at the claim's own settings."""
    ranks: dict[str, dict[str, tuple[int, int]]] = {}
    for task, (preset, task_overrides) in grid.tasks.items():
        base = resolve(preset, [*grid.base, *task_overrides, *overrides])
        at_budget = {"adapter.kind": "lora", "adapter.rank": grid.budget_rank}
        budget = count(base.with_overrides(at_budget))
        mine: dict[str, tuple[int, int]] = {}
        fixed = {"lora": grid.budget_rank, **grid.fixed_ranks()}
        for family, extra in grid.families.items():
            cfg = resolve(preset, [*grid.base, *task_overrides, *overrides, *extra, f"adapter.kind={family}"])
            if family in fixed:
                mine[family] = (fixed[family], count(cfg.with_overrides({"adapter.rank": fixed[family]})))
            else:
                mine[family] = matched_rank(cfg, budget, count)
        for claim in grid.claims:
            for rule in claim.rules:
                cfg = resolve(preset, [*grid.base, *task_overrides, *overrides, *_claim_overrides(claim, rule)])
                mine[rule] = (cfg.adapter.rank, count(cfg))
        ranks[task] = mine
    return ranks


def _claim_overrides(claim: Claim, rule: str) -> list[str]:
    return [f"adapter.kind={claim.family}", *claim.overrides, *claim.rules[rule]]


def cells(grid: Grid, ranks: dict[str, dict[str, tuple[int, int]]], seeds: list[int]) -> list[Cell]:
    """Every cell, seed-major; within a seed, privacy then task: every family, then the claims' own arms
    (rules, then the controls), so a partial grid holds whole (privacy, task) blocks."""
    out: list[Cell] = []
    for seed in seeds:
        for privacy, dp in grid.privacy.items():
            for task, (_, task_overrides) in grid.tasks.items():
                arms = [(family, family_overrides(grid, ranks, task, family)) for family in grid.families]
                for claim in grid.claims:
                    arms += [(rule, _claim_overrides(claim, rule)) for rule in claim.rules]
                for claim in grid.claims:
                    if claim.control and (not claim.tasks or task in claim.tasks):
                        arms += [
                            (control_arm(f, claim), [*family_overrides(grid, ranks, task, f), *claim.control])
                            for f in claim.arms
                        ]
                out += [
                    (
                        {"task": task, "privacy": privacy, "arm": arm, "seed": seed},
                        [*grid.base, *task_overrides, *dp, *extra, f"seed={seed}"],
                    )
                    for arm, extra in arms
                ]
    return out


def family_overrides(grid: Grid, ranks: dict[str, dict[str, tuple[int, int]]], task: str, family: str) -> list[str]:
    """``family``'s own overrides on ``task``: its grid settings, its kind and the rank the plan gave it."""
    return [*grid.families[family], f"adapter.kind={family}", f"adapter.rank={ranks[task][family][0]}"]


def control_arm(family: str, claim: Claim) -> str:
    """The arm name of ``family`` in ``claim``'s control setting."""
    return f"{family} [{' '.join(claim.control)}]"


def figures(results: list[dict[str, Any]], ranks: dict[str, dict[str, tuple[int, int]]]) -> list[dict[str, Any]]:
    """Each finished cell as data: its labels, rank, parameters and figures (the run's config left in the log)."""
    out = []
    for r in results:
        family = r["arm"].split(" [")[0]
        rank, params = ranks[r["task"]].get(family, (None, None))
        out.append(
            {
                **{k: r[k] for k in ("task", "privacy", "arm", "seed")},
                "rank": rank,
                "trainable_params": params,
                "accuracy": r["accuracy"],
                "epsilon": r.get("epsilon"),
                "bytes_up_per_client_round": r["bytes_up"],
                "wall_per_step_s": r["wall_s"] / (r["config"]["federation.rounds"] * r["config"]["train.local_steps"]),
                "aggregation_error": r.get("aggregation_error"),
                "run": r.get("run"),
            }
        )
    return out


def _arms(data: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(d["arm"] for d in data))


COLUMNS = (
    Column("arm"),
    Column("task"),
    Column("privacy"),
    Column("rank"),
    Column("trainable params"),
    *SPREAD,
    Column("up / client / round", "bytes", digits=0),
    Column("wall / step (shared)", "s", digits=2),
    Column("mean aggregation error"),
)
"""One row per arm, task and privacy."""


def summary(
    data: list[dict[str, Any]], blocks: list[tuple[str, str, str]], ranks: dict[str, dict[str, tuple[int, int]]]
) -> list[tuple[object, ...]]:
    """One row per planned (arm, task, privacy) in ``blocks``: the arm's rank and parameters there, accuracy
    mean ± std over the seeds held (empty, 0 seeds, where no cell is in yet), mean bytes up, median wall per
    step and mean aggregation error."""
    rows = []
    for arm, task, privacy in blocks:
        mine = [d for d in data if (d["arm"], d["task"], d["privacy"]) == (arm, task, privacy)]
        errors = [d["aggregation_error"] for d in mine if d["aggregation_error"] is not None]
        rank, params = ranks[task].get(arm.split(" [")[0], (None, None))  # a control arm: its family's
        rows.append(
            (
                arm,
                task,
                privacy,
                rank,
                params,
                *(spread([d["accuracy"] for d in mine]) if mine else (None, None, 0)),
                statistics.fmean(d["bytes_up_per_client_round"] for d in mine) if mine else None,
                statistics.median(d["wall_per_step_s"] for d in mine) if mine else None,
                statistics.fmean(errors) if errors else None,
            )
        )
    return rows


CELL_COLUMNS = (
    Column("task"),
    Column("privacy"),
    Column("arm"),
    Column("seed"),
    Column("rank"),
    Column("trainable params"),
    Column("accuracy", digits=3),
    Column("epsilon", digits=2),
    Column("up / client / round", "bytes", digits=0),
    Column("wall / step (shared)", "s", digits=2),
    Column("mean aggregation error"),
    Column("run"),
)
"""One row per finished cell (``figures``), its accuracy curve left in the run folder."""


def cell_rows(data: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    """Every finished cell as a row of CELL_COLUMNS."""
    keys = ("task", "privacy", "arm", "seed", "rank", "trainable_params", "accuracy", "epsilon")
    more = ("bytes_up_per_client_round", "wall_per_step_s", "aggregation_error", "run")
    return [tuple(d[k] for k in (*keys, *more)) for d in data]


def paired(data: list[dict[str, Any]], task: str, privacy: str, arms: tuple[str, str]) -> list[float]:
    """Accuracy of ``arms[0]`` minus ``arms[1]``, seed by seed, for the seeds both have."""
    acc = {(d["arm"], d["seed"]): d["accuracy"] for d in data if (d["task"], d["privacy"]) == (task, privacy)}
    return [acc[(arms[0], s)] - acc[(arms[1], s)] for a, s in sorted(acc) if a == arms[0] and (arms[1], s) in acc]


def judge(claim: Claim, diffs: list[float]) -> str:
    """``held`` or ``failed`` by the claim's test (TESTS) on the paired differences; ``-`` for none."""
    if not diffs:
        return "-"
    mean = statistics.fmean(diffs)
    if claim.test == "above":
        error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        ok = mean > error
    elif claim.test == "at_or_above":
        ok = mean >= -claim.tolerance
    else:
        ok = abs(mean) <= claim.tolerance
    return "held" if ok else "failed"


def verdicts(data: list[dict[str, Any]], grid: Grid) -> list[dict[str, Any]]:
    """Each claim judged in every (task, privacy) block that holds both its arms: the paired difference, the
    verdict, and the conditions beside accuracy (fewer parameters, a bytes ratio, the control's gap)."""
    out = []
    for claim in grid.claims:
        for task in claim.tasks or tuple(grid.tasks):
            for privacy in grid.privacy:
                diffs = paired(data, task, privacy, claim.arms)
                if not diffs:
                    continue
                verdict = judge(claim, diffs)
                notes = []
                block = [d for d in data if (d["task"], d["privacy"]) == (task, privacy)]
                params = {d["arm"]: d["trainable_params"] for d in block}
                if claim.fewer_params:
                    fewer = params[claim.arms[0]] < params[claim.arms[1]]
                    notes.append(f"params {params[claim.arms[0]]:,} vs {params[claim.arms[1]]:,}")
                    verdict = verdict if fewer else "failed"
                if claim.max_bytes_ratio is not None:
                    up = {
                        a: statistics.fmean(d["bytes_up_per_client_round"] for d in block if d["arm"] == a)
                        for a in claim.arms
                    }
                    ratio = up[claim.arms[0]] / up[claim.arms[1]]
                    notes.append(f"bytes ratio {ratio:.2f} (claim: at most {claim.max_bytes_ratio:g})")
                    verdict = verdict if ratio <= claim.max_bytes_ratio else "failed"
                if claim.control:
                    control = paired(
                        data, task, privacy, (control_arm(claim.arms[0], claim), control_arm(claim.arms[1], claim))
                    )
                    if control:
                        notes.append(
                            f"gap under {' '.join(claim.control)}: {statistics.fmean(control):+.3f} ({len(control)})"
                        )
                out.append(
                    {
                        "claim": claim.name,
                        "task": task,
                        "privacy": privacy,
                        "seeds": len(diffs),
                        "difference": statistics.fmean(diffs),
                        "spread": statistics.stdev(diffs) if len(diffs) > 1 else None,
                        "verdict": verdict,
                        "notes": "; ".join(notes),
                    }
                )
    return out


VERDICT_COLUMNS = (
    Column("claim"),
    Column("task"),
    Column("privacy"),
    Column("difference (paired)", digits=3),
    Column("std", digits=3),
    Column("seeds"),
    Column("of seeds"),
    Column("verdict"),
    Column("also"),
)


def verdict_rows(found: list[dict[str, Any]], seeds: int) -> list[tuple[object, ...]]:
    """The verdicts as rows of VERDICT_COLUMNS; ``so far`` marks one judged on fewer than the grid's ``seeds``."""
    return [
        (
            v["claim"],
            v["task"],
            v["privacy"],
            v["difference"],
            v["spread"],
            v["seeds"],
            seeds,
            v["verdict"] if v["seeds"] >= seeds else f"{v['verdict']} so far",
            v["notes"] or None,
        )
        for v in found
    ]


def plot(data: list[dict[str, Any]], grid: Grid, out: Path) -> None:
    """One panel per (task, privacy): each arm's mean accuracy, its seeds as dots, LoRA's mean as a line."""
    from bench.dp_utility import _pyplot

    plt = _pyplot()
    blocks = [
        (t, p) for t in grid.tasks for p in grid.privacy if any((d["task"], d["privacy"]) == (t, p) for d in data)
    ]
    arms = _arms(data)
    fig, axes = plt.subplots(
        1, max(len(blocks), 1), figsize=(3.2 * max(len(blocks), 1) + 1, 4.5), sharey=True, squeeze=False
    )
    for ax, (task, privacy) in zip(axes[0], blocks):
        block = [d for d in data if (d["task"], d["privacy"]) == (task, privacy)]
        for i, arm in enumerate(arms):
            accs = [d["accuracy"] for d in block if d["arm"] == arm]
            if accs:
                ax.bar(i, statistics.fmean(accs), color="tab:orange" if arm == "lora" else "tab:blue", alpha=0.6)
                ax.plot([i] * len(accs), accs, "k.", markersize=4)
        lora = [d["accuracy"] for d in block if d["arm"] == "lora"]
        if lora:
            ax.axhline(statistics.fmean(lora), color="tab:orange", linewidth=1)
        ax.set_xticks(range(len(arms)), arms, rotation=75, fontsize=7)
        ax.set_title(f"{task}, {privacy}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("final eval accuracy (bars: mean; dots: seeds)")
    axes[0][0].set_ylim(0.3, 1.0)
    fig.suptitle(f"Adapter families against LoRA (budget: LoRA rank {grid.budget_rank})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def fill_doc(doc: Path, body: str) -> None:
    """Replace the generated block of ``doc`` (between BEGIN and END) with ``body``."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no generated block: it needs the lines {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{rest.split(END, 1)[1]}")


def _shown(path: Path) -> str:
    """``path`` as the result names it: from the repository root when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-adapters")
    parser.add_argument("--grid", type=Path, default=GRID, help="the grid file")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="where the plot goes")
    parser.add_argument(
        "--docs",
        type=Path,
        nargs="?",
        const=FAMILIES_DOC,
        default=None,
        help="also rewrite this page's generated block (default docs/families.md)",
    )
    parser.set_defaults(seeds=None)
    args = parser.parse_args()
    grid = load_grid(args.grid)
    seeds = args.seeds or list(grid.seeds)
    ranks = plan(grid, args.overrides, adapter_parameters)  # looked up at call time: tests count without models
    print(f"ranks and trainable parameters per task: {ranks}", flush=True)
    log = Path(args.runs) / "results.jsonl"
    planned = cells(grid, ranks, seeds)
    todo = [(labels, resolve(grid.tasks[labels["task"]][0], [*o, *args.overrides])) for labels, o in planned]
    if not args.render:
        run_grid(log, Path(args.runs), todo)
    results = [r for r in held(log, todo) if r is not None]
    data = figures(results, ranks)
    found = verdicts(data, grid)
    done_seeds = sorted({d["seed"] for d in data})
    about = (
        f"The grid {_shown(args.grid)} (overrides {settings(args.overrides)}): cells held {len(data)} of "
        f"{len(todo)}, seeds {done_seeds or 'none'} of {seeds}; the budget is LoRA rank {grid.budget_rank}. One row "
        f"per planned arm, task and privacy: final-round accuracy, mean ± std over the seeds held (0 seeds: no cell "
        f"yet). Wall / step is a round's wall time over its local steps on a machine shared with other jobs (median "
        f"over the row's cells): `family_steps` gives the families' step times side by side. Claims: the claimed "
        f"arm minus the other, seed by seed, judged by the test the grid file states. Plot: {_shown(args.figure)}."
    )
    blocks = [
        (arm, task, privacy)
        for task in grid.tasks
        for privacy in grid.privacy
        for arm in dict.fromkeys(c["arm"] for c, _ in planned if (c["task"], c["privacy"]) == (task, privacy))
    ]
    claims = Table("Claims: each judged on its paired differences", VERDICT_COLUMNS, verdict_rows(found, len(seeds)))
    cell_table = Table("Cells: every finished run", CELL_COLUMNS, cell_rows(data))
    path = save(
        "adapters_accuracy",
        "Adapter families against LoRA: the papers' claims",
        about,
        COLUMNS,
        summary(data, blocks, ranks),
        args.results,
        figures=[_shown(args.figure)],
        tables=[claims, cell_table],
    )
    plot(data, grid, args.figure)  # after saving: a figure drawn before would mark the result's commit dirty
    record = json.loads(path.read_text())
    shown = f"{about}\n\n{table(record)}\n\n**{claims.title}**\n\n{table(record['tables'][0])}"
    if args.docs is not None:
        fill_doc(args.docs, shown)
    print(shown)


if __name__ == "__main__":
    main()
