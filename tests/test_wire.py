"""Payload validation: a bad reply never reaches the aggregate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fed.adapters import Aggregation, Structure
from fed.config import DPConfig, StrategyConfig
from fed.privacy.book import LedgerBook
from fed.wire import RAW, PayloadError, TensorMeta, from_record, metas, to_record
from strategies.build import influence_stages, reply_stages
from strategies.core import AdapterStrategy, RoundPlan, ServerUpdate
from strategies.pipeline import AdapterModel
from strategies.validation import ReplyRules, check_reply
from tests.helpers import reply_from

GLOBAL = {"l.lora_B.weight": torch.zeros(3, 2), "head.bias": torch.zeros(2)}
EXPECTED = metas(GLOBAL)
FP = 12345


def _record(**over):
    tensors = {"l.lora_B.weight": torch.ones(3, 2), "head.bias": torch.ones(2)}
    tensors.update(over)
    return to_record({k: v for k, v in tensors.items() if v is not None})


def test_valid_payload_round_trips():
    out = from_record(_record(), EXPECTED)
    torch.testing.assert_close(out["l.lora_B.weight"], torch.ones(3, 2))


@pytest.mark.parametrize(
    "record, reason",
    [
        (_record(**{"head.bias": None}), "missing ['head.bias']"),
        (_record(**{"l.lora_A.weight": torch.ones(2, 3)}), "unexpected ['l.lora_A.weight']"),
        (_record(**{"head.bias": torch.ones(3)}), "head.bias: shape (3,), expected (2,)"),
        (_record(**{"head.bias": torch.ones(2, dtype=torch.float64)}), "dtype float64, expected float32"),
        (_record(**{"head.bias": torch.tensor([1.0, float("nan")])}), "NaN or Inf"),
        (_record(**{"head.bias": torch.tensor([float("inf"), 1.0])}), "NaN or Inf"),
    ],
)
def test_bad_payloads_are_rejected_with_the_reason(record, reason):
    with pytest.raises(PayloadError) as err:
        from_record(record, EXPECTED)
    assert reason in str(err.value)


def test_bfloat16_transport_halves_the_bytes_rounds_each_value_and_is_validated_like_float32():
    tensors = {
        "l.lora_B.weight": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
        "head.bias": torch.tensor([1e-3, -7.5]),
    }
    half, full = to_record(tensors, "bfloat16"), to_record(tensors)
    elements = sum(t.numel() for t in tensors.values())
    assert full.count_bytes() - 4 * elements == half.count_bytes() - 2 * elements  # the key names
    out = from_record(half, EXPECTED, "bfloat16")
    for name, t in tensors.items():  # the receiver sees float32 equal to the value rounded to bfloat16
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], t.to(torch.bfloat16).float())
        assert (out[name] - t).abs().max() <= 2**-8 * t.abs().max()
    with pytest.raises(PayloadError, match="expected int16"):  # float32 where bfloat16 was agreed
        from_record(full, EXPECTED, "bfloat16")
    with pytest.raises(PayloadError, match="expected float32"):
        from_record(half, EXPECTED)
    inf = to_record({**tensors, "head.bias": torch.tensor([float("inf"), 1.0])}, "bfloat16")
    with pytest.raises(PayloadError, match="NaN or Inf"):
        from_record(inf, EXPECTED, "bfloat16")
    with pytest.raises(ValueError, match="float16"):
        to_record(tensors, "float16")


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_transport_decoding_reads_the_records_own_bytes_without_a_copy(wire):
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    record = to_record(tensors, wire)
    views = from_record(record, metas(tensors), wire, transport=True)
    copies = from_record(record, metas(tensors), wire)
    for name, view in views.items():
        start = np.frombuffer(record[name].data, np.uint8).ctypes.data
        assert start <= view.data_ptr() < start + len(record[name].data)  # inside the record's bytes
        assert view.dtype == (torch.bfloat16 if wire == "bfloat16" else torch.float32)
        assert torch.equal(view.float(), copies[name]) and copies[name].dtype == torch.float32
    with pytest.raises(PayloadError, match="NaN"):
        from_record(to_record({"a": torch.full((5, 3), math.nan), "b": torch.ones(7)}), metas(tensors), transport=True)


def test_bytes_that_do_not_match_the_declared_shape_or_another_serialisation_are_rejected():
    body = _record()["l.lora_B.weight"].data  # the 24 bytes of a (3, 2) float32 array
    lie = Array(dtype="float32", shape=(2,), stype=RAW, data=body)  # ... declared as (2,)
    record = ArrayRecord({"l.lora_B.weight": _record()["l.lora_B.weight"], "head.bias": lie})
    with pytest.raises(PayloadError, match="head.bias: 24 bytes, a float32"):
        from_record(record, EXPECTED)
    npy = ArrayRecord({"l.lora_B.weight": _record()["l.lora_B.weight"], "head.bias": Array(np.ones(2, np.float32))})
    with pytest.raises(PayloadError, match="head.bias: serialisation 'numpy.ndarray'"):
        from_record(npy, EXPECTED)


def test_metrics_checks_round_examples_fingerprint_and_loss():
    rules = ReplyRules(fingerprint=FP, local_steps=10)
    ok = {"round": 2, "num-examples": 5, "fingerprint": FP, "train_loss": 0.5, "steps": 10}
    assert check_reply(ok, rules, 2) == 5.0
    for bad, reason in [
        ({"num-examples": 0}, "num-examples"),
        ({"num-examples": 10**12}, "num-examples"),
        ({"fingerprint": FP + 1}, "fingerprint"),
        ({"train_loss": None}, "train_loss"),
        ({"train_loss": float("inf")}, "train_loss"),
        ({"round": 1}, "round 1"),
        ({"steps": 11}, "steps"),
        ({"num-examples": True}, "num-examples"),
    ]:
        with pytest.raises(PayloadError, match=reason):
            check_reply({**ok, **bad}, rules, 2)


pytestmark = pytest.mark.usefixtures("flower_identity")


_NODES = iter(range(100, 10**6))


def _reply(arrays: ArrayRecord, **metrics) -> Message:
    node = next(_NODES)  # each from its own node, as its own client (a partition id binds to one node)
    base = {"num-examples": 10, "fingerprint": FP, "train_loss": 1.0, "partition-id": node, "round": 1, "steps": 1}
    msg = reply_from(node, None, {**base, **metrics})
    msg.content["arrays"] = arrays
    return msg


def _strategy(
    model: AdapterModel = AdapterModel(EXPECTED, Structure({k: Aggregation.MEAN for k in GLOBAL})),
    rules: ReplyRules = ReplyRules(fingerprint=FP),
    **settings,
) -> AdapterStrategy:
    stages = [*reply_stages(model, rules, LedgerBook(DPConfig())), *influence_stages(StrategyConfig(), math.inf)]
    return AdapterStrategy(model=model, stages=stages, **settings)


def test_strategy_drops_bad_replies_and_averages_the_rest():
    strategy = _strategy(update=ServerUpdate(server_lr=0.5))
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    good_1 = _reply(_record(), **{"num-examples": 10})
    good_3 = _reply(
        _record(**{"l.lora_B.weight": 3 * torch.ones(3, 2), "head.bias": 3 * torch.ones(2)}), **{"num-examples": 30}
    )
    replies = [
        good_1,
        good_3,
        _reply(_record(**{"head.bias": torch.tensor([np.nan, 1.0])})),
        _reply(_record(), fingerprint=FP + 1),
        _reply(_record(**{"head.bias": torch.ones(5)})),
        _reply(_record(), **{"usage:nowhere/0": 3}),
    ]  # expert counts for an adapter without experts
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays, EXPECTED)
    # example-weighted mean delta = (10*1 + 30*3)/40 = 2.5, times server_lr 0.5
    torch.testing.assert_close(out["head.bias"], torch.full((2,), 1.25))
    assert metrics["clients"] == 2 and metrics["dropped"] == 4
    reasons = " | ".join(strategy.rounds[1].dropped)
    assert "NaN" in reasons and "fingerprint" in reasons and "shape" in reasons and "expert counts" in reasons


def test_strategy_under_bfloat16_transport_averages_the_rounded_deltas_and_drops_float32_ones():
    strategy = _strategy(rules=ReplyRules(fingerprint=FP, wire="bfloat16"))
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    deltas = [{"l.lora_B.weight": torch.full((3, 2), v), "head.bias": torch.full((2,), v)} for v in (0.1, 0.3)]
    replies = [_reply(to_record(d, "bfloat16")) for d in deltas] + [_reply(to_record(deltas[0]))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (torch.tensor(0.1).bfloat16().float() + torch.tensor(0.3).bfloat16().float()) / 2
    torch.testing.assert_close(from_record(arrays, EXPECTED)["head.bias"], expected.expand(2))  # the global: float32
    assert metrics["clients"] == 2 and "wire.dtype='bfloat16'" in strategy.rounds[1].dropped[0]


def test_evaluation_every_k_rounds_and_always_after_the_last():
    def strategy(every: int, offset: int = 0) -> AdapterStrategy:
        return _strategy(plan=RoundPlan(rounds=7, offset=offset, eval_every=every))

    assert [r for r in range(1, 8) if strategy(3).evaluates(r)] == [3, 6, 7]
    assert [r for r in range(1, 8) if strategy(1).evaluates(r)] == list(range(1, 8))
    assert [r for r in range(1, 8) if strategy(0).evaluates(r)] == [7]
    skipping = strategy(3, offset=2)  # a resumed run counts the run's rounds, not Flower's
    assert skipping.configure_evaluate(2, to_record(GLOBAL), ConfigRecord({}), grid=None) == []  # run round 4
    assert skipping.aggregate_evaluate(2, []) is None and 4 not in skipping.rounds


def test_meta_sizes():
    assert TensorMeta((3, 2)).nbytes == 24


def test_expert_counts_are_read_only_when_complete_and_well_formed():
    from fed.wire import read_usage, usage_metrics

    slots = ("b.0/0", "b.0/1")
    assert read_usage({"num-examples": 3}, slots) is None  # a DP client sends none
    assert read_usage(usage_metrics({"b.0/0": 4, "b.0/1": 0}), slots) == {"b.0/0": 4.0, "b.0/1": 0.0}
    with pytest.raises(PayloadError, match="expected exactly"):
        read_usage(usage_metrics({"b.0/0": 4}), slots)
    with pytest.raises(PayloadError, match="finite non-negative numbers"):
        read_usage({"usage:b.0/0": -1, "usage:b.0/1": 2}, slots)


def test_strategy_weights_experts_by_the_counts_in_replies_and_logs_the_aggregation_error():
    from fed.wire import usage_metrics
    from tests.helpers import client_deltas, make

    server = make("mole")
    global_ = server.sent_state()
    strategy = _strategy(
        AdapterModel(metas(global_), server.structure(), server.products), ReplyRules(fingerprint=server.fingerprint())
    )
    strategy._global = global_
    deltas = client_deltas(server, 2)
    slots = server.structure().slot_names
    counts = [{s: 1 for s in slots}, {s: (3 if s.endswith("/1") else 0) for s in slots}]
    replies = [
        _reply(to_record(d), fingerprint=server.fingerprint(), **usage_metrics(c)) for d, c in zip(deltas, counts)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = from_record(arrays, metas(global_))
    name = "bert.encoder.layer.0.attention.self.value.experts.1.lora_A.weight"
    torch.testing.assert_close(out[name], global_[name] + 0.25 * deltas[0][name] + 0.75 * deltas[1][name])
    name0 = name.replace("experts.1", "experts.0")
    torch.testing.assert_close(out[name0], global_[name0] + deltas[0][name0])  # client 1 never used expert 0
    assert 0 < strategy.rounds[1].aggregation_error < float("inf")


def test_a_round_with_fewer_valid_replies_than_min_replies_keeps_the_global():
    strategy = _strategy(plan=RoundPlan(min_replies=2))
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    assert strategy.aggregate_train(1, [_reply(_record()), _reply(_record(), fingerprint=FP + 1)]) == (None, None)
    arrays, metrics = strategy.aggregate_train(1, [_reply(_record()), _reply(_record())])
    assert arrays is not None and metrics["clients"] == 2


@pytest.mark.parametrize("row", ["lora", "ffa-lora", "moslora", "mole", "mor"])
@pytest.mark.parametrize("wire, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_bytes_sent_are_the_trained_elements_plus_the_tensor_names(row, wire, itemsize):
    from tests.helpers import make

    state = make(row).sent_state()
    trained = sum(p.numel() for p in make(row).trainable_parameters())
    assert sum(t.numel() for t in state.values()) == trained  # what is sent is exactly what is trained
    expected = sum(t.numel() * itemsize + len(name) for name, t in state.items())  # no per-tensor header
    assert to_record(state, wire).count_bytes() == expected
    assert from_record(to_record(state, wire), metas(state), wire).keys() == state.keys()
