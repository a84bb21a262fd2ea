"""The accuracy benches' grid runner resumes an interrupted grid without re-running or mixing settings."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import cells
from fed.config.sources import resolve
from fed.run.rundir import RunDir


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Seeds of the cells run_cell was asked to run, in order; each 'run' scores its seed."""
    seen: list[int] = []

    def fake(cfg, runs, name):
        seen.append(cfg.seed)
        return {"accuracy": cfg.seed / 10}

    monkeypatch.setattr(cells, "run_cell", fake)
    return seen


def grid(seeds: list[int], families: list[str], extra: Sequence[str] = ()) -> list:
    return [
        ({"family": f, "seed": s}, resolve("mixed-domains", [*extra, f"adapter.kind={f}", f"seed={s}"]))
        for f in families
        for s in seeds
    ]


def test_runs_seed_by_seed_and_resumes(tmp_path: Path, ran: list[int]) -> None:
    log = tmp_path / "results.jsonl"
    cells.run_grid(log, tmp_path, grid([0, 1], ["lora", "mor"]))
    assert ran == [0, 0, 1, 1]  # every family's seed 0 before any seed 1
    cells.run_grid(log, tmp_path, grid([0, 1, 2], ["lora", "mor"]))
    assert ran == [0, 0, 1, 1, 2, 2]  # only the new seed ran
    assert sorted((r["family"], r["seed"]) for r in cells.finished(log)) == [
        (f, s) for f in ("lora", "mor") for s in (0, 1, 2)
    ]


def test_other_settings_are_other_cells(tmp_path: Path, ran: list[int]) -> None:
    log = tmp_path / "results.jsonl"
    cells.run_grid(log, tmp_path, grid([0], ["lora"]))
    cells.run_grid(log, tmp_path, grid([0], ["lora"], ["federation.rounds=2"]))
    assert ran == [0, 0]
    # a table of the second grid holds its own record only, not the first's under the same labels
    assert [
        r["config"]["federation.rounds"] for r in cells.held(log, grid([0], ["lora"], ["federation.rounds=2"]))
    ] == [2]


def test_a_key_added_since_at_its_default_keeps_a_cell_done(tmp_path: Path, ran: list[int]) -> None:
    """A grid resumed by newer code (its config has a key the log's lines lack) re-runs nothing."""
    log = tmp_path / "results.jsonl"
    cells.run_grid(log, tmp_path, grid([0], ["lora"]))
    lines = cells.finished(log)
    del lines[0]["config"]["dp.head_clip_share"]  # as written before that key existed
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cells.run_grid(log, tmp_path, grid([0], ["lora"]))
    assert ran == [0]


def test_a_booked_run_is_its_grid_cell_and_is_not_run_again(tmp_path: Path, ran: list[int]) -> None:
    """A run made by hand and booked with ``dp_utility.py --add`` counts as the grid's cell: the resumed grid
    skips it and its table holds it."""
    from bench import dp_utility

    overrides = ["adapter.kind=ffa-lora", "data.partition=iid", "dp.target_epsilon=3", "seed=1"]
    made = resolve("private", [*overrides, "train.micro_batch=8"])  # another speed, the same cell
    run = RunDir.create(tmp_path / "runs", made, name="by-hand")
    run.append_metrics({"round": 1, "eval_accuracy": 0.7, "epsilon_max": 3.0, "bytes_up": 8, "clients": 4})
    labels = dp_utility.cell_of(run)
    log = tmp_path / "results.jsonl"
    cells.record(log, labels, run.config(), cells.summarise(run))
    grid = [
        (labels, resolve("private", overrides)),
        ({**labels, "seed": 2}, resolve("private", [*overrides[:3], "seed=2"])),
    ]
    assert [r is not None for r in cells.held(log, grid)] == [True, False]
    cells.run_grid(log, tmp_path, grid)
    assert ran == [2]


def test_a_setting_that_changes_the_figures_is_another_cell() -> None:
    base = resolve("private")
    assert cells.same_cell(base, base.with_overrides({"train.micro_batch": 8, "train.eval_batch_size": 16}))
    assert not cells.same_cell(base, base.with_overrides({"train.batch_size": 128}))
    assert not cells.same_cell(base, base.with_overrides({"dp.target_epsilon": 3.0}))


def test_the_round_plot_averages_each_epsilons_seeds_round_by_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each line of the round-by-round plot is the per-round mean of that epsilon's seeds, its band their
    range, in one panel per adapter and split that has cells."""
    from bench import dp_utility

    drawn: dict[str, list[list[float]]] = {}
    bands: list[tuple[list[float], list[float]]] = []
    real = dp_utility._pyplot()
    monkeypatch.setattr(real.Axes, "plot", lambda ax, x, y, **kw: drawn.setdefault(kw["label"], []).append(list(y)))
    monkeypatch.setattr(real.Axes, "fill_between", lambda ax, x, lo, hi, **kw: bands.append((list(lo), list(hi))))
    cell = {"adapter": "ffa-lora", "split": "iid"}
    results = [
        {**cell, "epsilon_target": "8", "seed": 0, "curve": [0.6, 0.7, 0.8]},
        {**cell, "epsilon_target": "8", "seed": 1, "curve": [0.4, 0.7, 0.6]},
        {**cell, "epsilon_target": "inf", "seed": 0, "curve": [0.5, 0.5, 0.9]},
        {"adapter": "lora", "split": "iid", "epsilon_target": "1", "seed": 0, "curve": [0.5, 0.6]},
    ]
    dp_utility.plot_curves(results, tmp_path / "rounds.png")
    assert drawn["eps 8 (2)"] == [[pytest.approx(0.5), pytest.approx(0.7), pytest.approx(0.7)]]
    assert drawn["no DP (1)"] == [[0.5, 0.5, 0.9]] and drawn["eps 1 (1)"] == [[0.5, 0.6]]
    assert ([0.4, 0.7, 0.6], [0.6, 0.7, 0.8]) in bands
    assert (tmp_path / "rounds.png").stat().st_size > 0


def test_a_call_for_part_of_the_grid_renders_every_cell_the_log_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-row call (``--splits iid``) must not shrink the table to its row: the log's other cells stay."""
    from bench import dp_utility

    log = tmp_path / "results.jsonl"
    for split, extra in dp_utility.SPLITS.items():
        labels = {"adapter": "ffa-lora", "split": split, "epsilon_target": "8", "seed": 0}
        cfg = resolve("private", ["adapter.kind=ffa-lora", *extra, "dp.target_epsilon=8", "seed=0"])
        cells.record(log, labels, cfg, {"accuracy": 0.7, "wall_s": 60.0, "curve": [0.6, 0.7], "epsilon": 8.0})
    out = tmp_path / "results"
    argv = ["--render", "--splits", "iid", "--seeds", "0", "--runs", str(tmp_path), "--results", str(out)]
    monkeypatch.setattr(sys, "argv", ["dp_utility.py", *argv, "--figures", str(tmp_path)])
    dp_utility.main()
    rows = json.loads((out / "dp_utility.json").read_text())["rows"]
    assert [(r["adapter"], r["split"], r["epsilon"]) for r in rows] == [
        ("ffa-lora", "iid", "8"),
        ("ffa-lora", "dirichlet-0.5", "8"),
    ]


def test_a_run_that_lost_a_client_is_not_booked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed mid-run (out of memory) leaves a run with fewer clients or no score: the grid must run
    that cell again rather than tabulate it."""
    outcomes = iter(
        [
            {"accuracy": None, "dropped": 0},
            {"accuracy": 0.7, "dropped": 3, "first_drop": "node 1: client error: OutOfMemoryError"},
            {"accuracy": 0.8, "dropped": 0},
        ]
    )
    monkeypatch.setattr(cells, "run_cell", lambda cfg, runs, name: next(outcomes))
    log = tmp_path / "results.jsonl"
    for _ in range(3):
        cells.run_grid(log, tmp_path, grid([0], ["lora"]))
    assert [r["accuracy"] for r in cells.finished(log)] == [0.8]


def test_summarise_counts_the_replies_a_run_dropped(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, resolve("mixed-domains"), name="lost")
    line = {"eval_accuracy": 0.7, "epsilon_max": None, "bytes_up": 8, "clients": 4, "dropped": []}
    run.append_metrics({"round": 1, **line})
    run.append_metrics({"round": 2, **line, "clients": 3, "dropped": ["node 7: client error: OutOfMemoryError"]})
    summary = cells.summarise(run)
    assert summary["dropped"] == 1 and "OutOfMemoryError" in summary["first_drop"]
    assert cells.incomplete(summary) is not None
