"""Heterogeneous client ranks and product-space aggregation for LoRA, against dense references built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed.adapters.base import restrict_rank
from fed.config import ConfigError, RunConfig
from fed.privacy.dpsgd import DpStepper, per_sample_module
from fed.privacy.mechanism import DpSettings
from fed.ranks import client_rank, planned_ranks
from fed.train import per_example_losses
from fed.wire import PayloadError
from strategies.kinds import Replies, aggregate, aggregation_error
from strategies.validation import ReplyRules, check_padding, check_rank
from tests.helpers import _bert_adapter, _layers, _naive_grads, client_deltas, make, randomise


def _rank_deltas(adapter, ranks, seed=0, scale=1.0):
    """Random client deltas, each zero beyond its client's rank (what a rank-r_k client sends)."""
    axes = adapter.structure().rank_axes
    return [restrict_rank(d, axes, r) for d, r in zip(client_deltas(adapter, len(ranks), scale, seed), ranks)]


def _after(global_, delta):
    return {n: global_[n] + delta[n] for n in delta}


def test_a_rank_masked_layer_is_the_truncated_adapter():
    adapter = make("lora")
    randomise(adapter, 0.3)
    _path, layer = _layers(adapter)[0]
    x = torch.randn(2, 3, 16)
    adapter.set_rank(2)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), layer.scaling * x @ a[:2].T @ b[:, :2].T)
        adapter.set_rank(None)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), layer.scaling * x @ a.T @ b.T)
    with pytest.raises(ValueError, match="no rank axis"):
        make("mor").set_rank(2)


def test_ffa_zero_padded_aggregation_equals_the_dense_mean_of_the_clients_products():
    """Clients of ranks 1, 2, 4 on one seeded A of rank 4: the zero-padded mean of their B's times A is the
    example-weighted mean of their own rank-r_k products ``s·B_k·A[:r_k]``, exactly."""
    server = make("ffa-lora")
    global_ = server.sent_state()  # B = 0: the clients' B_k are their deltas
    ranks, weights = (1, 2, 4), [3.0, 1.0, 2.0]
    small = [{n: torch.randn(t.shape[0], r) for n, t in global_.items() if n.endswith("lora_B.weight")} for r in ranks]
    deltas = [
        {
            n: torch.nn.functional.pad(s[n], (0, 4 - s[n].shape[1])) if n in s else torch.randn(t.shape)
            for n, t in global_.items()
        }
        for s in small
    ]
    replies = Replies(global_, deltas, weights)
    merged = aggregate(replies, server.structure())
    for path, layer in _layers(server):
        a, name = layer.lora_A.weight.detach(), f"{path}.lora_B.weight"
        dense = sum(w * layer.scaling * s[name] @ a[:r] for w, s, r in zip(weights, small, ranks)) / sum(weights)
        torch.testing.assert_close(layer.scaling * merged[name] @ a, dense, rtol=1e-5, atol=1e-6)
    moved = {n: t + 0.5 for n, t in global_.items()}  # from a non-zero global too, by the round's error
    replies = Replies(moved, deltas, weights)
    assert aggregation_error(server.products, replies, aggregate(replies, server.structure())) < 1e-6


def test_under_dp_masked_coordinates_get_zero_per_sample_gradients_and_their_noise_never_travels(batch):
    adapter, task = _bert_adapter("lora")
    adapter.set_rank(2)
    axes, names = adapter.structure().rank_axes, adapter.names(trainable=True)
    reference = _naive_grads(adapter, task, batch)
    gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
    per_example_losses(adapter, task, gsm, batch)[1].sum().backward()
    params = dict(adapter.model.named_parameters())
    for name in names:
        per_sample = params[name].grad_sample
        torch.testing.assert_close(per_sample, torch.stack([r[name] for r in reference]), rtol=1e-4, atol=1e-6)
        if name in axes:  # exactly zero beyond rank 2, per sample, so clipping sees only what is trained
            assert torch.count_nonzero(per_sample.narrow(axes[name] + 1, 2, 2)) == 0
            assert torch.count_nonzero(per_sample.narrow(axes[name] + 1, 0, 2)) > 0
    gsm._close()
    before = adapter.sent_state()
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05, num_examples=100)
    stepper = DpStepper(adapter.model, torch.optim.SGD(adapter.trainable_parameters(), lr=1.0), dp)
    stepper.accumulate(per_example_losses(adapter, task, stepper.module, batch)[1], len(batch["input_ids"]))
    stepper.step()
    stepper.close()
    delta = {n: t - before[n] for n, t in adapter.sent_state().items()}
    name = next(iter(axes))
    assert torch.count_nonzero(delta[name].narrow(axes[name], 2, 2)) > 0  # the noise landed there locally
    with pytest.raises(PayloadError, match="beyond the reply's rank 2"):
        check_padding(delta, axes, 2)
    sent = restrict_rank(delta, axes, 2)
    check_padding(sent, axes, 2)
    torch.testing.assert_close(sent[name].narrow(axes[name], 0, 2), delta[name].narrow(axes[name], 0, 2))


@pytest.mark.parametrize("case", ["clients share A", "total rank <= r"])
def test_product_aggregation_error_is_zero_when_the_global_rank_holds_the_mean(case):
    server = make("lora")
    global_ = server.sent_state()
    if case == "clients share A":
        deltas = [{n: d[n] * 0 if n.endswith("lora_A.weight") else d[n] for n in d} for d in client_deltas(server, 3)]
    else:  # B = 0 globally, two clients of rank 2: the mean of their products has rank <= 4 = r
        deltas = _rank_deltas(server, (2, 2))
    replies = Replies(global_, deltas, [1.0, 2.0, 3.0][: len(deltas)])
    product = aggregation_error(server.products, replies, aggregate(replies, server.structure(), aggregation="product"))
    naive = aggregation_error(server.products, replies, aggregate(replies, server.structure()))
    assert product < 1e-5
    assert naive > 1e-2 if case == "total rank <= r" else naive < 1e-5


def test_product_aggregation_is_the_best_rank_r_approximation_and_keeps_every_component_alive():
    """Independent reference (Eckart-Young): the mean of the clients' dense B·A truncated by numpy's SVD; the
    error the round reports is the truncated tail; A keeps the global A's scale with orthogonal rows."""
    server = make("lora")
    randomise(server, 0.3)
    global_ = server.sent_state()
    deltas, weights = client_deltas(server, 3, 0.5), [1.0, 2.0, 3.0]
    replies = Replies(global_, deltas, weights)
    merged = aggregate(replies, server.structure(), aggregation="product")
    err, ref = 0.0, 0.0
    for path, _layer in _layers(server):
        a, b = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        mean = (
            sum(w * _after(global_, d)[b].double() @ _after(global_, d)[a].double() for w, d in zip(weights, deltas))
            / 6
        )
        u, s, vh = (torch.from_numpy(m) for m in np.linalg.svd(mean.numpy()))
        best = (u[:, :4] * s[:4]) @ vh[:4]
        new_a, new_b = (_after(global_, merged)[n].double() for n in (a, b))
        torch.testing.assert_close(new_b @ new_a, best, rtol=1e-5, atol=1e-6)
        c2 = float(global_[a].double().pow(2).sum()) / 4
        torch.testing.assert_close(new_a @ new_a.T, c2 * torch.eye(4, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        err += float((mean - best).pow(2).sum())
        ref += float((mean - global_[b].double() @ global_[a].double()).pow(2).sum())
    assert aggregation_error(server.products, replies, merged) == pytest.approx(math.sqrt(err / ref), rel=1e-5)
    # Only rank-1 clients from B = 0: the mean has rank 2 < 4, yet A keeps 4 live rows (B's extra columns 0).
    fresh = make("lora")
    sparse = Replies(fresh.sent_state(), _rank_deltas(fresh, (1, 1)), [1.0, 1.0])
    kept = _after(fresh.sent_state(), aggregate(sparse, fresh.structure(), aggregation="product"))
    for path, _ in _layers(fresh):
        assert torch.linalg.matrix_rank(kept[f"{path}.lora_A.weight"]) == 4
        assert torch.linalg.matrix_rank(kept[f"{path}.lora_B.weight"]) == 2


def test_client_ranks_rules_and_their_errors():
    base = {"adapter.kind": "ffa-lora", "adapter.rank": 8, "federation.num_clients": 4}
    cfg = RunConfig.from_flat({**base, "federation.client_ranks": [2, 4, 8, 8]})
    assert planned_ranks(cfg.federation.client_ranks, 4, 8) == (2, 4, 8, 8)
    assert planned_ranks(("linear",), 4, 8) == (2, 4, 6, 8) and planned_ranks(("linear",), 3, 2) == (1, 2, 2)
    assert client_rank(("node",), 0, 4, 8, {"max-rank": 3}) == 3 and client_rank(("node",), 0, 4, 8, {}) == 8
    assert client_rank(("node",), 0, 4, 8, {"max-rank": 99}) == 8 and client_rank((), 0, 4, 8, {}) is None
    for ranks, message in [
        ("2,4,8", "names 3 ranks for federation.num_clients=4"),
        ("2,4,9,0", r"ranks \[9, 0\] outside \[1, adapter.rank=8\]"),
        ("fast", "one integer rank per client, or one rule of: linear, node"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_flat({**base, "federation.client_ranks": ranks})
    with pytest.raises(ConfigError, match="needs adapter.kind in lora, ffa-lora"):
        RunConfig.from_flat({**base, "adapter.kind": "mole", "federation.client_ranks": "linear"})
    with pytest.raises(ConfigError, match=r"applies to adapter.kind in \['lora'\] only"):
        RunConfig.from_flat({**base, "strategy.aggregation": "product"})
    with pytest.raises(ConfigError, match="strategy.aggregation='sum' is not one of: mean, product"):
        RunConfig.from_flat({**base, "adapter.kind": "lora", "strategy.aggregation": "sum"})


def test_the_server_checks_each_replys_rank_against_the_plan():
    rules = ReplyRules(fingerprint=0, max_rank=8, ranks=(2, 4, 8, 8))
    assert check_rank({"rank": 4, "partition-id": 1}, rules) == 4
    assert check_rank({}, ReplyRules(fingerprint=0)) is None
    for metrics, message in [
        ({"rank": 8, "partition-id": 1}, "differs from federation.client_ranks' 4"),
        ({"rank": 9, "partition-id": 2}, r"rank=9 must be an integer in \[1, 8\]"),
        ({"partition-id": 2}, "rank=None"),
    ]:
        with pytest.raises(PayloadError, match=message):
            check_rank(metrics, rules)


@pytest.mark.usefixtures("flower_identity")
def test_the_strategy_drops_replies_off_their_rank_and_aggregates_the_rest_in_product_space():
    from fed.config import DPConfig, StrategyConfig
    from fed.privacy.book import LedgerBook
    from fed.wire import from_record, metas
    from strategies.build import influence_stages, reply_stages
    from strategies.core import AdapterStrategy, MergeRule
    from strategies.pipeline import AdapterModel
    from tests.helpers import reply_from

    server = make("lora")
    global_ = server.sent_state()
    model = AdapterModel(metas(global_), server.structure(), server.products)
    rules = ReplyRules(fingerprint=server.fingerprint(), max_rank=4, ranks=(2, 4, 4))
    strategy = AdapterStrategy(
        model=model,
        merge=MergeRule(aggregation="product"),
        stages=[
            *reply_stages(model, rules, LedgerBook(DPConfig())),
            *influence_stages(StrategyConfig(clip="off"), math.inf),
        ],
    )
    strategy._global = global_
    good = _rank_deltas(server, (2, 4))
    unpadded = client_deltas(server, 1, seed=5)[0]
    base = {"num-examples": 10, "fingerprint": server.fingerprint(), "train_loss": 1.0, "round": 1, "steps": 1}
    replies = [
        reply_from(12, unpadded, {**base, "partition-id": 0, "rank": 2}),  # dropped, so it binds no partition id
        reply_from(10, good[0], {**base, "partition-id": 0, "rank": 2}),
        reply_from(11, good[1], {**base, "partition-id": 1, "rank": 4}),
        reply_from(13, good[0], {**base, "partition-id": 2, "rank": 2}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    dropped = strategy.rounds[1].dropped
    assert len(dropped) == 2 and "beyond the reply's rank 2" in dropped[0] and "differs from" in dropped[1]
    expected = aggregate(Replies(global_, good, [10.0, 10.0]), server.structure(), aggregation="product")
    out = from_record(arrays, metas(global_))
    for name in global_:
        torch.testing.assert_close(out[name], global_[name] + expected[name])
