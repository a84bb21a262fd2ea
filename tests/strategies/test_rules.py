"""Aggregation rules and the aggregation error, against dense references computed here."""

from __future__ import annotations

import math

import pytest

from strategies.kinds import Replies, aggregate, aggregation_error
from tests.helpers import _dense, _layers, client_deltas, make


def _error(row: str, scale: float = 1.0) -> tuple[float, float]:
    """The rule's aggregation error, and the same quantity computed layer by layer from explicit products."""
    server = make(row)
    global_ = server.sent_state()
    deltas, weights = client_deltas(server, 3, scale), [5.0, 1.0, 2.0]
    replies = Replies(global_, deltas, weights)
    merged = aggregate(replies, server.structure())
    err, ref = 0.0, 0.0
    for path, layer in _layers(server):
        before = _dense(layer, path, global_).double()
        mean = sum(
            w * (_dense(layer, path, {n: global_[n] + d[n] for n in d}).double() - before)
            for w, d in zip(weights, deltas)
        ) / sum(weights)
        got = _dense(layer, path, {n: global_[n] + merged[n] for n in merged}).double() - before
        err += float((mean - got).pow(2).sum())
        ref += float(mean.pow(2).sum())
    return aggregation_error(server.products, replies, merged), math.sqrt(err / ref)


@pytest.mark.parametrize("row", ["ffa-lora", "moslora-frozen-a"])
def test_aggregation_error_is_zero_where_aggregation_is_exact(row):
    error, reference = _error(row)
    assert error < 1e-6 and reference < 1e-6


@pytest.mark.parametrize("row", ["lora", "moslora"])
def test_aggregation_error_is_honest_where_it_is_not(row):
    error, reference = _error(row)
    assert error == pytest.approx(reference, rel=1e-6)
    assert error > 1e-2


def test_aggregation_error_of_identical_clients_is_zero_for_lora():
    server = make("lora")
    delta = client_deltas(server, 1)[0]
    replies = Replies(server.sent_state(), [delta, delta], [1.0, 3.0])
    assert aggregation_error(server.products, replies, aggregate(replies, server.structure())) < 1e-6
