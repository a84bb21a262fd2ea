"""Payload validation: a bad reply never reaches the aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fed.adapters import Aggregation
from fed.wire import PayloadError, TensorMeta, from_record, metas, to_record
from strategies.fedavg import AdapterFedAvg, check_metrics

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


@pytest.mark.parametrize("record, reason", [
    (_record(**{"head.bias": None}), "missing ['head.bias']"),
    (_record(**{"l.lora_A.weight": torch.ones(2, 3)}), "unexpected ['l.lora_A.weight']"),
    (_record(**{"head.bias": torch.ones(3)}), "head.bias: shape (3,), expected (2,)"),
    (_record(**{"head.bias": torch.ones(2, dtype=torch.float64)}), "dtype float64, expected float32"),
    (_record(**{"head.bias": torch.tensor([1.0, float("nan")])}), "NaN or Inf"),
    (_record(**{"head.bias": torch.tensor([float("inf"), 1.0])}), "NaN or Inf"),
])
def test_bad_payloads_are_rejected_with_the_reason(record, reason):
    with pytest.raises(PayloadError) as err:
        from_record(record, EXPECTED)
    assert reason in str(err.value)


def test_header_lying_about_its_shape_is_rejected():
    lie = Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                data=_record()["l.lora_B.weight"].data)  # a (3, 2) .npy body under a (2,) header
    record = ArrayRecord({"l.lora_B.weight": _record()["l.lora_B.weight"], "head.bias": lie})
    with pytest.raises(PayloadError, match="head.bias"):
        from_record(record, EXPECTED)


def test_metrics_checks_examples_and_fingerprint():
    assert check_metrics({"num-examples": 5, "fingerprint": FP, "train_loss": 0.5}, FP) == 5.0
    with pytest.raises(PayloadError, match="num-examples"):
        check_metrics({"num-examples": 0, "fingerprint": FP}, FP)
    with pytest.raises(PayloadError, match="fingerprint"):
        check_metrics({"num-examples": 5, "fingerprint": FP + 1, "train_loss": 0.5}, FP)
    with pytest.raises(PayloadError, match="train_loss"):
        check_metrics({"num-examples": 5, "fingerprint": FP}, FP)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages outside a running Flower app need a run/node identity to be constructed."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _reply(arrays: ArrayRecord, **metrics) -> Message:
    base = {"num-examples": 10, "fingerprint": FP, "train_loss": 1.0, "partition-id": 0}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**base, **metrics})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_strategy_drops_bad_replies_and_averages_the_rest():
    strategy = AdapterFedAvg(expected=EXPECTED, kinds={k: Aggregation.MEAN for k in GLOBAL}, fingerprint=FP,
                             server_lr=0.5)
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    good_1 = _reply(_record(), **{"num-examples": 10})
    good_3 = _reply(_record(**{"l.lora_B.weight": 3 * torch.ones(3, 2), "head.bias": 3 * torch.ones(2)}),
                    **{"num-examples": 30})
    replies = [good_1, good_3, _reply(_record(**{"head.bias": torch.tensor([np.nan, 1.0])})),
               _reply(_record(), fingerprint=FP + 1), _reply(_record(**{"head.bias": torch.ones(5)}))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays, EXPECTED)
    # example-weighted mean delta = (10*1 + 30*3)/40 = 2.5, times server_lr 0.5
    torch.testing.assert_close(out["head.bias"], torch.full((2,), 1.25))
    assert metrics["clients"] == 2 and metrics["dropped"] == 3
    reasons = " | ".join(strategy.rounds[1].dropped)
    assert "NaN" in reasons and "fingerprint" in reasons and "shape" in reasons


def test_meta_sizes():
    assert TensorMeta((3, 2)).nbytes == 24


def test_a_round_with_fewer_valid_replies_than_min_replies_keeps_the_global():
    strategy = AdapterFedAvg(expected=EXPECTED, kinds={k: Aggregation.MEAN for k in GLOBAL}, fingerprint=FP,
                             min_replies=2)
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    assert strategy.aggregate_train(1, [_reply(_record()), _reply(_record(), fingerprint=FP + 1)]) == (None, None)
    arrays, metrics = strategy.aggregate_train(2, [_reply(_record()), _reply(_record())])
    assert arrays is not None and metrics["clients"] == 2
