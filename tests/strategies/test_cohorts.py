"""Large cohorts: the server's round, which holds no per-reply copy, merges to the global a plain dense
computation over all replies gives (numpy, float64), under the run's bounds and in either wire dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fed.config import RunConfig
from fed.privacy.book import LedgerBook
from fed.wire import from_record, metas, to_record
from strategies.build import build_strategy
from tests.helpers import make

pytestmark = pytest.mark.usefixtures("flower_identity")


def _round(wire: str, weighting: str, clip: str, deltas, examples):
    """The strategy's next global after one round of these replies, and the round's log."""
    adapter = make("lora")
    cfg = RunConfig().with_overrides(
        {"wire.dtype": wire, "strategy.weighting": weighting, "strategy.clip": clip, "train.local_steps": 2}
    )
    strategy = build_strategy(cfg, adapter, LedgerBook(cfg.dp))
    global_ = adapter.sent_state()
    strategy._global = global_
    replies = []
    for node, (delta, n) in enumerate(zip(deltas, examples)):
        metrics = {"partition-id": node, "round": 1, "num-examples": n, "fingerprint": adapter.fingerprint()}
        content = RecordDict({"metrics": MetricRecord(metrics | {"train_loss": 0.5, "steps": 2})})
        content["arrays"] = to_record(delta, wire)
        msg = Message(content, dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 100 + node
        replies.append(msg)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert replies == [], "the round consumes Flower's list of replies"
    return global_, from_record(arrays, metas(global_)), strategy.rounds[1], cfg


def _as_sent(deltas, wire: str) -> list[dict[str, np.ndarray]]:
    """What the server receives: float32, or rounded to bfloat16 on the way."""
    dtype = torch.bfloat16 if wire == "bfloat16" else torch.float32
    return [{n: t.to(dtype).to(torch.float64).numpy() for n, t in d.items()} for d in deltas]


def _deltas(count: int, seed: int = 0):
    global_ = make("lora").sent_state()
    g = torch.Generator().manual_seed(seed)
    return [{n: 1e-3 * torch.randn(t.shape, generator=g) for n, t in global_.items()} for _ in range(count)]


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_round_is_the_dense_weighted_mean_of_all_replies(wire):
    deltas, examples = _deltas(12), [3 + k % 5 for k in range(12)]
    global_, got, log, _ = _round(wire, "examples", "off", deltas, examples)
    sent = _as_sent(deltas, wire)
    for name, before in global_.items():
        mean = sum(n * d[name] for d, n in zip(sent, examples)) / sum(examples)
        np.testing.assert_allclose(got[name].numpy(), before.double().numpy() + mean, rtol=1e-6, atol=1e-9)
    assert log.aggregation_error > 0  # LoRA's factor mean is inexact: the error was measured, over every reply


def test_capped_weights_and_adaptive_clip_match_their_formulas():
    deltas, examples = _deltas(9, seed=1), [4] * 8 + [10**6]
    deltas[2] = {n: 50 * t for n, t in deltas[2].items()}  # far beyond the median norm: clipped
    global_, got, log, cfg = _round("float32", "capped", "adaptive", deltas, examples)
    s = cfg.strategy
    sent = _as_sent(deltas, "float32")
    norms = [math.sqrt(sum(float((t**2).sum()) for t in d.values())) for d in sent]
    ceiling = cfg.train.lr * cfg.train.local_steps * math.sqrt(sum(t.numel() for t in global_.values()))
    bound = min(ceiling, s.clip_multiplier * float(np.median(norms)))
    weights = [min(n, s.max_weight_ratio * float(np.median(examples))) for n in examples]
    scales = [min(1.0, bound / norm) for norm in norms]
    assert (log.capped, log.clipped) == (1, 1)
    for name, before in global_.items():
        mean = sum(w * c * d[name] for d, w, c in zip(sent, weights, scales)) / sum(weights)
        np.testing.assert_allclose(got[name].numpy(), before.double().numpy() + mean, rtol=1e-6, atol=1e-9)
