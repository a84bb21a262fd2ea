"""End to end at ``dp.level = both``: a real Flower simulation whose report carries both guarantees, each
recomputed here with dp_accounting (not the Opacus accountants the run used)."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import RdpAccountant

from fed.config.sources import resolve
from fed.reports.privacy import guarantees
from simulations.run import simulate
from tests.simulations.test_e2e import TINY

pytestmark = pytest.mark.slow


def rdp_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    """dp_accounting's RDP epsilon of (noise multiplier, Poisson rate, steps) events composed."""
    acc = RdpAccountant()
    for z, q, steps in events:
        acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
    return float(acc.get_epsilon(delta))


def test_a_run_at_both_levels_reports_both_guarantees_each_recomputed_independently(tmp_path):
    cfg = resolve(
        "quickstart",
        [
            *TINY,
            "adapter.kind=ffa-lora",
            "dp.enabled=true",
            "dp.level=both",
            "dp.target_epsilon=4",
            "dp.client_noise_multiplier=1.2",
            "dp.client_clipping=adaptive",
            "federation.fraction_train=0.7",
        ],
    )
    run = simulate(cfg, tmp_path, name="both")
    privacy = json.loads((run.path / "privacy.json").read_text())
    level = privacy["client_level"]
    released = [r["round"] for r in level["rounds"]]
    assert released and set(released) <= {1, 2}
    assert level["epsilon"] == pytest.approx(rdp_epsilon([(1.2, 0.7, len(released))], cfg.dp.delta), rel=0.01)
    assert level["trust"].startswith("the server") and level["unit"] == "client"
    for entry in privacy["clients"].values():
        events = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entry["events"]]
        assert entry["server_epsilon"] == pytest.approx(rdp_epsilon(events, cfg.dp.delta), rel=0.01)
    assert [g["level"] for g in guarantees(privacy)] == ["example", "client"]
    lines = run.metrics()
    assert lines[-1]["client_epsilon"] == pytest.approx(level["epsilon"])
    page = (run.path / "report.html").read_text()
    assert "Client level (DP-FedAvg on the server)" in page and "Example level (DP-SGD on each client)" in page
