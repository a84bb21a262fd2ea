"""The resident ClientApp runtime with real processes on loopback, TLS and node authentication: one process per
node for every message, the same results and ledgers as ``fed simulate``, and nothing carried from one run into
the next (its faults are in tests/deploy/test_resident_faults.py).

One federation (a SuperLink and two SuperNodes on partitions of one dataset file) serves three runs in order:
``plain`` (no DP, with evaluation), ``again`` (the same config on the same warm processes: a cache that carried
the trained adapter, its optimizer or the data into the next run would change it), then ``dp`` (DP-SGD; the
nodes' ledgers are compared with the simulated clients'). Flower's own process-per-message mode is run by
tests/deploy/test_deploy.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deploy.launcher import Cluster, Layout
from fed.privacy.ledger import Ledger
from tests.deploy.conftest import QUICK_GRID, tls_layout
from tests.deploy.residents import (
    PLAIN,
    PRIVATE,
    SERVED,
    count_lines,
    data_file,
    log_lines,
    resident_pids,
    round_lines,
    run_config,
)

pytestmark = pytest.mark.slow


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _events(layout: Layout, node: int) -> list[tuple]:
    ledger = Ledger.from_json((layout.node_dir(node) / f"ledger-{node}.json").read_text())
    return [(e.round, e.steps, e.sample_rate, e.noise_multiplier) for e in ledger.events]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    """The three runs on one resident federation, by name, and the data file."""
    data = data_file(tmp_path_factory.mktemp("data"))
    layout = tls_layout(tmp_path_factory.mktemp("resident"))
    runs = {}
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in (0, 1):
            cluster.register(node)
            cluster.start_node(node, None, 2, policy={"dp-opt-out": "true", **QUICK_GRID})
        for name, overrides in (("plain", PLAIN), ("again", PLAIN), ("dp", PRIVATE)):
            runs[name] = cluster.run(run_config(tiny_model_dir, data, *overrides), name, timeout=600)
    return layout, runs, data


def test_resident_nodes_served_every_message_from_one_process_each(federation):
    layout, _, _ = federation
    for node in (0, 1):
        log = layout.log(f"node-{node}")
        # plain: 2 rounds x (train + evaluate); again: the same; dp: 2 train messages
        assert count_lines(log, SERVED) == 10
        assert len(resident_pids(log)) == 1, log_lines(log, "resident")  # one process for all three runs
        assert count_lines(log, "Start `flwr-clientapp` process") == 0  # Flower's own command never ran


def test_same_metrics_and_adapter_as_simulation(federation, tiny_model_dir, tmp_path):
    from simulations.run import simulate

    _, runs, data = federation
    simulated = simulate(run_config(tiny_model_dir, data, *PLAIN), tmp_path, name="sim").path
    expected = round_lines(simulated)
    assert [r["clients"] for r in expected] == [2, 2] and expected[-1]["eval_accuracy"] is not None
    for run_dir in (runs["plain"], runs["again"]):
        assert round_lines(run_dir) == expected
        tensors, reference = _adapter(run_dir), _adapter(simulated)
        assert tensors.keys() == reference.keys()
        for name, tensor in reference.items():
            assert tensors[name].equal(tensor), name


def test_same_ledgers_under_dp_as_simulation(federation, tiny_model_dir, tmp_path):
    """Each node's own ledger books what a simulated client of the same run books, and the server's privacy
    book gives each client the simulation's epsilon."""
    from simulations.run import simulate

    layout, runs, data = federation
    simulated = simulate(run_config(tiny_model_dir, data, *PRIVATE), tmp_path, name="sim-dp").path
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
