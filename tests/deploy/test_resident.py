"""The resident ClientApp runtime with real processes on loopback, TLS and node authentication: the same
results and ledgers as ``fed simulate``, nothing carried from one run into the next, a killed resident process
that costs one message, not the run, and a hung task bounded by the round timeout.

One federation (a SuperLink and two SuperNodes on partitions of one dataset file) serves three runs in order:
``plain`` (no DP, with evaluation), ``again`` (the same config on the same warm processes: a cache that carried
the trained adapter, its optimizer or the data into the next run would change it), then ``dp`` (DP-SGD; the
nodes' ledgers are compared with the simulated clients'). Flower's own process-per-message mode is run by
tests/deploy/test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deploy.launcher import Cluster, Layout
from deploy.pki import make_pki
from deploy.resident import Home
from fed.config.sources import resolve
from fed.privacy.ledger import Ledger
from tests.deploy.conftest import QUICK_GRID

pytestmark = pytest.mark.slow
SERVED = "resident: task of run"
STARTED = "resident ClientApp process"
VOLATILE = {"wall_s"}  # the only field of a round's line that depends on the machine, not on the run


def _data(root: Path) -> Path:
    words = ("good fine great", "bad dull poor")
    path = root / "reviews.csv"
    rows = [f"a {words[i % 2].split()[i % 3]} film number {i},{('pos', 'neg')[i % 2]}" for i in range(48)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _cfg(model_dir: Path, data: Path, *extra: str):
    return resolve(
        "quickstart",
        [
            f"model.name={model_dir}",
            "model.max_length=16",
            f"data.name={data}",
            "data.labels=neg,pos",
            "adapter.kind=ffa-lora",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=8",
            *extra,
        ],
    )


PLAIN = ("dp.enabled=false", "federation.fraction_evaluate=1", "simulation.actors=1")  # one Ray actor: memory
PRIVATE = ("dp.enabled=true", "dp.target_epsilon=8", "federation.fraction_evaluate=0")


def _rounds(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _events(layout: Layout, node: int) -> list[tuple]:
    ledger = Ledger.from_json((layout.node_dir(node) / f"ledger-{node}.json").read_text())
    return [(e.round, e.steps, e.sample_rate, e.noise_multiplier) for e in ledger.events]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    """The three runs on one resident federation, by name, and the data file."""
    data = _data(tmp_path_factory.mktemp("data"))
    layout = Layout(tmp_path_factory.mktemp("resident"))
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes=2)
    runs = {}
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in (0, 1):
            cluster.register(node)
            cluster.start_node(node, None, 2, policy={"dp-opt-out": "true", **QUICK_GRID})
        for name, overrides in (("plain", PLAIN), ("again", PLAIN), ("dp", PRIVATE)):
            runs[name] = cluster.run(_cfg(tiny_model_dir, data, *overrides), name, timeout=600)
    return layout, runs, data


def test_resident_nodes_served_every_message_from_one_process_each(federation):
    layout, _, _ = federation
    for node in (0, 1):
        log = layout.log(f"node-{node}")
        # plain: 2 rounds x (train + evaluate); again: the same; dp: 2 train messages
        assert _count(log, SERVED) == 10
        assert len(_residents(log)) == 1, _lines(log, "resident")  # one process for all three runs
        assert _count(log, "Start `flwr-clientapp` process") == 0  # Flower's own command never ran


def test_same_metrics_and_adapter_as_simulation(federation, tiny_model_dir, tmp_path):
    from simulations.run import simulate

    _, runs, data = federation
    simulated = simulate(_cfg(tiny_model_dir, data, *PLAIN), tmp_path, name="sim").path
    expected = _rounds(simulated)
    assert [r["clients"] for r in expected] == [2, 2] and expected[-1]["eval_accuracy"] is not None
    for run_dir in (runs["plain"], runs["again"]):
        assert _rounds(run_dir) == expected
        tensors, reference = _adapter(run_dir), _adapter(simulated)
        assert tensors.keys() == reference.keys()
        for name, tensor in reference.items():
            assert tensors[name].equal(tensor), name


def test_same_ledgers_under_dp_as_simulation(federation, tiny_model_dir, tmp_path):
    """Each node's own ledger books what a simulated client of the same run books, and the server's privacy
    book gives each client the simulation's epsilon."""
    from simulations.run import simulate

    layout, runs, data = federation
    simulated = simulate(_cfg(tiny_model_dir, data, *PRIVATE), tmp_path, name="sim-dp").path
    book_s = json.loads((simulated / "privacy.json").read_text())["clients"]
    book_r = json.loads((runs["dp"] / "privacy.json").read_text())["clients"]
    for node in (0, 1):
        events = _events(layout, node)
        simulated_events = book_s[str(node)]["events"]
        expected = [(e["round"], e["steps"], e["sample_rate"], e["noise_multiplier"]) for e in simulated_events]
        assert [e[0] for e in expected] == [1, 2]
        assert events == expected
        assert Ledger.from_json((layout.node_dir(node) / f"ledger-{node}.json").read_text()).epsilon() > 0
    assert {k: v["epsilon"] for k, v in book_r.items()} == {k: v["epsilon"] for k, v in book_s.items()}


def _wait(condition, what: str, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def _lines(path: Path, text: str) -> list[str]:
    """Lines of a node's log holding ``text``, in Flower's format only: importing Opacus adds a handler to the
    root logger that repeats every line in its own format (a date first)."""
    if not path.is_file():
        return []
    return [line for line in path.read_text(errors="replace").splitlines() if text in line and not line[:1].isdigit()]


def _count(path: Path, text: str) -> int:
    return len(_lines(path, text))


def _residents(path: Path) -> set[str]:
    """The pids of the resident processes a node's log says started (each logs its pid once, when ready)."""
    return {m.group(1) for line in _lines(path, STARTED) if (m := re.search(r"process (\d+) ready", line))}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir):
    """Three rounds; node 1's resident process is SIGKILLed while it serves its round-2 message."""
    root = tmp_path_factory.mktemp("killed")
    data = _data(root)
    layout = Layout(root)
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes=2)
    cfg = _cfg(
        tiny_model_dir,
        data,
        *PRIVATE,
        "federation.rounds=3",
        "federation.min_replies=1",
        "federation.round_timeout=180",
    )
    run_dir = root / "runs" / "killed"
    node_log = layout.log("node-1")
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in (0, 1):
            cluster.register(node)
            cluster.start_node(node, None, 2, policy=QUICK_GRID)
        run = cluster.launch(cfg, "killed")
        _wait(lambda: _count(node_log, SERVED) == 2, "node 1's round-2 message")
        pid = int(Home(layout.node_dir(1) / "resident").pid.read_text())
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: run.poll() is not None, "the run to finish", timeout=600)
    return layout, run_dir, pid


def test_a_killed_resident_costs_one_message_not_the_run(killed):
    layout, run_dir, pid = killed
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["clients"] for r in rounds] == [2, 1, 2]  # round 3: node 1 served again, by a new process
    log = layout.log("node-1")
    assert len(_residents(log)) >= 2 and _count(log, SERVED) >= 3  # more where a start outlived a claim
    assert int(Home(layout.node_dir(1) / "resident").pid.read_text()) != pid
    assert [e.round for e in Ledger.from_json((layout.node_dir(0) / "ledger-0.json").read_text()).events] == [1, 2, 3]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def hung(tmp_path_factory, tiny_model_dir):
    """Two rounds; node 1's tasks never end by themselves (its policy holds every DP reply for an hour)."""
    root = tmp_path_factory.mktemp("hung")
    data = _data(root)
    layout = Layout(root)
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes=2)
    cfg = _cfg(tiny_model_dir, data, *PRIVATE, "federation.min_replies=1", f"federation.round_timeout={HUNG_TIMEOUT}")
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in (0, 1):
            cluster.register(node)
        cluster.start_node(0, None, 2, policy=QUICK_GRID)
        cluster.start_node(1, None, 2, policy={"reply-delay": 3600.0})
        run_dir = cluster.run(cfg, "hung", timeout=900)
        # node 1's next message (round 2's) finds its resident gone and starts a new one
        _wait(lambda: len(_residents(layout.log("node-1"))) >= 2, "node 1's next resident")
    return layout, run_dir


HUNG_TIMEOUT = 60


@pytest.mark.faults
def test_a_hung_task_is_bounded_by_the_round_timeout(hung):
    layout, run_dir = hung
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients"] <= 1 for r in rounds)  # node 1 never answered in time
    log = layout.log("node-1")
    # the first task's bound ended it with an error reply and ended its process; the next message got a new one
    assert _count(log, "ran past the round timeout") >= 1 and len(_residents(log)) >= 2
