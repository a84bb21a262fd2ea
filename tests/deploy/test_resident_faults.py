"""The resident runtime's faults with real processes on loopback, TLS and node authentication: a resident process
killed mid-task costs that message, not the run; a task that never ends is bounded by the round timeout and the
next message gets a new process.
"""

from __future__ import annotations

import os
import signal

import pytest

from deploy.launcher import Cluster
from deploy.resident import Home
from fed.privacy.ledger import Ledger
from tests.deploy.conftest import QUICK_GRID, tls_layout
from tests.deploy.residents import (
    PRIVATE,
    SERVED,
    count_lines,
    data_file,
    resident_pids,
    round_lines,
    run_config,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir):
    """Three rounds; node 1's resident process is SIGKILLed while it serves its round-2 message."""
    root = tmp_path_factory.mktemp("killed")
    data = data_file(root)
    layout = tls_layout(root)
    cfg = run_config(
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
        wait_for(lambda: count_lines(node_log, SERVED) == 2, "node 1's round-2 message")
        pid = int(Home(layout.node_dir(1) / "resident").pid.read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: run.poll() is not None, "the run to finish", timeout=600)
    return layout, run_dir, pid


def test_a_killed_resident_costs_one_message_not_the_run(killed):
    layout, run_dir, pid = killed
    rounds = round_lines(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["clients"] for r in rounds] == [2, 1, 2]  # round 3: node 1 served again, by a new process
    log = layout.log("node-1")
    assert len(resident_pids(log)) >= 2 and count_lines(log, SERVED) >= 3  # more where a start outlived a claim
    assert int(Home(layout.node_dir(1) / "resident").pid.read_text()) != pid
    assert [e.round for e in Ledger.from_json((layout.node_dir(0) / "ledger-0.json").read_text()).events] == [1, 2, 3]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def hung(tmp_path_factory, tiny_model_dir):
    """Two rounds; node 1's tasks never end by themselves (its policy holds every DP reply for an hour)."""
    root = tmp_path_factory.mktemp("hung")
    data = data_file(root)
    layout = tls_layout(root)
    cfg = run_config(
        tiny_model_dir, data, *PRIVATE, "federation.min_replies=1", f"federation.round_timeout={HUNG_TIMEOUT}"
    )
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in (0, 1):
            cluster.register(node)
        cluster.start_node(0, None, 2, policy=QUICK_GRID)
        cluster.start_node(1, None, 2, policy={"reply-delay": 3600.0})
        run_dir = cluster.run(cfg, "hung", timeout=900)
        # node 1's next message (round 2's) finds its resident gone and starts a new one
        wait_for(lambda: len(resident_pids(layout.log("node-1"))) >= 2, "node 1's next resident")
    return layout, run_dir


HUNG_TIMEOUT = 60


@pytest.mark.faults
def test_a_hung_task_is_bounded_by_the_round_timeout(hung):
    layout, run_dir = hung
    rounds = round_lines(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients"] <= 1 for r in rounds)  # node 1 never answered in time
    log = layout.log("node-1")
    # the first task's bound ended it with an error reply and ended its process; the next message got a new one
    assert count_lines(log, "ran past the round timeout") >= 1 and len(resident_pids(log)) >= 2
