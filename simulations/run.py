"""Local multi-client simulation on one machine: Flower's Simulation Engine (Ray) runs the same apps.

The server app is bound to the resolved config here and sends it to every client in each message,
so the clients need nothing but the installed package.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers.utils import logging as transformers_logging

from clients.app import app as client_app
from fed.config import ConfigError, RunConfig, SimulationConfig
from fed.device import resolve_device
from fed.privacy.client import POLICY_ENV, STATE_DIR_ENV
from fed.privacy.planner import delta_problems
from fed.run.checkpoint import Checkpoint
from fed.run.rundir import RunDir
from fed.session import client_data, preflight, with_local_labels
from server.app import run_federation

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # oneDNN caches a kernel per input shape, up to 1,024 by default; an actor training client after client
    # meets a new sequence length with nearly every batch, so its memory grew round after round until the
    # cache was full. 256 keeps the kernels a client reuses within its own steps (bench/cohorts.py).
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256",
}


class _DropRunSimulationDeprecation(logging.Filter):
    """``fed simulate`` is our front door to Flower's in-process simulation; its deprecation notice
    (addressed to people calling ``run_simulation`` themselves) would only confuse our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


_RUN_SIMULATION_NOTICE = _DropRunSimulationDeprecation()


def _quiet(verbose: bool) -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # The RDP accountant's hint about its order grid does not change the (valid) bound it reports.
    warnings.filterwarnings("ignore", message="Optimal order is")
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()  # reading a data file is quick; its bars would bury an error line
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_RUN_SIMULATION_NOTICE)  # adding the same filter object twice is a no-op
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)


def _describe(line: dict[str, Any]) -> str:
    parts = [f"round {line['round']}"]
    if line.get("eval_accuracy") is not None:
        parts.append(f"acc {line['eval_accuracy']:.3f}")
    if line.get("eval_loss") is not None:
        parts.append(f"eval loss {line['eval_loss']:.3f}")
    if line.get("epsilon_max") is not None:  # None: a run without DP, which has no epsilon
        parts.append(f"eps {line['epsilon_max']:.2f}")
    parts.append(f"{line['wall_s']:.0f}s")
    return " · ".join(parts)


def backend_config(sim: SimulationConfig, verbose: bool) -> dict[str, Any]:
    """Ray's resources for ``sim``: Flower starts (cores Ray may use) // (cores per client) actors, and Ray
    sets each actor's OMP_NUM_THREADS (torch's thread count) to its cores. With ``gpus_per_client`` each actor
    also reserves that share of a GPU, so at most 1 / share actors run on each GPU, and Ray makes only that GPU
    visible to it (``train.device = auto`` then finds it); without, Ray hides the GPUs from the actors."""
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    if sim.actors:
        init["num_cpus"] = sim.actors * sim.threads
    return {"client_resources": {"num_cpus": sim.threads, "num_gpus": sim.gpus_per_client}, "init_args": init}


def _check_devices(cfg: RunConfig) -> None:
    """Stop before any worker when the clients could not get the GPU asked for: Ray would wait forever for a
    GPU share this machine lacks, and without a share it hides the GPUs from every client."""
    share, device = cfg.simulation.gpus_per_client, cfg.train.device
    if share > 0 and resolve_device("auto") == torch.device("cpu"):
        raise ConfigError(f"simulation.gpus_per_client={share} but this machine has no CUDA GPU; set it to 0")
    if share == 0 and device.startswith("cuda"):
        raise ConfigError(
            f"train.device={device!r} needs simulation.gpus_per_client > 0 (e.g. 0.25: four clients per GPU): "
            "without a share Ray hides the GPUs from the clients"
        )


def _check_delta(cfg: RunConfig) -> None:
    """Stop before any worker when a client would refuse delta > 1/(10 n) (it would, every round)."""
    if not cfg.dp.example_level:
        return
    for pid in range(cfg.federation.num_clients):
        problems = delta_problems(cfg.dp.delta, len(client_data(cfg, pid).train))
        if problems:
            raise ConfigError(f"client {pid}: {problems[0]}")


def resume(path: str | Path, *, console: Console | None = None, verbose: bool = False) -> RunDir:
    """Continue the run in ``path`` from its last checkpoint, with the config it was started with."""
    run_dir = RunDir(Path(path))
    try:
        cfg = run_dir.config()
        Checkpoint.load(run_dir.checkpoint)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot resume {path}: {err}") from err
    return simulate(cfg, console=console, verbose=verbose, resume_from=run_dir)


def simulate(
    cfg: RunConfig,
    out: str | Path = "runs",
    *,
    name: str = "",
    console: Console | None = None,
    verbose: bool = False,
    resume_from: RunDir | None = None,
    client: ClientApp = client_app,
) -> RunDir:
    """Run ``cfg`` with ``cfg.federation.num_clients`` simulated clients; returns the finished run dir.

    Simulated clients keep their ledgers in ``<run dir>/clients`` (the simulation's stand-in for each
    node's state directory: partitions of one dataset, fresh for each experiment), so that a resumed run
    continues every client's budget. ``client`` replaces the ClientApp (the attack test runs a red-team
    client through the same path)."""
    _quiet(verbose)
    console = console or Console(stderr=True)
    with console.status("loading the model and partitioning the data…"):
        cfg = with_local_labels(cfg)
        warnings_ = preflight(cfg)
        _check_delta(cfg)
        _check_devices(cfg)
    for warning in warnings_:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    run_dir = resume_from or RunDir.create(out, cfg, name)
    checkpoint = None if resume_from is None else run_dir.resume_point()
    columns = (
        TextColumn("[bold]federated rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(
            "starting clients…", total=cfg.federation.rounds, completed=0 if checkpoint is None else checkpoint.round
        )

        def on_round(line: dict[str, Any]) -> None:
            progress.update(task, advance=1, description=_describe(line))

        server_app = ServerApp()

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            run_federation(grid, cfg, run_dir, on_round, resume=checkpoint)

        # Ray starts afresh for each simulation and its workers inherit this process's environment.
        os.environ[STATE_DIR_ENV] = str((run_dir.path / "clients").resolve())
        policy = os.environ.get(POLICY_ENV)
        os.environ[POLICY_ENV] = "run-config"  # a simulation's run config is also each node's policy
        try:
            run_simulation(
                server_app=server_app,
                client_app=client,
                num_supernodes=cfg.federation.num_clients,
                backend_config=backend_config(cfg.simulation, verbose),
                verbose_logging=verbose,
            )
        finally:
            os.environ.pop(STATE_DIR_ENV, None)
            if policy is None:  # as it was: a caller that set it (a test session) keeps it
                os.environ.pop(POLICY_ENV, None)
            else:
                os.environ[POLICY_ENV] = policy
    if not (run_dir.adapter / "fedlora.json").exists():
        raise RuntimeError(f"the simulation ended without finishing the run; see the log and {run_dir.path}")
    return run_dir
