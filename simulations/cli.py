"""The ``fed`` command: ``fed simulate``, ``fed plan`` (the DP schedule before training), ``fed report`` and
``fed config`` (every config key, its default and what it accepts)."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deploy import cli as deploy_cli
from fed.config import ConfigError
from fed.config.sources import preset_names, resolve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed", description="Federated adapter fine-tuning under DP-SGD.")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a local multi-client simulation")
    sim.add_argument(
        "--preset", default="quickstart", help=f"shipped preset ({', '.join(preset_names())}) or a path to a .toml file"
    )
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set adapter.kind=ffa-lora (repeatable)",
    )
    sim.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    sim.add_argument("--name", default="", help="run directory name (default: time and adapter)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    plan = commands.add_parser("plan", help="noise multiplier and epsilon per round of a DP config, before training")
    plan.add_argument("--preset", default="quickstart", help="preset name or .toml path (as for simulate)")
    plan.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set dp.target_epsilon=3 (repeatable)",
    )
    plan.add_argument(
        "--examples",
        type=int,
        default=0,
        help="a client's training examples n (default: the smallest client of the config's data)",
    )
    plan.add_argument(
        "--participation",
        type=float,
        default=None,
        help="expected fraction of rounds a client joins (default: federation.fraction_train)",
    )
    report = commands.add_parser("report", help="privacy report of a finished run: report.html + terminal summary")
    report.add_argument("run_dir", help="a run directory (holds privacy.json)")
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last completed round (with its own config; --preset and --set are ignored)",
    )
    config = commands.add_parser("config", help="every config key: default, accepted values, meaning")
    shown = config.add_mutually_exclusive_group(required=True)
    shown.add_argument("--list", action="store_true", help="a table of every key (with --preset: its values)")
    shown.add_argument("--markdown", action="store_true", help="the reference page (docs/configuration.md)")
    shown.add_argument(
        "--pyproject",
        action="store_true",
        help="the [tool.flwr.app.config] block pyproject.toml must declare for Flower",
    )
    config.add_argument("--preset", default=None, help="show this preset's resolved values (name or .toml path)")
    config.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --preset: override a config key (repeatable)",
    )
    deploy_cli.add_commands(commands)
    return parser


COLUMNS = {
    "round": "round",
    "train_loss": "train loss",
    "eval_loss": "eval loss",
    "eval_accuracy": "acc",
    "epsilon_max": "eps",
    "client_epsilon": "client eps",
    "bytes_up": "up MB",
    "bytes_down": "down MB",
    "wall_s": "s",
}


def error(console: Console, message: object) -> int:
    """A user error as one ``error:`` line (never folded, so scripts can grep it); the exit status 2."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return 2


def _cell(key: str, value: object, dp: bool) -> str:
    if key == "epsilon_max" and not dp:
        return "no DP"  # not 0: epsilon 0 would read as perfect privacy, and this run has no guarantee
    if value is None:
        return "-"
    if key.startswith("bytes") and isinstance(value, (int, float)):
        return f"{value / 1e6:.2f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _summary(lines: list[dict], dp: bool) -> Table:
    """The rounds table of a finished run; its epsilon column says "no DP" for a run without DP."""
    table = Table(title="rounds")
    for label in COLUMNS.values():
        table.add_column(label, justify="right", no_wrap=True)
    for line in lines:
        table.add_row(*(_cell(key, line.get(key), dp) for key in COLUMNS))
    return table


def _memory(cfg, console: Console) -> None:
    """The estimate of one client's training memory (``fed.memory``), for the model the config builds."""
    from fed.device import resolve_device
    from fed.memory import estimate, gib
    from fed.precision import resolve_precision
    from fed.session import adapted_model

    with console.status("building the model to size its memory…"):
        adapter, _ = adapted_model(cfg)
    # the client's device as train.device names it (auto: what this machine has)
    device = resolve_device("auto").type if cfg.train.device == "auto" else cfg.train.device.partition(":")[0]
    precision = resolve_precision(cfg.train.precision, device)
    found = estimate(adapter.model, cfg, activation_bytes=precision.itemsize)
    t = cfg.train
    table = Table(
        title=f"estimated memory per client: batch {t.batch_size} (micro-batch {t.micro_batch}) x "
        f"{cfg.model.max_length} tokens, base in {str(precision).removeprefix('torch.')}"
        + (", gradient checkpointing" if t.gradient_checkpointing else "")
    )
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for part, size in found.rows():
        table.add_row(part, gib(size))
    console.print(table)


def _plan(cfg, args: argparse.Namespace, console: Console) -> int:
    warnings.filterwarnings("ignore", message="Optimal order is")  # a hint on RDP's order grid, not a problem

    _memory(cfg, console)
    if not cfg.dp.enabled:
        return error(console, "dp.enabled is false: no privacy schedule to plan (add --set dp.enabled=true)")
    if cfg.dp.client_level:
        _plan_clients(cfg, console)
    return _plan_examples(cfg, args, console) if cfg.dp.example_level else 0


def _plan_clients(cfg, console: Console) -> None:
    """The client-level schedule: the server's noise, the client sample rate and epsilon after each round."""
    from fed.privacy.client_level import ClientMechanism, schedule

    dp, fed = cfg.dp, cfg.federation
    coordinates = _update_size(cfg) if fed.secure_aggregation else 0  # sizes the clients' own noise
    m = ClientMechanism.of(dp, fed, coordinates)
    cap = dp.client_target_epsilon
    table = Table(title=f"client-level epsilon per round at delta {dp.delta:g} (one whole client in or out)")
    for column in ("round", "eps RDP", "eps PRV"):
        table.add_column(column, justify="right")
    rows = schedule(dp, fed, coordinates)
    for round_, rdp, prv in rows:
        table.add_row(str(round_), f"{rdp:.3f}", f"{prv:.3f}")
    if m.distributed:
        console.print(
            f"client level, distributed (SecAgg+): each client clips to {dp.client_clip:g} and adds Skellam noise "
            f"sized so that {m.min_survivors} survivors carry Gaussian-equivalent multiplier "
            f"[bold]{m.noise_multiplier:g}[/bold]; sampling (q={m.sample_rate:g}) not credited, Skellam RDP in both "
            "columns"
        )
        console.print(table)
        return
    console.print(
        f"client level: each of {fed.num_clients} clients sampled with q={m.sample_rate:g} per round "
        f"(expected {m.expected_clients:g}, the fixed denominator); updates clipped to {dp.client_clip:g} "
        f"({dp.client_clipping}); server noise multiplier [bold]{m.noise_multiplier:g}[/bold]"
        + (f" (update {m.update_noise_multiplier:.4g}, count {m.count_noise_multiplier:g})" if m.adaptive else "")
        + f"; noise std on the mean update: {m.update_noise_multiplier * dp.client_clip / m.expected_clients:.3g}"
    )
    console.print(table)
    eps = {"rdp": 1, "prv": 2}[dp.accountant]
    if cap and rows[-1][eps] > cap:
        last = max((r[0] for r in rows if r[eps] <= cap), default=0)
        console.print(
            f"[yellow]dp.client_target_epsilon={cap:g} stops the run after round {last} of {fed.rounds}[/yellow]"
        )


def _update_size(cfg) -> int:
    """How many numbers one client's update holds (the adapter's sent tensors)."""
    from fed.session import adapted_model

    adapter, _ = adapted_model(cfg)
    return sum(t.numel() for t in adapter.sent_state().values())


def _plan_examples(cfg, args: argparse.Namespace, console: Console) -> int:
    """The example-level schedule: the noise each client calibrates and epsilon after each round."""
    from fed.privacy.planner import plan_schedule  # heavy imports (opacus) only once the config is valid

    n = args.examples
    if n <= 0:
        from fed.session import client_data

        with console.status("reading the data to size each client…"):
            try:
                n = min(len(client_data(cfg, pid).train) for pid in range(cfg.federation.num_clients))
            except ValueError as err:  # the data, or its split into clients, does not fit the config
                return error(console, err)
    participation = cfg.federation.fraction_train if args.participation is None else args.participation
    if not 0 < participation <= 1:
        return error(console, f"--participation={participation} must be in (0, 1]")
    t = cfg.train
    try:
        schedule = plan_schedule(
            cfg.dp,
            num_examples=n,
            batch_size=t.batch_size,
            local_steps=t.local_steps,
            rounds=cfg.federation.rounds,
            participation=participation,
        )
    except ValueError as err:  # a target epsilon no noise multiplier reaches at this sampling and step count
        return error(console, f"dp.target_epsilon={cfg.dp.target_epsilon:g}: {err}; raise it or lower the steps")
    table = Table(title=f"epsilon per round at delta {cfg.dp.delta:g} (participation {participation:g})")
    for column in ("round", "steps", "eps RDP", "eps PRV"):
        table.add_column(column, justify="right")
    for row in schedule.rows:
        table.add_row(str(row.round), str(row.steps), f"{row.epsilon_rdp:.3f}", f"{row.epsilon_prv:.3f}")
    goal = f"target epsilon {cfg.dp.target_epsilon:g}" if cfg.dp.target_epsilon else "fixed noise"
    console.print(
        f"client with n={n} examples, batch {t.batch_size} -> Poisson rate q={schedule.sample_rate:.4g}; "
        f"{goal} over {cfg.federation.rounds} rounds x {t.local_steps} steps "
        f"({cfg.dp.accountant.upper()}) -> noise multiplier [bold]{schedule.noise_multiplier:.4g}[/bold]"
        f" (noise std per coordinate of the mean gradient: "
        f"{schedule.noise_multiplier * cfg.dp.max_grad_norm / t.batch_size:.3g})"
    )
    console.print(table)
    for problem in schedule.delta_problems:
        error(console, problem)
    return 2 if schedule.delta_problems else 0


def _report(run_dir: str, console: Console) -> int:
    import json
    from pathlib import Path

    from fed.reports.privacy import cross_checked, summary, write_report

    path = Path(run_dir)
    if not (path / "privacy.json").is_file():
        return error(
            console, f"{path} holds no privacy.json; give a run directory made by fed simulate or a deployed run"
        )
    try:
        privacy = cross_checked(json.loads((path / "privacy.json").read_text()))
        out = write_report(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # not JSON, or not the book's shape
        return error(console, f"{path / 'privacy.json'} is not a run's privacy book ({type(err).__name__}: {err})")
    summary(privacy, console)
    console.print(f"report: [bold]{out}[/bold]")
    return 0


def _config(args: argparse.Namespace, console: Console) -> int:
    """``fed config``: the generated key reference, as a terminal table or as the text of a generated file."""
    from fed.config import reference

    if args.markdown or args.pyproject:
        print(reference.markdown() if args.markdown else reference.flower_block(), end="")
        return 0
    preset = args.preset or ("quickstart" if args.overrides else None)
    try:
        values = resolve(preset, args.overrides).to_flat() if preset else {}
    except ConfigError as err:
        return error(console, err)
    table = Table(title=f"config keys, with preset {preset}" if preset else "config keys")
    table.add_column("key", no_wrap=True)  # a folded key could not be copied into --set
    for column in ("default", *([preset] if preset else []), "accepts", "meaning"):
        table.add_column(column, overflow="fold")
    for key, default, accepted, meaning in reference.rows():
        shown = [reference.value_text(values[key])] if preset else []
        table.add_row(*(Text(cell) for cell in (key, default, *shown, accepted, meaning)))
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if args.command == "config":
        return _config(args, console)
    if args.command == "report":
        return _report(args.run_dir, Console())
    if args.command == "deploy":
        try:
            return deploy_cli.run_command(args, console)
        except (deploy_cli.DeployError, ConfigError) as err:
            return error(console, err)
    try:
        cfg = resolve(args.preset, args.overrides)
        if args.command == "plan":
            return _plan(cfg, args, Console())
    except ConfigError as err:  # also the data of the config, read by plan to size each client
        return error(console, err)
    from simulations.run import resume, simulate  # heavy imports (torch, flwr) only once the config is valid

    try:
        if args.resume:
            run_dir = resume(args.resume, console=console, verbose=args.verbose)
        else:
            run_dir = simulate(cfg, args.out, name=args.name, console=console, verbose=args.verbose)
    except ConfigError as err:  # the data or model does not fit this config, or nothing to resume
        return error(console, err)
    console.print(_summary(run_dir.metrics(), run_dir.config().dp.example_level))
    _report(str(run_dir.path), console)
    console.print(f"run directory: [bold]{run_dir.path}[/bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
