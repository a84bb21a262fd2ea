"""Adapter protocol: what is trained, frozen, sent; FFA-LoRA's shared A and exact aggregation."""

from __future__ import annotations

import pytest
import torch

from fed.adapters import AdapterSpec, Aggregation, build
from strategies.kinds import Replies, aggregate
from tests.helpers import HEAD, MATRIX, _dense, _layers, client_deltas, make, tiny_bert


def merge(adapter, deltas, weights):
    return aggregate(Replies(adapter.sent_state(), deltas, weights), adapter.structure())


@pytest.mark.parametrize("row", MATRIX)
def test_every_trained_tensor_is_sent_and_nothing_frozen_is(row):
    """The only untrained tensors that travel are server-owned (set by the server, read by clients)."""
    adapter = make(row)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.names(trainable=True))
    kinds = adapter.aggregation_of()
    assert set(adapter.names(sent=True)) - trainable == {n for n, k in kinds.items() if k == Aggregation.ALLOCATION}
    assert set(HEAD) <= trainable
    assert set(adapter.aggregation_of()) == set(adapter.names(sent=True))


def test_lora_trains_and_sends_both_factors_and_the_head():
    sent = make("lora").names(sent=True)
    assert len([n for n in sent if n.endswith("lora_A.weight")]) == 4  # 2 layers x (query, value)
    assert len([n for n in sent if n.endswith("lora_B.weight")]) == 4


def test_ffa_lora_freezes_a_and_never_sends_it():
    sent = make("ffa-lora").names(sent=True)
    assert not any("lora_A" in n for n in sent)
    assert len([n for n in sent if n.endswith("lora_B.weight")]) == 4


def test_moslora_sends_mixers_and_with_frozen_a_only_mixer_and_b():
    full, frozen = make("moslora").names(sent=True), make("moslora-frozen-a").names(sent=True)
    assert len([n for n in full if n.endswith("lora_AB.weight")]) == 4
    assert len([n for n in full if n.endswith("lora_A.weight")]) == 4
    assert not any(n.endswith("lora_A.weight") for n in frozen)
    assert {n.rsplit(".", 2)[-2] for n in frozen if "lora" in n} == {"lora_AB", "lora_B"}


@pytest.mark.parametrize("row", MATRIX)
def test_zero_b_leaves_the_model_unchanged(row, batch):
    base, adapted = tiny_bert(), make(row).model
    with torch.no_grad():
        adapted.classifier.load_state_dict(base.classifier.state_dict())
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(base(**args).logits, adapted(**args).logits)


def test_moslora_mixer_is_seeded_kaiming_not_zero():
    """A zero mixer never trains (B = 0 and M = 0 zero every gradient); the paper's init is Kaiming-uniform."""
    one, two = make("moslora"), make("moslora", model_seed=1)
    mixers = [n for n in one.names() if n.endswith("lora_AB.weight")]
    for name in mixers:
        m = one.state([name])[name]
        assert torch.count_nonzero(m) == m.numel() and float(m.abs().max()) <= 0.5 + 1e-6  # bound 1/sqrt(r)
        torch.testing.assert_close(m, two.state([name])[name], rtol=0, atol=0)
    assert not torch.equal(one.state(mixers[:1])[mixers[0]], one.state(mixers[1:2])[mixers[1]])


def test_frozen_factors_are_identical_on_independently_built_clients_and_seed_dependent():
    for row in ("ffa-lora", "moslora-frozen-a"):
        one, two = make(row, seed=7, model_seed=0), make(row, seed=7, model_seed=1)
        for n in one.names(trainable=False):
            torch.testing.assert_close(one.state([n])[n], two.state([n])[n], rtol=0, atol=0)
        assert one.fingerprint() == two.fingerprint()
        assert make(row, seed=8).fingerprint() != one.fingerprint()


def test_unknown_targets_and_kinds_are_named():
    with pytest.raises(ValueError, match=r"\['qury'\].*Linear leaves: .*query"):
        build(tiny_bert(), AdapterSpec(kind="lora", rank=2, alpha=2, targets=("qury",)), 0)
    with pytest.raises(ValueError, match="unknown adapter kind 'dora'; known: .*ffa-lora.*roselora"):
        build(tiny_bert(), AdapterSpec(kind="dora", rank=2, alpha=2, targets=("query",)), 0)


@pytest.mark.parametrize("row", ["ffa-lora", "moslora-frozen-a"])
def test_aggregate_of_deltas_equals_mean_of_client_products(row):
    """Exactness: the aggregated adapter's s·B·(M)·A is the example-weighted mean of the clients', per layer."""
    server = make(row)
    global_ = server.sent_state()
    deltas, weights = client_deltas(server, 3), [10.0, 30.0, 60.0]
    merged = merge(server, deltas, weights)
    for path, layer in _layers(server):
        per_client = [_dense(layer, path, {n: global_[n] + d[n] for n in d}) for d in deltas]
        expected = sum(w * p for w, p in zip(weights, per_client)) / sum(weights)
        got = _dense(layer, path, {n: global_[n] + merged[n] for n in merged})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ["lora", "moslora"])
def test_the_exactness_check_fails_where_both_sides_of_a_product_move(row):
    """The same check fails for LoRA (factor means) and full MoSLoRA (rank-r truncation of a rank-2r mean)."""
    server = make(row)
    global_ = server.sent_state()
    deltas = client_deltas(server, 2)
    merged = merge(server, deltas, [1.0, 1.0])
    path, layer = _layers(server)[0]
    expected = sum(_dense(layer, path, {n: global_[n] + d[n] for n in d}) for d in deltas) / 2
    assert not torch.allclose(_dense(layer, path, {n: global_[n] + merged[n] for n in merged}), expected, atol=1e-3)


def test_moslora_product_aggregation_is_the_best_rank_r_approximation_of_the_mean():
    """Independent reference: the mean of the clients' dense updates, truncated by SVD (Eckart-Young)."""
    server = make("moslora")
    global_ = server.sent_state()
    deltas, weights = client_deltas(server, 3, scale=0.5), [1.0, 2.0, 3.0]
    merged = merge(server, deltas, weights)
    for path, layer in _layers(server):
        mean = sum(w * _dense(layer, path, {n: global_[n] + d[n] for n in d}) for w, d in zip(weights, deltas)) / 6
        u, s, vh = torch.linalg.svd(mean.double())
        best = (u[:, :4] * s[:4]) @ vh[:4]
        got = _dense(layer, path, {n: global_[n] + merged[n] for n in merged})
        torch.testing.assert_close(got.double(), best, rtol=1e-4, atol=1e-5)
        mixer = (global_[f"{path}.lora_AB.weight"] + merged[f"{path}.lora_AB.weight"]).double()
        torch.testing.assert_close(mixer @ mixer.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_every_sent_tensor_has_an_aggregation_kind():
    assert set(make("lora").aggregation_of().values()) == {Aggregation.MEAN}
    assert set(make("moslora").aggregation_of().values()) == {Aggregation.MEAN, Aggregation.PRODUCT}
