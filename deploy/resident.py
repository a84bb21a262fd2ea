"""A resident ClientApp runtime for one SuperNode: one long-lived process serves every message of every run.

Flower 1.42 starts a fresh ``flwr-clientapp --token <token>`` for every message (through ``flower-superexec``),
so each message pays the imports and the model build again. In resident mode the node's PATH starts with a
folder holding a ``flwr-clientapp`` *shim* (:func:`install_shim`); Flower's SuperExec launches it by name
exactly as it would launch the real command. The shim (standard library only, so it starts in milliseconds)
hands the arguments over a Unix socket to the node's *resident* process (:func:`serve`), starting that process
first if none answers. The resident then does what ``flwr-clientapp --token`` does, with Flower's own functions
over Flower's own Runtime API (no transport of ours): pull the task (``pull_task_input``), run the ClientApp,
push the reply (``push_message``) and the task's end (``push_task_output``), with the task's heartbeat running.

What stays loaded: the third-party imports (torch, transformers, Opacus, ...) for the process's life; the
app's own modules and every cache they hold (the model, its adapter, the data) for one run of one FAB only.
When a task of another run (or another FAB) arrives, the previous project's modules are dropped from
``sys.modules`` and collected, so the next run imports the app afresh and builds its model again: nothing a
run trained or read reaches another run's reply. The node's ledger, policy and split are read from its
state directory by the app for every message, as in per-message mode.

Faults: a resident killed mid-task costs that message (Flower's heartbeat lapses and the SuperNode sends an
error reply); the next message's shim finds no resident and starts one. A resident that does not acknowledge
a request within :data:`ACK_TIMEOUT` (stopped, wedged) is killed and replaced. A task running longer than the
run's round timeout (``federation.round_timeout``: the server has closed that round by then) is ended with an
error reply, and the process exits so that the next message gets a clean one.

Tested with Flower 1.42.0 only (:data:`TESTED_FLOWER`): the shim depends on ``flwr-clientapp``'s arguments and
on the SuperExec launching it by name, the resident on ``flwr.supernode.runtime.run_clientapp``'s helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

TESTED_FLOWER = ("1.42.0",)
"""Flower releases the resident runtime was tested against; any other refuses to start resident mode."""
RESIDENT_ENV = "FEDLORA_RESIDENT_DIR"
"""The node's resident folder (socket, pid file, lock), set in the SuperNode's environment by the launcher."""
SHIM = "flwr-clientapp"
PULL_TIMEOUT = 60.0
"""Seconds a task's input (or its end) may take to go through Flower's Runtime API before the task is given up."""
SOCKET_PATH_MAX = 100
"""Longest Unix socket path used as it is (Linux's sun_path holds 108 bytes, macOS's 104, each with its NUL)."""
ACK_TIMEOUT = 60.0
"""Seconds a shim waits for the resident to acknowledge a request before replacing it (a stopped or wedged
process); generous, because the resident's acceptor answers at once even while a task trains or the process
imports its modules on a loaded machine, and a false alarm would cost that import again."""
START_TIMEOUT = 300.0
"""Seconds a shim waits for a resident it started to listen."""
WARM_IMPORTS = ("torch", "transformers", "opacus", "datasets", "peft", "flwr.clientapp")
"""Third-party modules the resident imports once at start, before its first task."""
ROUND_TIMEOUT_KEY = "federation.round_timeout"
EXIT_HUNG = 75
EXIT_RESIDENT_LOST = 76
FLAGS = {"--runtime-api-address": True, "--token": True, "--root-certificates": True, "--parent-pid": True}
SWITCHES = {"--insecure"}
DEPENDENCY_INSTALL = "--allow-runtime-dependency-installation"
REQUEST_FIELDS = {"address", "token", "insecure", "root_certificates", "parent_pid"}
REQUEST_FIELDS = {"address", "token", "insecure", "root_certificates", "parent_pid"}


class ResidentError(RuntimeError):
    """Resident mode cannot run here (another Flower release, a malformed request)."""


def check_flower() -> str:
    """The installed Flower version, or ResidentError when resident mode was never tested against it."""
    version = metadata.version("flwr")
    if version not in TESTED_FLOWER:
        raise ResidentError(
            f"resident ClientApp mode is tested with flwr {', '.join(TESTED_FLOWER)} only; this environment has "
            f"flwr {version}. Install flwr=={TESTED_FLOWER[-1]} or start the node in per-message mode (--per-message)."
        )
    return version


# ---------------------------------------------------------------- the shim: standard library only, starts fast


def install_shim(bin_dir: Path) -> Path:
    """Write ``bin_dir/flwr-clientapp``: put ``bin_dir`` first on the SuperNode's PATH and the SuperExec runs it.

    The shim runs this module from the folder it was written from, with the interpreter that wrote it, so a
    node always talks to the resident of the fedlora it was started with."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / SHIM
    root = Path(__file__).resolve().parents[1]
    path.write_text(
        f"#!{sys.executable}\n"
        "# fedlora resident mode: hand this task to the node's resident ClientApp process (deploy/resident.py)\n"
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from deploy.resident import shim\n"
        "sys.exit(shim(sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Request:
    """What ``flwr-clientapp`` was asked to do: the arguments Flower's SubprocessExecutor passes (1.42)."""

    address: str
    token: str
    insecure: bool = False
    root_certificates: str | None = None
    parent_pid: int | None = None

    @classmethod
    def parse(cls, argv: Sequence[str]) -> Request:
        """The request from ``flwr-clientapp``'s arguments; ResidentError names an argument it does not know."""
        values: dict[str, str] = {}
        switches: set[str] = set()
        rest = list(argv)
        while rest:
            flag = rest.pop(0)
            if flag in SWITCHES:
                switches.add(flag)
            elif flag in FLAGS and rest:
                values[flag] = rest.pop(0)
            else:
                raise ResidentError(f"flwr-clientapp argument {flag!r} is not one resident mode serves")
        if "--token" not in values or "--runtime-api-address" not in values:
            raise ResidentError(f"flwr-clientapp needs --token and --runtime-api-address, got {list(argv)}")
        pid = values.get("--parent-pid")
        return cls(
            address=values["--runtime-api-address"],
            token=values["--token"],
            insecure="--insecure" in switches,
            root_certificates=values.get("--root-certificates"),
            parent_pid=int(pid) if pid is not None else None,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Request:
        """Validated both ways: only the five fields, each of its type."""
        data = json.loads(line)
        if not isinstance(data, dict) or set(data) != REQUEST_FIELDS:
            raise ResidentError(f"a request must hold exactly {sorted(REQUEST_FIELDS)}, got {data!r:.200}")
        ok = (
            isinstance(data["address"], str)
            and isinstance(data["token"], str)
            and isinstance(data["insecure"], bool)
            and isinstance(data["root_certificates"], str | None)
            and (data["parent_pid"] is None or type(data["parent_pid"]) is int)
        )
        if not ok or not data["token"] or not data["address"]:
            raise ResidentError("a request's fields have the wrong types or are empty")
        return cls(**data)


@dataclass(frozen=True)
class Home:
    """The resident's folder: its socket, its pid file and the shims' lock."""

    root: Path

    @property
    def socket(self) -> Path:
        """In the resident's folder, unless that path is longer than a Unix socket address may be (about 100
        bytes): then in a folder of this user's only (0700), named after the resident's folder."""
        path = self.root / "resident.sock"
        if len(os.fsencode(path)) < SOCKET_PATH_MAX:
            return path
        private = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"fedlora-{os.getuid()}"
        private.mkdir(mode=0o700, exist_ok=True)
        if private.stat().st_uid != os.getuid() or private.stat().st_mode & 0o077:
            raise ResidentError(f"{private} must belong to this user alone (mode 0700) to hold the resident's socket")
        short = private / f"{hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:24]}.sock"
        if len(os.fsencode(short)) >= SOCKET_PATH_MAX:
            raise ResidentError(f"no socket path short enough for {self.root}: set XDG_RUNTIME_DIR to a short folder")
        return short

    @property
    def pid(self) -> Path:
        return self.root / "resident.pid"

    @property
    def lock(self) -> Path:
        return self.root / "resident.lock"


def _real_clientapp() -> str:
    """Flower's own ``flwr-clientapp`` beside this interpreter (the fallback)."""
    return str(Path(sys.executable).parent / SHIM)


def shim(argv: Sequence[str]) -> int:
    """``flwr-clientapp`` in resident mode: hand the task to the resident and return its exit status.

    Without a resident folder in the environment, or asked to install dependencies at run time (which a shared
    process cannot do), it becomes Flower's own ``flwr-clientapp``."""
    home = os.environ.get(RESIDENT_ENV)
    if not home or DEPENDENCY_INSTALL in argv:
        os.execv(_real_clientapp(), [_real_clientapp(), *argv])
    request = Request.parse(argv)
    conn = _handed_over(Home(Path(home)), request)
    with conn, conn.makefile("r") as replies:
        line = replies.readline()  # the task's end: the resident bounds it by the round timeout
    if not line:
        print(f"{SHIM} shim: the resident process ended during the task", file=sys.stderr, flush=True)
        return EXIT_RESIDENT_LOST
    status = json.loads(line).get("exit")
    return status if type(status) is int else EXIT_RESIDENT_LOST


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _handed_over(home: Home, request: Request) -> socket.socket:
    """A connection whose resident acknowledged ``request``: the running one, else a new one (started here;
    a resident that does not acknowledge in time is killed first)."""
    with _locked(home.lock):
        for _ in range(2):
            conn = _connect(home.socket)
            if conn is None:
                _start(home, request.parent_pid)
                conn = _connect(home.socket, wait=START_TIMEOUT)
            if conn is not None and _acknowledged(conn, request):
                return conn
            if conn is not None:
                conn.close()
            print(
                f"{SHIM} shim: the resident in {home.root} did not acknowledge within {ACK_TIMEOUT:g} s; replacing it",
                file=sys.stderr,
                flush=True,
            )
            _kill(home)
        raise ResidentError(f"no resident process in {home.root} acknowledged the task")


def _connect(path: Path, wait: float = 0.0) -> socket.socket | None:
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except OSError as err:
            conn.close()
            if err.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                return None
        time.sleep(0.05)


def _acknowledged(conn: socket.socket, request: Request) -> bool:
    conn.settimeout(ACK_TIMEOUT)
    try:
        conn.sendall((request.to_json() + "\n").encode())
        ack = conn.recv(4)
    except OSError:
        return False
    conn.settimeout(None)
    return ack == b"ack\n"


def _start(home: Home, parent_pid: int | None) -> None:
    """Start a resident in this process group (the SuperNode's: stopping the node stops it too), watching the
    SuperExec that launched this shim so that it ends with the node."""
    root = str(Path(__file__).resolve().parents[1])
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "deploy.resident", "--dir", str(home.root)]
    if parent_pid is not None:
        cmd += ["--watch-pid", str(parent_pid)]
    subprocess.Popen(cmd, env=environ, stdin=subprocess.DEVNULL, close_fds=True)


def _kill(home: Home) -> None:
    """Kill the resident named in the pid file (it did not acknowledge) and forget its socket."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(home.pid.read_text()), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        home.socket.unlink()


# ---------------------------------------------------------------- the resident process


def serve(home: Home, watch_pid: int | None = None) -> None:
    """Listen on the node's socket and run its tasks one at a time, for as long as the node lives."""
    from queue import Queue

    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor

    version = check_flower()
    if watch_pid is not None:
        start_parent_process_monitor(watch_pid)
    # What the acceptor needs loads before the socket exists: a shim that finds the socket gets its ack at once
    # (a slow one means a wedged resident, which it replaces), while one that started this process waits for
    # the socket to appear; the task's heartbeat then starts as soon as the request arrives.
    import flwr.supercore.heartbeat
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    home.root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        home.socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home.socket))
    home.socket.chmod(0o600)  # only the node's own user may hand it tasks
    listener.listen(8)
    home.pid.write_text(str(os.getpid()))
    tasks: Queue[Task] = Queue()
    threading.Thread(target=_accept, args=(listener, tasks), daemon=True).start()
    started = time.perf_counter()
    for name in WARM_IMPORTS:
        with contextlib.suppress(ImportError):
            __import__(name)
    log(
        20,
        "resident ClientApp process %d ready (flwr %s, imports %.2f s)",
        os.getpid(),
        version,
        time.perf_counter() - started,
    )
    runtime = Runtime()
    while True:
        task = tasks.get()
        code = runtime.run(task)
        with contextlib.suppress(OSError):
            task.conn.sendall((json.dumps({"exit": code}) + "\n").encode())
        task.conn.close()


@dataclass
class Task:
    """A request accepted from a shim: its connection, and Flower's Runtime API client for its token with the
    task's heartbeat already running (a claimed task whose heartbeat lapses is handed to another process)."""

    conn: socket.socket
    request: Request
    client: Any
    heartbeat: Any

    def close(self) -> None:
        if self.heartbeat.is_running:
            self.heartbeat.stop()
        self.client.close()


def _accept(listener: socket.socket, tasks: Any) -> None:
    """Acknowledge each request as soon as it is read (the shim's liveness check: nothing before it may wait on
    the network or on a busy interpreter), start its heartbeat (the worker may be importing or busy with the
    task before it) and queue it for the worker."""
    from flwr.supercore.heartbeat import HeartbeatSender

    while True:
        conn, _ = listener.accept()
        try:
            with conn.makefile("r") as lines:
                request = Request.from_json(lines.readline())
            conn.sendall(b"ack\n")
        except (OSError, ValueError, ResidentError):
            conn.close()
            continue
        client = _client(request)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        tasks.put(Task(conn, request, client, heartbeat))


def _within(seconds: float, call: Any, *args: Any) -> Any:
    """``call(*args)``, or ResidentError when it has not returned within ``seconds`` (it is left to finish or
    fail in its own daemon thread, which holds only its task's client)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as err:  # handed to the caller as it is
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ResidentError(f"{getattr(call, '__name__', call)} did not return within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class Runtime:
    """Runs tasks as ``flwr.supernode.runtime.run_clientapp.run_clientapp`` does, in this process, keeping the
    loaded app (and so its caches) for the tasks of one run of one FAB."""

    def __init__(self) -> None:
        self.scope: tuple[int, str] | None = None  # (run id, FAB hash) whose modules are loaded
        self.project: Path | None = None

    def run(self, task: Task) -> int:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = task.client
        message = context = reply = None
        status, details, code = SubStatus.FAILED, "ClientApp task failed due to unknown reason", 1
        watchdog: threading.Timer | None = None
        try:
            # A task whose message never arrived (Flower 1.42's SuperNode keeps the task of a message it ignored
            # because its run had stopped) would hold this process for ever: bounded, the next task runs.
            message, context, run, fab = _within(PULL_TIMEOUT, pull_task_input, client)
            log(20, "resident: task of run %s (%s)", run.run_id, message.metadata.message_type)
            project = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
            if self._enter((run.run_id, fab.hash_str), project):  # a new run: install its FAB as Flower does
                install_from_fab(fab.content, skip_prompt=True)
            watchdog = _watchdog(context.run_config.get(ROUND_TIMEOUT_KEY), client, message, context)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str
            )
            reply = app(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
        except Exception as ex:  # as run_clientapp: the error travels to the server as an error reply
            error = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else None
            reason = (
                "An exception was raised when attempting to load `ClientApp`"
                if error is not None
                else f"{type(ex)}:<'{ex}'>"
            )
            log(40, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(
                    Error(code=error or ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
                )
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception as ex:  # as run_clientapp: the task's end is pushed regardless
                    log(40, "Failed to push reply message", exc_info=ex)
                    code = 1
            try:
                _within(PULL_TIMEOUT, push_task_output, client, context, status, details)
            except ResidentError as err:
                log(40, "%s", err)
            task.close()
        return code

    def _enter(self, scope: tuple[int, str], project: Path) -> bool:
        """Keep the loaded app for the same run of the same FAB (False); else drop the previous one's modules
        (True: a new scope)."""
        if scope == self.scope:
            return False
        if self.project is not None:
            forget(self.project)
        self.scope, self.project = scope, project
        return True


def forget(project: Path) -> list[str]:
    """Drop every module loaded from ``project`` (and the folder from ``sys.path``), then collect: the app's
    module-level caches (model, adapter, optimizer state, data) go with them. Returns the names dropped."""
    import gc

    root = str(project.resolve()) + os.sep
    dropped = [name for name, module in list(sys.modules.items()) if any(p.startswith(root) for p in _files(module))]
    for name in dropped:
        del sys.modules[name]
    while str(project) in sys.path:
        sys.path.remove(str(project))
    gc.collect()
    return dropped


def _files(module: Any) -> list[str]:
    """Where a module was loaded from: its file, or a namespace package's folders (resolved)."""
    spec = getattr(module, "__spec__", None)
    places = [getattr(spec, "origin", None) or "", *(getattr(spec, "submodule_search_locations", None) or [])]
    return [str(Path(p).resolve()) for p in places if isinstance(p, str) and p and p not in ("built-in", "frozen")]


def _client(request: Request) -> Any:
    """Flower's Runtime API client with the interceptors ``run_clientapp`` uses (version, token, tracing)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return RuntimeHttpClient.from_server_address(
        server_address=request.address,
        insecure=request.insecure,
        root_certificates=validate_and_resolve_root_certificates(request.root_certificates, request.insecure),
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(request.token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat_fn(client: Any) -> Any:
    """The task heartbeat: Flower's own raises SIGINT in the process when the node rejects it (the task's token
    has lapsed), which would end this shared process; here the task just stops renewing it."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False  # retried by the sender
        except httpx.HTTPStatusError:
            pass  # the token is no longer valid: the task's own calls fail and end it
        return True

    return beat


def _watchdog(limit: object, client: Any, message: Any, context: Any) -> threading.Timer | None:
    """After the round timeout the task's reply can no longer count: send an error reply and end the process
    (a hung task cannot be stopped from another thread); the next message's shim starts a clean one."""
    try:
        seconds = float(str(limit))
    except ValueError:
        return None

    def expire() -> None:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        reason = f"the ClientApp task ran past the round timeout ({seconds:g} s)"
        log(40, "resident: %s; ending the resident process", reason)
        with contextlib.suppress(Exception):
            push_message(
                client, Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message), context
            )
            push_task_output(client=client, context=context, sub_status=SubStatus.FAILED, details=reason)
        os._exit(EXIT_HUNG)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedlora's resident ClientApp process for one SuperNode")
    parser.add_argument("--dir", type=Path, required=True, help="the node's resident folder (socket, pid file)")
    parser.add_argument("--watch-pid", type=int, help="exit when this process (the SuperExec) ends")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(Home(args.dir), args.watch_pid)


if __name__ == "__main__":
    main()
