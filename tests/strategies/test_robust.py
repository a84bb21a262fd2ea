"""Hostile replies: bounded influence by default, robust rules, one validation layer, fuzzing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fed.adapters import Aggregation, Structure
from fed.config import DPConfig, StrategyConfig
from fed.privacy.book import LedgerBook
from fed.wire import PayloadError, from_record, metas
from strategies.build import honest_ceiling, influence_stages, reply_stages
from strategies.core import AdapterStrategy, MergeRule
from strategies.influence import bounded_weights, clip_deltas, delta_norm, honest_step_bound
from strategies.kinds import Replies, aggregate
from strategies.kinds.mean import coordinate_median, trimmed_mean
from strategies.pipeline import AdapterModel
from strategies.validation import ReplyRules, check_reply
from tests.helpers import reply_from

GLOBAL = {"l.lora_B.weight": torch.zeros(4, 3), "head.bias": torch.zeros(2)}
FP = 3
_NODES = iter(range(1000, 10**7))


pytestmark = pytest.mark.usefixtures("flower_identity")


def _deltas(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: 0.03 + 0.003 * torch.randn(t.shape, generator=g) for n, t in GLOBAL.items()} for _ in range(k)]


def test_median_and_trimmed_mean_equal_flowers_own_statistics():
    deltas = _deltas(7)
    names = list(GLOBAL)
    as_numpy = [([d[n].numpy() for n in names], 1) for d in deltas]
    for ours, theirs in (
        (coordinate_median(deltas, names), aggregate_median(as_numpy)),
        (trimmed_mean(deltas, names, 0.2), aggregate_trimmed_avg(as_numpy, 0.2)),
    ):
        for n, expected in zip(names, theirs):
            np.testing.assert_allclose(ours[n].numpy(), expected, rtol=1e-6)


def test_weight_cap_and_norm_clip():
    weights, capped = bounded_weights([10, 12, 11, 9, 10**12], "capped", 3.0)
    assert capped == 1 and weights[-1] == 33.0 and weights[:4] == [10, 12, 11, 9]  # 3 x median 11
    assert bounded_weights([1, 10**12], "uniform", 3.0) == ([1.0, 1.0], 0)
    clipped, count = clip_deltas([{"a": torch.full((4,), 1e30)}, {"a": torch.ones(4)}], 3.0)
    assert count == 1 and delta_norm(clipped[0]) == pytest.approx(3.0) and delta_norm(clipped[1]) == 2.0
    assert honest_step_bound(1e-2, 10, 100) == pytest.approx(1.0)


def _reply(delta: dict[str, torch.Tensor], **metrics) -> Message:
    node = next(_NODES)  # each node its own client: the server binds a partition id to the first node naming it
    base = {"partition-id": node, "round": 1, "num-examples": 100, "fingerprint": FP, "train_loss": 0.5, "steps": 5}
    return reply_from(node, delta, {**base, **metrics})


def _strategy(influence: StrategyConfig = StrategyConfig(), dp: DPConfig = DPConfig()) -> AdapterStrategy:
    model = AdapterModel(metas(GLOBAL), Structure({n: Aggregation.MEAN for n in GLOBAL}))
    rules = ReplyRules(fingerprint=FP, local_steps=5, batch_size=10, rounds=3, dp=dp)
    s = AdapterStrategy(
        model=model,
        merge=MergeRule(rule=influence.rule),
        stages=[
            *reply_stages(model, rules, LedgerBook(DPConfig())),
            *influence_stages(influence, honest_ceiling(model.expected, 1e-2, 5)),
        ],
    )
    s._global = {n: t.clone() for n, t in GLOBAL.items()}
    return s


def _global_after(strategy: AdapterStrategy, replies: list[Message]) -> dict[str, torch.Tensor]:
    arrays, _ = strategy.aggregate_train(1, replies)
    return from_record(arrays, metas(GLOBAL))


def test_the_two_takeovers_from_the_issue_are_bounded_by_default_and_not_without():
    honest = [_reply(d) for d in _deltas(4)]
    huge = _reply({n: torch.full(t.shape, 1e30) for n, t in GLOBAL.items()})
    liar = _reply({n: torch.full(t.shape, -0.5) for n, t in GLOBAL.items()}, **{"num-examples": 10**9})
    off = StrategyConfig(weighting="examples", clip="off")
    assert float(_global_after(_strategy(off), [*honest, huge])["head.bias"].abs().max()) > 1e29
    assert float(_global_after(_strategy(off), [*honest, liar])["head.bias"].mean()) == pytest.approx(-0.5, abs=1e-5)
    strategy = _strategy()
    bounded = _global_after(strategy, [*honest, huge])
    assert float(bounded["head.bias"].abs().max()) < 0.2 and strategy.rounds[1].clipped == 1
    strategy = _strategy()
    moved = _global_after(strategy, [*honest, liar])
    assert strategy.rounds[1].capped == 1 and strategy.rounds[1].clipped == 1
    assert delta_norm(moved) <= strategy.rounds[1].norm_bound * (1 + 1e-6)  # moved no further than the bound
    assert float(moved["head.bias"].mean()) > -0.01  # instead of -0.5


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_ignore_one_sign_flipped_scaled_reply(rule):
    honest = [_reply(d) for d in _deltas(4)]
    flipped = _reply({n: -50 * t for n, t in _deltas(1, seed=9)[0].items()})
    out = _global_after(_strategy(StrategyConfig(rule=rule, clip="off")), [*honest, flipped])
    assert float(out["l.lora_B.weight"].min()) > 0.015  # every coordinate stays with the honest 0.03


def test_wrong_round_duplicate_node_and_contradicting_dp_events_are_dropped():
    dp = DPConfig(enabled=True, noise_multiplier=1.0)
    event = {"dp-steps": 5, "dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "epsilon": 1.0}
    strategy = _strategy(dp=dp)
    good = _reply(_deltas(1)[0], **event)
    twice = _reply(_deltas(1)[0], **event)
    twice.metadata.__dict__["_src_node_id"] = good.metadata.src_node_id
    bad = [
        _reply(_deltas(1)[0], **{**event, "round": 7}),
        _reply(_deltas(1)[0], **{**event, "dp-sample-rate": 0.5}),
        _reply(_deltas(1)[0], **{**event, "dp-steps": 6}),
        _reply(_deltas(1)[0], **{**event, "dp-noise-multiplier": 0.3}),
        _reply(_deltas(1)[0]),
    ]  # no DP event at all in a DP run
    strategy.aggregate_train(1, [good, twice, *bad])
    reasons = " | ".join(strategy.rounds[1].dropped)
    assert strategy.rounds[1].accepted == 1 and len(strategy.rounds[1].dropped) == 6
    for text in ("second reply", "round 7", "dp-sample-rate", "dp-steps=6", "noise", "without DP"):
        assert text in reasons, text


# --- fuzzing: no input crashes the server or reaches aggregation unvalidated ---------------------------

METRIC_VALUES = st.one_of(st.integers(-(10**13), 10**13), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
METRICS = st.dictionaries(
    st.sampled_from(
        [
            "round",
            "num-examples",
            "fingerprint",
            "train_loss",
            "steps",
            "partition-id",
            "dp-steps",
            "dp-noise-multiplier",
            "dp-sample-rate",
            "epsilon",
            "declined",
            "refused",
            "junk",
        ]
    ),
    METRIC_VALUES,
)


@settings(max_examples=300, deadline=None)
@given(metrics=METRICS, dp=st.booleans())
def test_fuzzed_metrics_raise_only_payload_errors(metrics, dp):
    rules = ReplyRules(
        fingerprint=FP,
        local_steps=5,
        batch_size=10,
        rounds=2,
        dp=DPConfig(enabled=True, noise_multiplier=1.0) if dp else DPConfig(),
    )
    try:
        weight = check_reply(metrics, rules, 1)
    except PayloadError:
        return
    assert 1 <= weight <= 10**9 and metrics["round"] == 1 and metrics["fingerprint"] == FP


ARRAYS = st.dictionaries(
    st.sampled_from(["l.lora_B.weight", "head.bias", "other"]),
    st.tuples(
        st.sampled_from([np.float32, np.float64, np.int32, np.float16]),
        st.lists(st.integers(0, 5), min_size=0, max_size=3),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=ARRAYS)
def test_fuzzed_payloads_are_decoded_only_when_they_match_exactly(arrays):
    with np.errstate(all="ignore"):
        record = ArrayRecord(
            {n: Array(np.full(shape, fill).astype(dtype)) for n, (dtype, shape, fill) in arrays.items()}
        )
    try:
        out = from_record(record, metas(GLOBAL))
    except PayloadError:
        return
    assert set(out) == set(GLOBAL) and all(torch.isfinite(t).all() for t in out.values())
    assert all(out[n].shape == GLOBAL[n].shape and out[n].dtype == torch.float32 for n in GLOBAL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scales=st.lists(st.floats(-1e35, 1e35, allow_nan=False), min_size=1, max_size=6),
    counts=st.lists(st.integers(1, 10**9), min_size=6, max_size=6),
)
def test_fuzzed_rounds_never_leave_the_bound(scales, counts):
    """Whatever finite values and counts arrive, the default strategy's update stays within the norm bound
    (adaptive: at most the honest-step ceiling) times the server learning rate."""
    strategy = _strategy()
    replies = [
        _reply({n: torch.full(t.shape, s, dtype=torch.float32) for n, t in GLOBAL.items()}, **{"num-examples": c})
        for s, c in zip(scales, counts)
    ]
    good = [r for r, s in zip(replies, scales) if math.isfinite(float(np.float32(s)))]
    arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:
        assert not good
        return
    out = from_record(arrays, metas(GLOBAL))
    assert delta_norm(out) <= honest_ceiling(metas(GLOBAL), 1e-2, 5) * (1 + 1e-5)


def test_rules_refuse_an_unknown_kind_and_keep_structural_kinds_apart(monkeypatch):
    import strategies.kinds

    deltas = _deltas(3)
    monkeypatch.delitem(strategies.kinds.RULES, Aggregation.MASKED)  # every declared kind has a rule: drop one
    with pytest.raises(ValueError, match="no aggregation rule"):
        aggregate(Replies(GLOBAL, deltas, [1, 1, 1]), Structure({"head.bias": Aggregation.MASKED}), rule="median")


@settings(max_examples=300, deadline=None)
@given(
    flat=st.dictionaries(
        st.one_of(
            st.sampled_from(sorted(__import__("fed.config", fromlist=["RunConfig"]).RunConfig().to_flat())),
            st.text(max_size=12),
        ),
        st.one_of(
            st.integers(-(10**6), 10**6),
            st.floats(allow_nan=True),
            st.booleans(),
            st.text(max_size=8),
            st.lists(st.text(max_size=4), max_size=3),
        ),
        max_size=6,
    )
)
def test_fuzzed_configs_raise_only_config_errors(flat):
    from fed.config import ConfigError, RunConfig

    try:
        cfg = RunConfig.from_flat(flat)
    except ConfigError:
        return
    assert RunConfig.from_flat(cfg.to_flat()) == cfg  # what parses, round-trips


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    body=st.lists(st.sampled_from([*list('ab,"\n\t;{}[]:1.-'), "text", "label", "\n"]), max_size=30).map("".join),
    suffix=st.sampled_from([".csv", ".json", ".jsonl"]),
)
def test_fuzzed_data_files_load_or_fail_with_a_value_error(tmp_path, body, suffix):
    """Whatever a local data file holds, loading it yields a dataset or a ValueError naming the file."""
    from fed.data.datasets import load_task_dataset

    path = tmp_path / f"data{abs(hash((body, suffix)))}{suffix}"
    path.write_text(body)
    try:
        ds = load_task_dataset(str(path), "classification")
    except ValueError as err:
        assert str(path.name) in str(err) or "column" in str(err) or "label" in str(err)
        return
    assert len(ds) > 0 and {"text", "label"} <= set(ds.column_names)


def test_expert_counts_are_capped_like_example_counts():
    """A client claiming 10^9 routed tokens gets at most max_weight_ratio x the median total."""
    from fed.wire import usage_metrics
    from tests.helpers import client_deltas, make

    server = make("mole")
    global_ = server.sent_state()
    model = AdapterModel(metas(global_), server.structure(), server.products)
    strategy = AdapterStrategy(
        model=model,
        stages=[
            *reply_stages(model, ReplyRules(fingerprint=server.fingerprint()), LedgerBook(DPConfig())),
            *influence_stages(StrategyConfig(clip="off"), math.inf),
        ],
    )
    strategy._global = global_
    slots = server.structure().slot_names
    honest = {s: 10 for s in slots}
    liar = {s: (10**9 if s.endswith("/1") else 0) for s in slots}
    deltas = client_deltas(server, 4)
    replies = [
        _reply(d, fingerprint=server.fingerprint(), **usage_metrics(c))
        for d, c in zip(deltas, [honest, honest, honest, liar])
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = from_record(arrays, metas(global_))
    name = next(n for n in global_ if ".experts.1." in n)
    total = len(slots) * 10
    blocks = sum(s.endswith("/1") for s in slots)
    liar_weight = 3 * total / blocks  # capped at 3 x the median total, spread over every block's expert 1
    expected = global_[name] + (10 * sum(d[name] for d in deltas[:3]) + liar_weight * deltas[3][name]) / (
        30 + liar_weight
    )
    torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    assert strategy.rounds[1].capped == 1


def test_texts_longer_than_the_model_takes_are_reported_before_a_simulation():
    from fed.config.sources import resolve
    from fed.session import preflight

    base = ["model.name=tiny-bert", "data.name=synthetic", "data.max_examples=0", "federation.num_clients=2"]
    assert preflight(resolve("quickstart", [*base, "model.max_length=64"])) == []
    (warning,) = preflight(resolve("quickstart", [*base, "model.max_length=4"]))
    assert "longer than model.max_length=4" in warning and "truncated" in warning
