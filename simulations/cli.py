"""The ``fed`` command: ``fed simulate --preset NAME [--set key=value ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from fed.config import ConfigError, preset_names, resolve
from simulations import deploy_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed", description="Federated adapter fine-tuning under DP-SGD.")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a local multi-client simulation")
    sim.add_argument("--preset", default="quickstart",
                     help=f"shipped preset ({', '.join(preset_names())}) or a path to a .toml file")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set adapter.kind=ffa-lora (repeatable)")
    sim.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    sim.add_argument("--name", default="", help="run directory name (default: time and adapter)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last completed round "
                     "(with its own config; --preset and --set are ignored)")
    deploy_cli.add_commands(commands)
    return parser


COLUMNS = {"round": "round", "train_loss": "train loss", "eval_loss": "eval loss", "eval_accuracy": "acc",
           "epsilon_max": "eps", "bytes_up": "up MB", "bytes_down": "down MB", "wall_s": "s"}


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key.startswith("bytes"):
        return f"{value / 1e6:.2f}"  # type: ignore[operator]
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _summary(lines: list[dict]) -> Table:
    table = Table(title="rounds")
    for label in COLUMNS.values():
        table.add_column(label, justify="right", no_wrap=True)
    for line in lines:
        table.add_row(*(_cell(key, line.get(key)) for key in COLUMNS))
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if args.command == "deploy":
        return deploy_cli.run_command(args, console)
    try:
        cfg = resolve(args.preset, args.overrides)
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    from simulations.run import resume, simulate  # heavy imports (torch, flwr) only once the config is valid

    try:
        if args.resume:
            run_dir = resume(args.resume, console=console, verbose=args.verbose)
        else:
            run_dir = simulate(cfg, args.out, name=args.name, console=console, verbose=args.verbose)
    except ConfigError as err:  # the data or model does not fit this config, or nothing to resume
        console.print(f"[red]error:[/red] {err}")
        return 2
    console.print(_summary(run_dir.metrics()))
    console.print(f"run directory: [bold]{run_dir.path}[/bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
