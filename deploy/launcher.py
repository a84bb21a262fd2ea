"""``fed deploy``: run fedlora on Flower's deployment engine (a SuperLink and SuperNodes over HTTPS).

One deployment folder holds everything: ``keys/`` (private CA, SuperLink certificate, a key pair per
node), ``flwr-home/`` (the operator's ``flwr`` CLI config), ``nodes/node-I/`` (each node's state
directory: its privacy ledger, its Flower home) and ``logs/``. The commands are Flower's own
(``flower-superlink``, ``flower-supernode``, ``flwr supernode register``, ``flwr run``); this module
only writes their inputs and, for ``fed deploy local``, starts and stops them on one machine.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from deploy.pki import Pki
from deploy.resident import RESIDENT_ENV, check_flower, install_shim
from fed.config import RunConfig

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml's [tool.flwr.app]
CONNECTION = "fedlora"
INSECURE_WARNING = (
    "INSECURE deployment: traffic is not encrypted and any process can join as a node. "
    "Use it only on a trusted loopback for debugging."
)
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # how often the SuperExec asks its node for a task (Flower's default: every second), in both modes: a wait
    # that every message would otherwise pay before its ClientApp even starts
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


@dataclass(frozen=True)
class Layout:
    """Where a deployment's files live."""

    root: Path

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "keys")

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def node_dir(self, node: int) -> Path:
        return self.root / "nodes" / f"node-{node}"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every Flower process of the deployment runs with (offline, quiet, its own home).

    Its PATH starts with this interpreter's scripts folder: Flower's commands (and the ``flwr-clientapp``
    processes a SuperNode starts by name) are installed beside the Python that runs fedlora, which a shell's
    PATH may lack (``<venv>/bin/fed deploy local`` from a shell that never activated the venv)."""
    environ = {**(base if base is not None else os.environ), **QUIET_ENV, "FLWR_HOME": str(flwr_home)}
    scripts = str(Path(sys.executable).parent)
    environ["PATH"] = os.pathsep.join([scripts, *(d for d in environ.get("PATH", "").split(os.pathsep) if d)])
    return environ


def node_env(state: Path, *, resident: bool) -> dict[str, str]:
    """A SuperNode's environment: its own Flower home under its state directory; in resident mode (the
    default, ``deploy.resident``) its PATH starts with the ``flwr-clientapp`` shim that hands each task to the
    node's resident ClientApp process. ResidentError when this Flower release was never tested resident."""
    environ = env(state / "flwr-home")
    if not resident:
        return environ
    check_flower()
    shim = install_shim(state / "bin")
    environ["PATH"] = os.pathsep.join([str(shim.parent), environ["PATH"]])
    environ[RESIDENT_ENV] = str((state / "resident").resolve())
    return environ


def write_connection(flwr_home: Path, address: str, ca: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection named ``fedlora`` (TLS unless ``ca`` is None)."""
    table: dict[str, Any] = {"address": address}
    table |= {"root-certificates": str(ca.resolve())} if ca is not None else {"insecure": True}
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: table}}))
    return path


def superlink_command(layout: Layout, host: str, port: int, *, insecure: bool) -> list[str]:
    """``flower-superlink`` with TLS from the deployment's keys and node authentication, or ``--insecure``."""
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if insecure:
        return [*cmd, "--insecure"]
    pki = layout.pki
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(pki.ca),
        "--ssl-certfile",
        str(pki.server_cert),
        "--ssl-keyfile",
        str(pki.server_key),
        "--enable-supernode-auth",
    ]


def node_config(
    node: int, data_path: str | None, state_dir: Path, num_nodes: int, policy: Mapping[str, str | float] = {}
) -> str:
    """The ``--node-config`` string: the node's id, its state directory, its own data file (if any) and its
    privacy policy (``fed.privacy.policy`` keys, ``policy-file``, ``dp-opt-out``, ``fresh-start``)."""
    pairs: dict[str, str | float] = {
        "partition-id": node,
        "num-partitions": num_nodes,
        "state-dir": str(state_dir.resolve()),
    }
    if data_path:
        pairs["data-path"] = str(Path(data_path).resolve())
    pairs |= policy
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in pairs.items())


def supernode_command(
    layout: Layout, node: int, superlink: str, port: int, config: str, *, insecure: bool, key: Path | None = None
) -> list[str]:
    """``flower-supernode`` for ``node``: its own runtime port, node config and (with TLS) its key."""
    cmd = ["flower-supernode", "--superlink", superlink, "--port", str(port), "--node-config", config]
    if insecure:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--root-certificates",
        str(layout.pki.ca),
        "--auth-supernode-private-key",
        str(key or layout.pki.node_key(node)),
    ]


def run_config_file(cfg: RunConfig, out: Path, name: str, path: Path, resume: Path | None = None) -> Path:
    """The resolved config as a ``flwr run --run-config`` TOML file: every key explicit, lists as
    comma-separated strings (Flower's run-config holds scalars only). With ``resume`` the server continues
    that run directory with the config it started with."""
    flat: dict[str, Any] = {k: ",".join(v) if isinstance(v, list) else v for k, v in cfg.to_flat().items()}
    nested: dict[str, Any] = {
        "out": str(out.resolve()),
        "name": name,
        "resume": str(resume.resolve()) if resume is not None else "",
    }
    for key, value in flat.items():
        section, _, leaf = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[leaf] = value
    path.write_text(tomli_w.dumps(nested))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(host: str, port: int, ca: Path | None, timeout: float = 60.0) -> None:
    """Block until the SuperLink answers ``/health`` (over HTTPS checked against ``ca`` unless insecure)."""
    url = f"{'http' if ca is None else 'https'}://{host}:{port}/health"
    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperLink at {url} not healthy after {timeout:.0f}s: {err}") from err
        time.sleep(0.3)


def register(layout: Layout, public_key: Path, environ: Mapping[str, str]) -> None:
    """``flwr supernode register``: the SuperLink admits a node only after its public key is registered."""
    done = subprocess.run(
        ["flwr", "supernode", "register", str(public_key), CONNECTION],
        env=dict(environ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=layout.root,
    )
    if done.returncode != 0:
        raise RuntimeError(f"registering {public_key} failed (exit {done.returncode}): {done.stdout}{done.stderr}")


@dataclass
class Processes:
    """Flower processes started by this module, each in its own process group so that stopping one
    also stops the ``flwr-serverapp`` / ``flwr-clientapp`` children it spawned."""

    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(
        self, name: str, cmd: Sequence[str], environ: Mapping[str, str], log_file: Path, cwd: Path | None = None
    ) -> subprocess.Popen:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as handle:
            proc = subprocess.Popen(
                list(cmd), env=dict(environ), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
            )
        self.started[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        proc = self.started.pop(name, None)
        if proc is None:
            return
        for signum in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


@dataclass
class Cluster:
    """A SuperLink and its SuperNodes on this machine (loopback), stopped on exit: ``fed deploy local``
    and the real-process tests. On several machines, run the same commands there (docs/deployment.md)."""

    layout: Layout
    insecure: bool = False
    resident: bool = True  # the nodes' ClientApp runtime: resident (deploy.resident) or a process per message
    host: str = "127.0.0.1"
    port: int = 0
    procs: Processes = field(default_factory=Processes)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop_all()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca(self) -> Path | None:
        return None if self.insecure else self.layout.pki.ca

    @property
    def cli_env(self) -> dict[str, str]:
        return env(self.layout.flwr_home)

    def start_superlink(self) -> None:
        if self.insecure:
            log.warning(INSECURE_WARNING)
        elif not self.layout.pki.ca.is_file():
            raise FileNotFoundError(
                f"no CA in {self.layout.pki.root}; run `fed deploy keys` first (or ask for --insecure)"
            )
        self.port = self.port or free_port()
        write_connection(self.layout.flwr_home, self.address, self.ca)
        self.procs.start(
            "superlink",
            superlink_command(self.layout, self.host, self.port, insecure=self.insecure),
            self.cli_env,
            self.layout.log("superlink"),
            cwd=self.layout.root,
        )
        wait_healthy(self.host, self.port, self.ca)

    def register(self, node: int) -> None:
        if not self.insecure:
            register(self.layout, self.layout.pki.node_public(node), self.cli_env)

    def start_node(
        self,
        node: int,
        data_path: str | None,
        num_nodes: int,
        key: Path | None = None,
        name: str = "",
        policy: Mapping[str, str | float] = {},
    ) -> subprocess.Popen:
        """Start SuperNode ``node`` on its own data file, with its own state directory, Flower home and
        ``policy``. A state directory this call creates is a fresh start the launcher confirms for the node."""
        state = self.layout.node_dir(node)
        fresh = {"fresh-start": "true"} if not state.exists() else {}
        state.mkdir(parents=True, exist_ok=True)
        cmd = supernode_command(
            self.layout,
            node,
            self.address,
            free_port(),
            node_config(node, data_path, state, num_nodes, {**policy, **fresh}),
            insecure=self.insecure,
            key=key,
        )
        name = name or f"node-{node}"
        return self.procs.start(name, cmd, node_env(state, resident=self.resident), self.layout.log(name), cwd=state)

    def launch(self, cfg: RunConfig, name: str, resume: bool = False) -> subprocess.Popen:
        """``flwr run <app> fedlora --stream`` with the resolved config; the run directory is runs/<name>
        (continued from its last checkpoint with ``resume``)."""
        runs = self.layout.root / "runs"
        config = run_config_file(
            cfg, runs, name, self.layout.root / f"{name}.run-config.toml", resume=runs / name if resume else None
        )
        return self.procs.start(
            "flwr-run",
            ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(config)],
            self.cli_env,
            self.layout.log(f"flwr-run-{name}"),
        )

    def run(self, cfg: RunConfig, name: str, timeout: float, resume: bool = False) -> Path:
        """Launch and wait; the finished run directory, or RuntimeError pointing at the logs."""
        proc = self.launch(cfg, name, resume)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.procs.stop("flwr-run")
        run_dir = self.layout.root / "runs" / name
        if not (run_dir / "adapter" / "fedlora.json").is_file():
            raise RuntimeError(f"the run did not finish (flwr run exit {code}); logs in {self.layout.root / 'logs'}")
        return run_dir


def deploy_local(
    cfg: RunConfig,
    data_paths: Sequence[str],
    root: Path,
    *,
    insecure: bool = False,
    name: str = "run",
    timeout: float = 3600.0,
    policy: Mapping[str, str | float] = {},
    resident: bool = True,
) -> Path:
    """Keys, a SuperLink, one SuperNode per data file (each registered, each under ``policy``, each with a
    resident ClientApp process unless ``resident`` is False), the run, and teardown."""
    from deploy.pki import make_pki

    layout = Layout(Path(root))
    cfg = cfg.with_overrides({"federation.num_clients": len(data_paths)})
    if not insecure:
        make_pki(layout.pki.root, ["127.0.0.1", "localhost"], len(data_paths))
    with Cluster(layout, insecure=insecure, resident=resident) as cluster:
        cluster.start_superlink()
        for node, path in enumerate(data_paths):
            cluster.register(node)
            cluster.start_node(node, path, len(data_paths), policy=policy)
        return cluster.run(cfg, name, timeout)
