"""The families grid: its file read into cells seed-major, ranks matched to a budget, and the table, plot,
verdicts and docs block generated from a tiny grid run end to end with a stand-in for each run."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from bench import adapters_accuracy as aa
from bench import cells

TINY = """
seeds = [0, 1]
budget_rank = 4
base = ["federation.rounds=2", "train.local_steps=3"]

[tasks.md]
preset = "mixed-domains"
overrides = []

[privacy.none]
overrides = []

[privacy.eps8]
overrides = ["dp.enabled=true", "dp.target_epsilon=8", "model.pooling=mean"]

[families]
lora = []
moslora = []
roselora = ["adapter.keep_ratio=0.1"]

[[claims]]
name = "MoSLoRA above LoRA"
compare = ["moslora", "lora"]
test = "above"
control = ["data.partition=iid"]

[[claims]]
name = "RoseLoRA near LoRA at a third of the bytes"
compare = ["roselora", "lora"]
test = "near"
tolerance = 0.02
max_bytes_ratio = 0.35
unmatched = true

[[claims]]
name = "product against factors"
family = "lora"
test = "above"
overrides = ["adapter.rank=8"]
rules = { product = ["strategy.aggregation=product"], factors = ["strategy.aggregation=mean"] }
"""


def count(cfg) -> int:
    """A stand-in parameter count: affine in the rank, plus an r² term for MoSLoRA's mixer."""
    r = cfg.adapter.rank
    return 1000 * r + (r * r if cfg.adapter.kind == "moslora" else 0) + (7 if cfg.adapter.kind == "roselora" else 0)


ACCURACY = {"lora": 0.70, "moslora": 0.73, "roselora": 0.695, "product": 0.74, "factors": 0.70}
BYTES = {"roselora": 300.0}


def fake_run(cfg, runs, name):
    """A run's summary: accuracy by arm (read back from the config) plus a per-seed wobble; bytes by family."""
    kind = cfg.adapter.kind
    arm = {"product": "product", "mean": "factors"}[cfg.strategy.aggregation] if cfg.adapter.rank == 8 else kind
    wobble = [0.0, 0.01][cfg.seed] * (1 if arm == "moslora" else 0)
    iid = cfg.data.partition == "iid"
    return {
        "accuracy": ACCURACY[arm] + wobble - (0.02 if iid and arm == "moslora" else 0.0),
        "bytes_up": BYTES.get(kind, 1000.0),
        "wall_s": 12.0,
        "aggregation_error": 0.1,
        "curve": [0.5, ACCURACY[arm]],
        "epsilon": 8.0 if cfg.dp.enabled else None,
    }


@pytest.fixture
def grid(tmp_path: Path) -> aa.Grid:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return aa.load_grid(path)


def test_matched_rank_is_the_closest_count_to_the_budget() -> None:
    from fed.config.sources import resolve

    cfg = resolve("mixed-domains", ["adapter.kind=moslora"])
    for budget in (3_500, 8_000, 20_300, 41_999):
        brute = min(range(1, 65), key=lambda r: abs(1000 * r + r * r - budget))
        assert aa.matched_rank(cfg, budget, count) == (brute, 1000 * brute + brute * brute)


def test_cells_are_seed_major_with_the_claims_arms(grid: aa.Grid) -> None:
    ranks = aa.plan(grid, [], count)
    assert ranks["md"]["lora"] == (4, 4000) and ranks["md"]["roselora"] == (4, 4007)  # unmatched: LoRA's rank
    assert ranks["md"]["moslora"] == (4, 4016)  # the count closest to 4,000
    assert ranks["md"]["product"] == (8, 8000)
    planned = aa.cells(grid, ranks, [0, 1])
    seeds = [labels["seed"] for labels, _ in planned]
    assert seeds == sorted(seeds)  # every cell of seed 0 first
    arms = [labels["arm"] for labels, _ in planned if labels["seed"] == 0 and labels["privacy"] == "none"]
    assert arms == [
        "lora",
        "moslora",
        "roselora",
        "product",
        "factors",
        "moslora [data.partition=iid]",
        "lora [data.partition=iid]",
    ]
    assert len(planned) == 2 * 2 * len(arms)
    overrides = dict(((labels["arm"], labels["privacy"], labels["seed"]), o) for labels, o in planned)
    assert "strategy.aggregation=product" in overrides[("product", "eps8", 1)]
    assert "dp.target_epsilon=8" in overrides[("product", "eps8", 1)] and "seed=1" in overrides[("product", "eps8", 1)]
    assert "adapter.keep_ratio=0.1" in overrides[("roselora", "none", 0)]


@pytest.mark.parametrize(
    "test, diffs, tolerance, expected",
    [
        ("above", [0.02, 0.03, 0.01], 0.0, "held"),  # mean 0.02 > standard error 0.0058
        ("above", [0.05, -0.04, 0.02], 0.0, "failed"),  # mean 0.01 < standard error 0.026
        ("above", [-0.001], 0.0, "failed"),
        ("at_or_above", [-0.005, -0.01, 0.0], 0.01, "held"),
        ("at_or_above", [-0.02, -0.01, -0.015], 0.01, "failed"),
        ("near", [0.03, -0.01, 0.01], 0.02, "held"),  # mean 0.01
        ("near", [-0.03, -0.02, -0.04], 0.02, "failed"),
    ],
)
def test_a_claim_is_judged_on_its_paired_differences(
    test: str, diffs: list[float], tolerance: float, expected: str
) -> None:
    claim = aa.Claim(name="c", arms=("a", "b"), test=test, tolerance=tolerance)
    assert aa.judge(claim, diffs) == expected


def test_tiny_grid_runs_resumes_and_renders(grid: aa.Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner runs every cell once (a second call runs none), and the generator's table, verdicts, JSON,
    plot and docs block hold what the stand-in runs returned."""
    monkeypatch.setattr(cells, "run_cell", fake_run)
    monkeypatch.setattr(aa, "adapter_parameters", count)
    doc = tmp_path / "families.md"
    doc.write_text(f"# Families\n\nprose\n\n{aa.BEGIN}\nSTALE TABLE\n{aa.END}\n\nafter\n")
    results, figure = tmp_path / "results", tmp_path / "img" / "plot.png"
    argv = ["--grid", str(tmp_path / "tiny.toml"), "--runs", str(tmp_path / "runs"), "--results", str(results)]
    argv += ["--figure", str(figure), "--docs", str(doc)]
    monkeypatch.setattr(sys, "argv", ["adapters_accuracy", *argv])
    aa.main()
    log = tmp_path / "runs" / "results.jsonl"
    assert len(cells.finished(log)) == 28
    aa.main()  # resumed: nothing left to run
    assert len(cells.finished(log)) == 28

    saved = json.loads((results / "adapters_accuracy.json").read_text())
    claims, cells_table = saved["tables"]
    assert len(cells_table["rows"]) == 28 and "cells held 28 of 28" in saved["about"]
    one = next(c for c in cells_table["rows"] if (c["arm"], c["privacy"], c["seed"]) == ("moslora", "none", 1))
    assert one["accuracy"] == pytest.approx(0.74) and one["trainable params"] == 4016
    assert one["wall / step (shared)"] == pytest.approx(12.0 / (2 * 3))  # the wall over rounds x local steps

    rows = {(r["arm"], r["task"], r["privacy"]): r for r in saved["rows"]}
    assert len(rows) == 14  # every planned arm, task and privacy once
    moslora = rows[("moslora", "md", "none")]
    assert moslora["accuracy, mean"] == pytest.approx(statistics.fmean([0.73, 0.74]))
    assert moslora["std"] == pytest.approx(statistics.stdev([0.73, 0.74])) and moslora["seeds"] == 2
    assert rows[("moslora [data.partition=iid]", "md", "eps8")]["rank"] == 4  # a control runs at its family's rank
    verdicts = {(v["claim"], v["privacy"]): v for v in claims["rows"]}
    mos = verdicts[("MoSLoRA above LoRA", "none")]
    assert mos["difference (paired)"] == pytest.approx(0.035) and mos["verdict"] == "held"  # diffs 0.03, 0.04
    assert "gap under data.partition=iid: +0.015 (2)" in mos["also"]  # the control's smaller gap
    rose = verdicts[("RoseLoRA near LoRA at a third of the bytes", "eps8")]
    assert rose["verdict"] == "held" and "bytes ratio 0.30" in rose["also"]
    assert verdicts[("product against factors", "none")]["difference (paired)"] == pytest.approx(0.04)

    assert figure.stat().st_size > 0
    text = doc.read_text()
    assert "STALE TABLE" not in text and text.endswith(f"{aa.END}\n\nafter\n")
    assert "| moslora | md | none | 4 | 4,016 | 0.735 | 0.007 | 2 |" in text and "| MoSLoRA above LoRA |" in text


def test_the_shipped_grid_reads() -> None:
    grid = aa.load_grid()
    assert set(grid.families) == {"lora", "ffa-lora", "moslora", "mole", "mor", "roselora", "dynamic-lora"}
    assert set(grid.tasks) == {"mixed-domains", "trec"} and grid.seeds == (0, 1, 2)
    assert {claim.test for claim in grid.claims} <= set(aa.TESTS)
