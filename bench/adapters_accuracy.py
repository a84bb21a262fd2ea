"""LoRA vs FFA-LoRA vs MoSLoRA vs MoLE vs MoR vs RoseLoRA vs Dynamic LoRA at about equal trainable-parameter budget.

Each family's rank is chosen so that its trainable adapter parameters (task head excluded) come
closest to LoRA's at ``--budget-rank``; MoLE and MoR keep ``adapter.experts``. RoseLoRA counts its dense
factors (so it runs at LoRA's rank, pruned to ``adapter.keep_ratio``); Dynamic LoRA its maximum rank
(the rank column is its mean rank, half the maximum). Every cell is a real
``fed simulate`` run (the same code path as the command line), on the ``mixed-domains`` preset (one
sentiment domain per client) and on the same data split IID, with and without DP-SGD, over several
seeds. The table (final-round accuracy mean ± std over seeds, mean aggregation error, bytes up per
round) is written with the exact settings to bench/results/adapters_accuracy.json; raw runs to --runs. The DP
cells read the mean-pooled tokens (``model.pooling=mean``; see ``DP``).

    python -m bench run adapters_accuracy                      # the full grid: 7 families x 2 splits x 2 x 3 seeds
    python -m bench run adapters_accuracy --seeds 0 --set federation.rounds=2 --set train.local_steps=3 \
        --set data.max_examples=800                        # a reduced grid

Each finished cell is appended at once to ``<runs>/results.jsonl``, with its full config; the same command
run again resumes an interrupted grid (cells the log holds with the same config are skipped; the cells
run seed by seed, so a partial grid has every family's first seeds). ``--render`` rewrites the table
from that file without running anything.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.cells import SPREAD, bench_parser, held, run_grid, settings, spread
from bench.results import Column, save
from fed.adapters import build, kinds
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.models import load_model
from fed.session import adapter_spec, num_labels

FAMILIES = kinds()
SPLITS = {"mixed-domains": [], "iid": ["data.partition=iid"]}
DP = {"no DP": [], "DP eps 8": ["dp.enabled=true", "dp.target_epsilon=8", "model.pooling=mean"]}
"""Under DP the head reads MiniLM's mean-pooled tokens (zero-initialised): with the preset's BERT pooler over
[CLS], every family's DP run stays at the majority class (docs/privacy.md, "Utility"), which says nothing
about the families."""


def adapter_parameters(cfg: RunConfig) -> int:
    """Trainable adapter parameters of ``cfg`` on its model, task head excluded."""
    model = load_model(cfg.model.name, cfg.task, num_labels=num_labels(cfg), seed=cfg.seed)
    adapter = build(model, adapter_spec(cfg.adapter, model), cfg.seed)
    return sum(p.numel() for p in adapter.trainable_parameters())


def matched_rank(cfg: RunConfig, budget: int, max_rank: int = 64) -> tuple[int, int]:
    """The rank whose parameter count is closest to ``budget``, and that count.

    Counts are affine in the rank except MoSLoRA's r² mixer, so an affine guess from ranks 1 and 2
    is refined by exact counts at the guess and its neighbours.
    """
    one, two = (adapter_parameters(cfg.with_overrides({"adapter.rank": r})) for r in (1, 2))
    guess = min(range(1, max_rank + 1), key=lambda r: abs(one + (two - one) * (r - 1) - budget))
    exact = {
        r: adapter_parameters(cfg.with_overrides({"adapter.rank": r}))
        for r in range(max(1, guess - 2), min(max_rank, guess + 2) + 1)
    }
    rank = min(exact, key=lambda r: abs(exact[r] - budget))
    return rank, exact[rank]


COLUMNS = (
    Column("family"),
    Column("rank"),
    Column("trainable params"),
    Column("split"),
    Column("dp"),
    *SPREAD,
    Column("mean aggregation error", digits=6),
    Column("up / client / round", "bytes", digits=0),
)


def table(results: list[dict[str, Any]], params: dict[str, tuple[int, int]]) -> list[tuple[object, ...]]:
    """One row per family, split and DP setting that holds runs: final accuracy over its seeds, its mean
    aggregation error and bytes sent."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["family"], r["split"], r["dp"]), []).append(r)
    rows = []
    for family, (rank, count) in params.items():
        for split in SPLITS:
            for dp in DP:
                mine = cells.get((family, split, dp), [])
                if mine:
                    errors = [r["aggregation_error"] for r in mine if r["aggregation_error"] is not None]
                    rows.append(
                        (
                            family,
                            rank,
                            count,
                            split,
                            dp,
                            *spread([r["accuracy"] for r in mine]),
                            statistics.fmean(errors) if errors else None,
                            statistics.fmean(r["bytes_up"] for r in mine),
                        )
                    )
    return rows


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-adapters")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--dp", nargs="+", default=list(DP), choices=list(DP))
    parser.add_argument("--budget-rank", type=int, default=8, help="LoRA rank whose parameter count sets the budget")
    args = parser.parse_args()
    base = resolve("mixed-domains", args.overrides)
    budget = adapter_parameters(base.with_overrides({"adapter.kind": "lora", "adapter.rank": args.budget_rank}))
    params = {f: matched_rank(base.with_overrides({"adapter.kind": f}), budget) for f in args.families}
    print(f"budget: {budget:,} trainable adapter parameters (LoRA rank {args.budget_rank}); ranks: {params}")
    log = Path(args.runs) / "results.jsonl"
    grid = [
        (
            {"family": family, "split": split, "dp": dp, "seed": seed},
            resolve(
                "mixed-domains",
                [
                    *args.overrides,
                    *SPLITS[split],
                    *DP[dp],
                    f"adapter.kind={family}",
                    f"adapter.rank={params[family][0]}",
                    f"seed={seed}",
                ],
            ),
        )
        for family in args.families
        for split in args.splits
        for dp in args.dp
        for seed in args.seeds
    ]
    if not args.render:
        run_grid(log, Path(args.runs), grid)
    results = [record for record in held(log, grid) if record is not None]
    about = (
        f"`python -m bench run adapters_accuracy --seeds {' '.join(map(str, args.seeds))}` with overrides "
        f"{settings(args.overrides)}, on top of the `mixed-domains` preset (IID: the same data, "
        f"`data.partition=iid`). Final-round accuracy over the seeds a cell holds "
        f"of {args.seeds} (cells held so far: {len(results)} of {len(grid)}); the budget is "
        f"LoRA rank {args.budget_rank} ({budget:,} parameters); DP targets epsilon 8 per client, with a "
        f"mean-pooled head (`model.pooling=mean`)."
    )
    save("adapters_accuracy", "Adapter families at equal budget", about, COLUMNS, table(results, params), args.results)
    print(about, *table(results, params), sep="\n")


if __name__ == "__main__":
    main()
