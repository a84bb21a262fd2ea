"""Real processes on loopback: a SuperLink and two SuperNodes with TLS and node authentication, each node on
its own data file, a DP FFA-LoRA run of 2 rounds; a node whose key was never registered is refused. The nodes
run Flower's own process per message (``--per-message``); tests/deploy/test_resident.py runs the resident
runtime, the default.

The server's config names a data file that does not exist: it must never need client data.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from deploy.launcher import Cluster
from deploy.pki import add_node_key
from fed.privacy.ledger import Ledger
from tests.deploy.conftest import node_file_run, tls_layout
from tests.helpers import _node_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    files = _node_files(root)
    layout = tls_layout(root)
    stranger = add_node_key(layout.pki, 9)  # a key pair the SuperLink never hears of
    cfg = node_file_run(tiny_model_dir, "dp.target_epsilon=8")
    with Cluster(layout, resident=False) as cluster:
        cluster.start_superlink()
        for node, path in enumerate(files):
            cluster.register(node)
            cluster.start_node(node, path, num_nodes=2)
        refused = cluster.start_node(9, files[0], num_nodes=2, key=stranger.with_suffix(""), name="stranger")
        run_dir = cluster.run(cfg, "dp", timeout=600)
        try:
            refused_code = refused.wait(timeout=60)
        except subprocess.TimeoutExpired:
            refused_code = None
    return layout, run_dir, refused_code


def test_the_run_completes_on_both_nodes(deployed, tiny_model_dir):
    _, run_dir, _ = deployed
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    assert all(line["clients"] == 2 and line["dropped"] == [] for line in lines)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "latest.safetensors").is_file()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())


def test_every_client_keeps_its_ledger_and_the_server_agrees(deployed):
    layout, run_dir, _ = deployed
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for node in (0, 1):
        ledger = Ledger.from_json((layout.node_dir(node) / f"ledger-{node}.json").read_text())
        assert [e.round for e in ledger.events] == [1, 2] and ledger.steps == 4
        assert 0 < ledger.epsilon() <= 8.0
        assert privacy["clients"][str(node)]["epsilon"] == pytest.approx(ledger.epsilon())


def test_a_node_with_an_unregistered_key_is_refused(deployed):
    layout, _, code = deployed
    assert code not in (None, 0)
    assert "Failed to activate SuperNode" in layout.log("stranger").read_text()
    assert not (layout.node_dir(9) / "ledger-9.json").exists()
