"""The resident runtime's parts without a deployment: the request it accepts from ``flwr-clientapp``'s
arguments, the shim the launcher writes, dropping a run's modules, and the Flower version pin."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.resident_overhead import messages
from deploy import launcher, resident
from deploy.resident import Request, ResidentError


def test_the_request_is_what_flowers_subprocess_executor_passes():
    # flwr 1.42 SubprocessExecutor.launch: command, --runtime-api-address ADDR, --token T, TLS flag, --parent-pid
    argv = ["--runtime-api-address", "127.0.0.1:9094", "--token", "abc", "--root-certificates", "/ca.pem"]
    request = Request.parse([*argv, "--parent-pid", "42"])
    assert request == Request("127.0.0.1:9094", "abc", False, "/ca.pem", 42)
    assert Request.parse(["--runtime-api-address", "a:1", "--token", "t", "--insecure"]).insecure
    assert Request.from_json(request.to_json()) == request


@pytest.mark.parametrize(
    "argv",
    [
        ["--token", "t"],  # no address
        ["--runtime-api-address", "a:1", "--token", "t", "--token-file", "/f"],  # a flag it does not serve
        ["--runtime-api-address", "a:1", "--token"],  # a flag without its value
    ],
)
def test_arguments_it_does_not_serve_are_refused_by_name(argv):
    with pytest.raises(ResidentError, match="flwr-clientapp"):
        Request.parse(argv)


@pytest.mark.parametrize(
    "payload",
    [
        {"address": "a:1", "token": "t", "insecure": False, "root_certificates": None},  # a field missing
        {"address": "a:1", "token": "t", "insecure": "no", "root_certificates": None, "parent_pid": None},
        {"address": "a:1", "token": "", "insecure": False, "root_certificates": None, "parent_pid": None},
        {"address": "a:1", "token": "t", "insecure": False, "root_certificates": None, "parent_pid": True},
        {"address": "a:1", "token": "t", "insecure": False, "root_certificates": None, "parent_pid": 1, "x": 1},
    ],
)
def test_a_malformed_request_over_the_socket_is_refused(payload):
    with pytest.raises(ResidentError):
        Request.from_json(json.dumps(payload))


def test_the_shim_falls_back_to_flowers_own_command_outside_resident_mode(tmp_path):
    shim = resident.install_shim(tmp_path / "bin")
    assert shim.name == "flwr-clientapp" and os.access(shim, os.X_OK)
    environ = {k: v for k, v in os.environ.items() if k != resident.RESIDENT_ENV}
    done = subprocess.run([str(shim), "--help"], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--token" in done.stdout  # Flower's own flwr-clientapp answered


def test_a_resident_node_finds_the_shim_first_on_its_path(tmp_path):
    environ = launcher.node_env(tmp_path, resident=True)
    first = environ["PATH"].split(os.pathsep)[0]
    assert Path(first) == tmp_path / "bin" and (Path(first) / "flwr-clientapp").is_file()
    assert environ[resident.RESIDENT_ENV] == str((tmp_path / "resident").resolve())
    plain = launcher.node_env(tmp_path / "p", resident=False)
    assert resident.RESIDENT_ENV not in plain
    assert Path(plain["PATH"].split(os.pathsep)[0]) == Path(sys.executable).parent


def test_another_flower_release_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(resident, "TESTED_FLOWER", ("0.0.1",))
    with pytest.raises(ResidentError, match=r"--per-message"):
        resident.check_flower()


def test_forgetting_a_project_drops_its_modules_and_their_caches(tmp_path, monkeypatch):
    package = tmp_path / "fab" / "cachepkg_resident"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("CACHE = {}\n")
    (package / "model.py").write_text("from cachepkg_resident import CACHE\nCACHE['model'] = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fab"))
    import cachepkg_resident.model

    first = sys.modules["cachepkg_resident"].CACHE["model"]
    dropped = resident.forget(tmp_path / "fab")
    assert sorted(dropped) == ["cachepkg_resident", "cachepkg_resident.model"]
    assert "cachepkg_resident" not in sys.modules and str(tmp_path / "fab") not in sys.path
    monkeypatch.syspath_prepend(str(tmp_path / "fab"))
    import cachepkg_resident.model  # noqa: F401, F811

    assert sys.modules["cachepkg_resident"].CACHE["model"] is not first  # a new run builds its own
    resident.forget(tmp_path / "fab")


def test_the_benchmark_reads_each_message_from_a_nodes_log():
    log = "\n".join(
        [
            "\x1b[92mINFO 2026-12-06 10:00:00,000\x1b[0m:      Receiving: train message (ID: 1)",
            "\x1b[92mINFO 2026-12-06 10:00:00,500\x1b[0m:      Received successfully",
            "\x1b[92mINFO 2026-12-06 10:00:09,000\x1b[0m:      trained 10 steps in 4.250 s",
            "some line without a time stamp",
            "\x1b[92mINFO 2026-12-06 10:00:10,000\x1b[0m:      Sending: train message (ID: 2)",
            "\x1b[92mINFO 2026-12-06 10:00:20,000\x1b[0m:      Received successfully",
            "\x1b[92mINFO 2026-12-06 10:00:21,000\x1b[0m:      evaluated in 0.400 s",
            "\x1b[92mINFO 2026-12-06 10:00:21,300\x1b[0m:      Sending: evaluate message (ID: 3)",
        ]
    )
    found = messages(log)
    assert [m.kind for m in found] == ["train", "evaluate"]
    assert found[0].overhead_s == pytest.approx(9.5 - 4.25) and found[1].overhead_s == pytest.approx(1.3 - 0.4)


def test_a_resident_deep_in_the_tree_listens_on_a_short_private_socket(tmp_path, monkeypatch):
    """A state dir deeper than a Unix socket address allows (OSError: AF_UNIX path too long) still gets a socket:
    in this user's own 0700 folder, named after the resident's folder, so two nodes never share one."""
    run = Path(tempfile.mkdtemp(prefix="xdg", dir="/tmp"))  # short, as /run/user/<uid> is
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    shallow = resident.Home(tmp_path / "n")
    assert shallow.socket == tmp_path / "n" / "resident.sock"
    deep = [resident.Home(tmp_path / ("d" * 60) / ("e" * 60) / f"node-{i}") for i in (0, 1)]
    sockets = [home.socket for home in deep]
    assert sockets[0] != sockets[1] and all(len(os.fsencode(s)) < resident.SOCKET_PATH_MAX for s in sockets)
    assert sockets[0].parent.stat().st_mode & 0o777 == 0o700
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sockets[0]))  # a path the kernel takes
    listener.close()
    os.chmod(sockets[0].parent, 0o755)
    with pytest.raises(ResidentError, match="0700"):
        _ = deep[0].socket
    shutil.rmtree(run)
