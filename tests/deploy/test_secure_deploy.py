"""Secure aggregation with distributed DP on the deployment engine: real processes on loopback (TLS, node
authentication, resident ClientApps), each node on its own file; SecAgg+'s four stages per round."""

from __future__ import annotations

import json

import pytest

from deploy.launcher import deploy_local
from tests.deploy.conftest import QUICK_GRID, node_file_run
from tests.helpers import _node_files

pytestmark = pytest.mark.slow


def test_a_distributed_dp_run_finishes_with_every_round_unmasked(tmp_path, tiny_model_dir):
    cfg = node_file_run(
        tiny_model_dir,
        "dp.level=client",
        "dp.client_noise_multiplier=2",
        "federation.secure_aggregation=true",
        "federation.round_timeout=300",
    )
    # the nodes opt out of their strict default (DP-SGD on every round): here each adds its share of Skellam noise
    policy = {**QUICK_GRID, "dp-opt-out": "true"}
    run_dir = deploy_local(cfg, _node_files(tmp_path), tmp_path / "cluster", name="secure", timeout=600, policy=policy)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["round"], line["clients"], line["dropped"]) for line in lines] == [(1, 2, []), (2, 2, [])]
    assert all(line["secagg_error"] > 0 for line in lines)
    level = json.loads((run_dir / "privacy.json").read_text())["client_level"]
    assert [r["round"] for r in level["rounds"]] == [1, 2] and level["epsilon"] > 0
    assert level["mechanism"]["min_survivors"] == 2 and level["trust"].startswith("no one")
