"""Secure aggregation end to end in a real Flower simulation: the secure mean against the plain run's mean of the
same updates, what the strategy is handed, distributed DP surviving a client that drops mid-round."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

import strategies.core
from clients.app import evaluate_global, secure_aggregation, train
from fed.config.sources import resolve
from fed.privacy.distributed import SkellamShare
from fed.privacy.release import PUBLIC_UNDER_DP
from fed.run.rundir import RunDir
from simulations.run import simulate
from tests.simulations.test_e2e import TINY

pytestmark = pytest.mark.slow

ONE_ROUND = [*TINY, "federation.rounds=1", "federation.fraction_evaluate=0"]


def _global(run: RunDir) -> dict[str, torch.Tensor]:
    point = run.resume_point()
    assert point is not None
    return {name: torch.as_tensor(value) for name, value in point.arrays.items()}


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """A secure run without DP beside the same run aggregated in the clear, and what the strategy was handed."""
    handed: list[tuple[list[dict], int]] = []
    original_read, original_aggregate = strategies.core.AdapterStrategy._read, strategies.core.aggregate

    def read(self, state, replies):
        for msg in replies:
            if not msg.has_error():
                handed.append(
                    ({k: dict(v) for k, v in msg.content.metric_records.items()}, len(msg.content.array_records))
                )
        return original_read(self, state, replies)

    batches: list[int] = []

    def aggregate(batch, *args, **kwargs):
        batches.append(len(batch.deltas))
        return original_aggregate(batch, *args, **kwargs)

    out = tmp_path_factory.mktemp("runs")
    plain = simulate(resolve("quickstart", ONE_ROUND), out, name="plain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(strategies.core.AdapterStrategy, "_read", read)
        patch.setattr(strategies.core, "aggregate", aggregate)
        secure = simulate(resolve("quickstart", [*ONE_ROUND, "federation.secure_aggregation=true"]), out, name="secure")
    return plain, secure, handed, batches


def test_the_secure_mean_is_the_plain_mean_within_its_stated_grid_error(seen):
    plain, secure, _, _ = seen
    before = resolve("quickstart", ONE_ROUND)
    line = secure.metrics()[-1]
    assert line["clients"] == 3 and not line["dropped"]
    bound = line["secagg_error"]
    assert 0 < bound < 1e-4
    a, b = _global(plain), _global(secure)
    moved = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert moved <= bound * 1.01  # the unprotected mean is the plain run's (same seeds, same updates)
    assert plain.metrics()[-1]["secagg_error"] is None and before.federation.secure_aggregation is False


def test_the_strategy_is_handed_public_metrics_and_one_sum_never_an_update(seen):
    _, _, handed, batches = seen
    assert len(handed) == 3
    for records, arrays in handed:
        assert arrays == 0  # no client's update, masked or not, reaches the strategy
        assert set(records["metrics"]) <= PUBLIC_UNDER_DP
    assert batches == [1]  # the rules combined one thing: the unmasked sum


def _dropping(partition: int) -> ClientApp:
    """Our ClientApp, except that the node of ``partition`` fails once it has shared its keys (SecAgg+'s
    masked-vector stage): a client lost mid-round."""

    def drop(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        records = msg.content.config_records
        masked_stage = RECORD_KEY_CONFIGS in records and "fitins.config" in records
        if masked_stage and int(context.node_config.get("partition-id", -1)) == partition:
            raise RuntimeError("this client drops out mid-round")
        return call_next(msg, context)

    app = ClientApp(mods=[secure_aggregation, drop])
    app.train()(train)
    app.evaluate()(evaluate_global)
    return app


def test_distributed_dp_survives_a_dropout_and_reports_the_worst_case_epsilon(tmp_path):
    cfg = resolve(
        "quickstart",
        [
            *TINY,
            "federation.fraction_evaluate=0",
            "federation.secure_aggregation=true",
            "federation.secure_min_survivors=2",
            "dp.enabled=true",
            "dp.level=client",
            "dp.client_noise_multiplier=2",
        ],
    )
    run = simulate(cfg, tmp_path, name="ddp", client=_dropping(2))
    lines = run.metrics()
    assert [line["clients"] for line in lines] == [2, 2]
    assert all(any("did not complete secure aggregation" in d for d in line["dropped"]) for line in lines)
    level = json.loads((run.path / "privacy.json").read_text())["client_level"]
    assert [r["round"] for r in level["rounds"]] == [1, 2]
    coordinates = sum(t.numel() for t in _global(run).values())
    share = SkellamShare.plan(cfg.dp.client_clip, 2.0, 2, coordinates)
    assert level["mechanism"]["min_survivors"] == 2
    assert level["epsilon"] == pytest.approx(share.epsilon(2, cfg.dp.delta), rel=1e-6)
    assert lines[-1]["client_epsilon"] == pytest.approx(level["epsilon"])
