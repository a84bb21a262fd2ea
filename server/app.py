"""Flower ServerApp: build the adapter-aware strategy from the config, run the rounds, record the run.

Each round's line (losses, accuracy, bytes, wall time) and a checkpoint of the global adapter are
written as soon as the round ends; the privacy book is written once per round, as soon as the round's
replies arrive, before aggregation, so a crash loses no DP event the server has seen. Mid-run it holds
the run's accountant only; the RDP/PRV cross-check is added when the run ends (and by ``fed report``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fed.adapters import Adapter
from fed.config import RunConfig
from fed.config.sources import from_run_config
from fed.privacy.book import LedgerBook
from fed.privacy.client_level import ClientAccount
from fed.reports.curves import plot_curves
from fed.reports.privacy import write_report
from fed.run.checkpoint import Checkpoint
from fed.run.export import export_adapter
from fed.run.rundir import RunDir
from fed.session import adapted_model, server_preflight
from fed.wire import config_record, from_record, metas, to_record
from strategies.build import build_strategy
from strategies.core import AdapterStrategy
from strategies.pipeline import RoundLog

app = ServerApp()
RoundCallback = Callable[[dict[str, Any]], None]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the run-config names a preset plus any dotted overrides, or
    ``resume`` names a run directory to continue."""
    resume = str(context.run_config.get("resume", ""))
    if resume:  # continue that run directory from its last checkpoint, with the config it started with
        run_dir = RunDir(Path(resume))
        cfg = run_dir.config()
    else:
        cfg = from_run_config(context.run_config)
        run_config = context.run_config
        run_dir = RunDir.create(str(run_config.get("out", "runs")), cfg, str(run_config.get("name", "")))
    server_preflight(cfg)  # config and model only: a deployed server holds no client data
    run_federation(grid, cfg, run_dir, resume=run_dir.resume_point() if resume else None)


class RoundRecorder:
    """Called by the strategy after each round's evaluation: writes the round's line and checkpoint (the
    privacy book was written when the round's replies arrived)."""

    def __init__(
        self, strategy: AdapterStrategy, book: LedgerBook, run_dir: RunDir, on_round: RoundCallback | None
    ) -> None:
        self.strategy, self.book, self.run_dir, self.on_round = strategy, book, run_dir, on_round
        self.started = time.perf_counter()

    def __call__(self, round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_ == 0:
            self.started = time.perf_counter()
            return None
        round_ += self.strategy.round_offset
        log = self.strategy.rounds.pop(round_, None)  # written once: the run keeps no round's log after its line
        if log is None:
            return None
        now = time.perf_counter()
        line = _line(round_, log, self.book) | {"wall_s": round(now - self.started, 3)}
        self.started = now
        self.run_dir.append_metrics(line)
        global_ = from_record(arrays, self.strategy.model.expected)
        Checkpoint(round_, global_, self.book.to_json()).save(self.run_dir.checkpoint)
        if self.on_round is not None:
            self.on_round(line)
        return None


def _line(round_: int, log: RoundLog, book: LedgerBook) -> dict[str, Any]:
    """A round's line in metrics.jsonl (its wall time added by the recorder)."""
    return {
        "round": round_,
        "train_loss": log.train_loss,
        "eval_loss": log.evaluate.get("eval_loss"),
        "eval_accuracy": log.evaluate.get("eval_accuracy"),
        "eval_examples": log.evaluate.get("eval_examples"),
        "bytes_up": log.bytes_up,
        "bytes_down": log.bytes_down,
        "aggregation_error": log.aggregation_error,
        "secagg_error": log.secagg_error,
        "clients": log.accepted,
        "dropped": log.dropped,
        "capped": log.capped,
        "clipped": log.clipped,
        "delta_norm_bound": log.norm_bound,
        "epsilon_max": book.max_epsilon() if book.dp.example_level else None,  # no DP: no epsilon, not 0
        "client_epsilon": None if book.client is None else book.client.epsilon(),
    }


def new_book(cfg: RunConfig, coordinates: int = 0) -> LedgerBook:
    """The run's privacy book: every client's DP-SGD events and, at the client level, the server's own account
    (``coordinates``: how many numbers an update holds, which sizes the clients' noise under secure aggregation)."""
    client = ClientAccount.of(cfg.dp, cfg.federation, coordinates) if cfg.dp.client_level else None
    return LedgerBook(cfg.dp, client=client)


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: RunDir, on_round: RoundCallback | None = None, resume: Checkpoint | None = None
) -> RunDir:
    """All rounds of ``cfg`` on ``grid`` (those after ``resume``'s round when given); leaves metrics,
    privacy ledger, a checkpoint per round and the final adapter in ``run_dir``."""
    adapter, _ = adapted_model(cfg)
    initial = adapter.sent_state()
    if resume is not None:  # validated like any payload: a checkpoint of another config must not load
        initial = from_record(to_record(resume.arrays), metas(initial))
    fed = cfg.federation
    coordinates = sum(t.numel() for t in initial.values())
    book = new_book(cfg, coordinates) if resume is None else LedgerBook.from_json(resume.book)
    strategy = build_strategy(
        cfg,
        adapter,
        book,
        on_privacy=lambda b: run_dir.write_privacy(b.report()),
        round_offset=0 if resume is None else resume.round,
    )
    recorder = RoundRecorder(strategy, book, run_dir, on_round)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=fed.rounds - strategy.round_offset,
        timeout=fed.round_timeout,
        train_config=config_record(cfg),
        evaluate_config=config_record(cfg),
        evaluate_fn=recorder,
    )
    final = result.arrays if len(result.arrays) else to_record(initial)  # empty: no round aggregated anything
    adapter.load(from_record(final, metas(initial)))
    _finish(cfg, run_dir, book, adapter)
    return run_dir


def _finish(cfg: RunConfig, run_dir: RunDir, book: LedgerBook, adapter: Adapter) -> None:
    """What a finished run leaves: the cross-checked privacy book, the report (of every run: without DP it
    says so first), the exported adapter, curves."""
    run_dir.write_privacy(book.report(cross_check=True))
    write_report(run_dir.path)
    export_adapter(
        adapter,
        run_dir.adapter,
        task=cfg.task,
        base_model=cfg.model.name,
        pooling=cfg.model.pooling,
        layers=cfg.model.layers,
    )
    plot_curves(
        run_dir.metrics(),
        run_dir.path / "curves.png",
        dp=cfg.dp.enabled,
        title=f"{cfg.adapter.kind} · {cfg.data.name} · {cfg.federation.num_clients} clients"
        + (f" · DP target eps {cfg.dp.target_epsilon:g}" if cfg.dp.target_epsilon else ""),
    )
