"""``fed deploy ...``: the command-line face of :mod:`deploy.launcher` (see docs/deployment.md).

``keys`` / ``superlink`` / ``register`` / ``supernode`` / ``run`` are the steps of a deployment across
machines; ``local`` does all of them on this machine's loopback and tears everything down afterwards.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from rich.console import Console

from deploy import launcher as deploy
from deploy.pki import make_pki
from deploy.resident import ResidentError, check_flower
from fed.config.sources import resolve


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("deployment"), help="deployment folder (default: deployment)")


def _insecure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (debugging on a trusted loopback only)",
    )


def _mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--per-message",
        action="store_true",
        help="start a fresh flwr-clientapp process for every message (Flower's own way) instead of the node's "
        "resident ClientApp process, which keeps its imports and the run's model between messages",
    )


def _config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quickstart", help="shipped preset or a path to a .toml file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable); a node-data run needs data.labels",
    )
    parser.add_argument("--name", default="run", help="run directory name under <dir>/runs (default: run)")


def _policy(parser: argparse.ArgumentParser) -> None:
    """The node's own privacy policy (docs/privacy.md): without any of these a node runs under the strict
    default (DP required, epsilon <= 8, delta <= 1e-5, no evaluation replies under DP)."""
    group = parser.add_argument_group("the node's privacy policy (default: strict)")
    group.add_argument("--policy", metavar="FILE", help="TOML policy file (keys as below, e.g. max-epsilon = 4)")
    group.add_argument("--max-epsilon", type=float, help="largest epsilon the node spends on its data")
    group.add_argument("--delta", type=float, help="largest delta the node accepts")
    group.add_argument("--min-noise", type=float, help="least fixed noise multiplier the node accepts")
    group.add_argument("--max-clip", type=float, help="largest clipping bound (dp.max_grad_norm) the node accepts")
    group.add_argument(
        "--allow-evaluation",
        action="store_true",
        help="answer evaluate messages under DP (scores on all held-out rows, not covered by DP)",
    )
    group.add_argument(
        "--reply-delay", type=float, help="grid in seconds for DP replies (default 30; 0: at once, timing visible)"
    )
    group.add_argument(
        "--require-secure-aggregation",
        action="store_true",
        help="train only in rounds that run through SecAgg+ (the server never sees this node's update alone)",
    )
    group.add_argument(
        "--dp-opt-out",
        action="store_true",
        help="accept rounds without DP and any DP settings (logged by the node; never for private data)",
    )


POLICY_FLAGS = {
    "policy": "policy-file",
    "max_epsilon": "max-epsilon",
    "delta": "delta",
    "min_noise": "min-noise-multiplier",
    "max_clip": "max-grad-norm",
    "reply_delay": "reply-delay",
}


def policy_config(args: argparse.Namespace) -> dict[str, str | float]:
    """The node config keys of the policy flags that were given."""
    pairs: dict[str, str | float] = {
        key: getattr(args, flag) for flag, key in POLICY_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.policy:
        pairs["policy-file"] = str(Path(args.policy).resolve())
    if args.allow_evaluation:
        pairs["evaluate"] = "true"
    if args.require_secure_aggregation:
        pairs["require-secure-aggregation"] = "true"
    if args.dp_opt_out:
        pairs["dp-opt-out"] = "true"
    return pairs


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``fed deploy`` and its subcommands on the ``fed`` parser."""
    sub = commands.add_parser("deploy", help="run on Flower's deployment engine (SuperLink + SuperNodes)")
    steps = sub.add_subparsers(dest="step", required=True)
    keys = steps.add_parser("keys", help="private CA, SuperLink certificate (SAN) and one key pair per node")
    _common(keys)
    keys.add_argument("--nodes", type=int, required=True, help="number of SuperNode key pairs")
    keys.add_argument(
        "--host",
        action="append",
        default=[],
        help="SuperLink name or IP for the certificate's SAN (repeatable; default 127.0.0.1 and localhost)",
    )
    link = steps.add_parser("superlink", help="start the SuperLink in the foreground")
    _common(link)
    _insecure(link)
    link.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    link.add_argument("--port", type=int, default=9093)
    link.add_argument("--address", default="", help="host:port the operator's flwr CLI dials (default host:port)")
    reg = steps.add_parser("register", help="register every node's public key with the running SuperLink")
    _common(reg)
    node = steps.add_parser("supernode", help="start one SuperNode in the foreground, on its own data")
    _common(node)
    _insecure(node)
    node.add_argument("--node", type=int, required=True, help="the node's index (its key and partition-id)")
    node.add_argument("--superlink", required=True, help="SuperLink address host:port")
    node.add_argument("--data", required=True, help="this node's data file (.csv, .json, .jsonl, .parquet)")
    node.add_argument("--port", type=int, default=9094, help="the node's local runtime port (default 9094)")
    node.add_argument("--nodes", type=int, default=0, help="federation size, for partition-style runs")
    _mode(node)
    node.add_argument(
        "--fresh-start",
        action="store_true",
        help="confirm that this node starts with no privacy history (its state was never used, or is lost)",
    )
    _policy(node)
    run = steps.add_parser("run", help="launch a run on the SuperLink (flwr run) and stream its log")
    _common(run)
    _config(run)
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue <dir>/runs/<name> from its last checkpoint (with the config it started with)",
    )
    local = steps.add_parser("local", help="keys, SuperLink, one SuperNode per --data file, the run, teardown")
    _common(local)
    _config(local)
    _insecure(local)
    local.add_argument("--data", action="append", required=True, help="a node's data file (repeat per node)")
    _mode(local)
    _policy(local)


class DeployError(Exception):
    """A deployment folder that cannot serve the step asked for; ``fed`` prints it as one ``error:`` line."""


def _require_setup(layout: deploy.Layout, args: argparse.Namespace) -> None:
    """Stop a step that needs the keys (or, for ``run``, the SuperLink connection) of a folder without them."""
    secure = not getattr(args, "insecure", False)
    if args.step in ("superlink", "register", "supernode") and secure and not layout.pki.ca.is_file():
        raise DeployError(
            f"--dir {layout.root} holds no keys ({layout.pki.ca} is missing); "
            f"create them first with: fed deploy keys --dir {layout.root} --nodes N"
        )
    if args.step == "run" and not (layout.flwr_home / "config.toml").is_file():
        raise DeployError(
            f"--dir {layout.root} holds no SuperLink connection ({layout.flwr_home / 'config.toml'} is missing); "
            f"start one first with: fed deploy superlink --dir {layout.root}"
        )


def _exec(console: Console, cmd: list[str], environ: dict[str, str]) -> int:
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    os.execvpe(cmd[0], cmd, environ)
    return 0  # not reached


def run_command(args: argparse.Namespace, console: Console) -> int:
    """Carry out one ``fed deploy`` step; returns the exit status (a folder without keys: DeployError)."""
    layout = deploy.Layout(args.dir.resolve())
    _require_setup(layout, args)
    if getattr(args, "insecure", False):
        console.print(f"[bold red]warning:[/bold red] {deploy.INSECURE_WARNING}")
    if getattr(args, "dp_opt_out", False):
        console.print("[bold red]warning:[/bold red] --dp-opt-out: the node accepts rounds without DP")
    if args.step == "keys":
        pki = make_pki(layout.pki.root, args.host or ["127.0.0.1", "localhost"], args.nodes)
        console.print(f"CA {pki.ca}, SuperLink certificate {pki.server_cert}, node keys in {pki.root / 'nodes'}")
        return 0
    if args.step == "superlink":
        ca = None if args.insecure else layout.pki.ca
        deploy.write_connection(layout.flwr_home, args.address or f"{args.host}:{args.port}", ca)
        cmd = deploy.superlink_command(layout, args.host, args.port, insecure=args.insecure)
        return _exec(console, cmd, deploy.env(layout.flwr_home))
    if args.step == "register":
        for index in layout.pki.nodes():
            deploy.register(layout, layout.pki.node_public(index), deploy.env(layout.flwr_home))
            console.print(f"registered node {index}")
        return 0
    if args.step == "supernode":
        state = layout.node_dir(args.node)
        state.mkdir(parents=True, exist_ok=True)
        policy = policy_config(args) | ({"fresh-start": "true"} if args.fresh_start else {})
        config = deploy.node_config(args.node, args.data, state, args.nodes or args.node + 1, policy)
        cmd = deploy.supernode_command(layout, args.node, args.superlink, args.port, config, insecure=args.insecure)
        try:
            environ = deploy.node_env(state, resident=not args.per_message)
        except ResidentError as err:
            raise DeployError(str(err)) from None
        return _exec(console, cmd, environ)
    cfg = resolve(args.preset, args.overrides)
    if args.step == "run":
        with deploy.Cluster(layout) as cluster:  # only to launch and wait; the SuperLink runs elsewhere
            run_dir = cluster.run(
                cfg, args.name, timeout=cfg.federation.round_timeout * cfg.federation.rounds * 2, resume=args.resume
            )
    else:
        if not args.per_message:
            try:
                check_flower()
            except ResidentError as err:
                raise DeployError(str(err)) from None
        run_dir = deploy.deploy_local(
            cfg,
            args.data,
            layout.root,
            insecure=args.insecure,
            name=args.name,
            policy=policy_config(args),
            resident=not args.per_message,
        )
    console.print(f"run directory: [bold]{run_dir}[/bold]")
    return 0
