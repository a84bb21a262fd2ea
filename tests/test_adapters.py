"""Adapter protocol: what is trained, frozen, sent; FFA-LoRA's shared A and exact aggregation."""

from __future__ import annotations

import pytest
import torch

from fed.adapters import AdapterSpec, Aggregation, build
from fed.adapters.lora import LoraLinear
from strategies.rules import aggregate
from tests.conftest import tiny_bert

HEAD = ("classifier.weight", "classifier.bias")


def _build(kind: str, seed: int = 7, model_seed: int = 0):
    return build(tiny_bert(model_seed), AdapterSpec(kind=kind, rank=4, alpha=8.0, targets=("query", "value")),
                 seed, head=HEAD)


def test_lora_trains_and_sends_both_factors_and_the_head():
    adapter = _build("lora")
    sent = adapter.names(sent=True)
    assert len([n for n in sent if n.endswith("lora_A.weight")]) == 4  # 2 layers x (query, value)
    assert len([n for n in sent if n.endswith("lora_B.weight")]) == 4
    assert set(HEAD) <= set(sent)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.names(trainable=True)) == set(sent)


def test_ffa_lora_freezes_a_and_never_sends_it():
    adapter = _build("ffa-lora")
    sent = adapter.names(sent=True)
    assert not any("lora_A" in n for n in sent)
    assert len([n for n in sent if n.endswith("lora_B.weight")]) == 4
    params = dict(adapter.model.named_parameters())
    assert all(not params[n].requires_grad for n in adapter.names(trainable=False))
    assert {n for n, p in params.items() if p.requires_grad} == set(sent)


def test_zero_b_leaves_the_model_unchanged(batch):
    base, adapted = tiny_bert(), _build("lora").model
    with torch.no_grad():
        adapted.classifier.load_state_dict(base.classifier.state_dict())
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(base(**args).logits, adapted(**args).logits)


def test_ffa_a_is_identical_on_independently_built_clients_and_seed_dependent():
    one, two = _build("ffa-lora", seed=7, model_seed=0), _build("ffa-lora", seed=7, model_seed=1)
    frozen = one.names(trainable=False)
    for n in frozen:
        torch.testing.assert_close(one.state([n])[n], two.state([n])[n], rtol=0, atol=0)
    assert one.fingerprint() == two.fingerprint()
    assert _build("ffa-lora", seed=8).fingerprint() != one.fingerprint()


def test_unknown_targets_and_kinds_are_named():
    with pytest.raises(ValueError, match=r"\['qury'\].*Linear leaves: .*query"):
        build(tiny_bert(), AdapterSpec(kind="lora", rank=2, alpha=2, targets=("qury",)), 0)
    with pytest.raises(ValueError, match="unknown adapter kind 'dora'; known: lora, ffa-lora"):
        build(tiny_bert(), AdapterSpec(kind="dora", rank=2, alpha=2, targets=("query",)), 0)


def test_ffa_aggregate_of_b_deltas_times_a_equals_mean_of_client_products():
    """Exactness: s·mean_k(B_k)·A == mean_k(s·B_k·A), weighted by examples, for every adapted layer."""
    server = _build("ffa-lora")
    g = torch.Generator().manual_seed(0)
    names = server.names(sent=True)
    global_ = server.sent_state()
    deltas = [{n: torch.randn(global_[n].shape, generator=g) for n in names} for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    merged = aggregate(deltas, weights, server.aggregation_of())
    layers = [m for m in server.model.modules() if isinstance(m, LoraLinear)]
    paths = {id(m): p for p, m in server.model.named_modules() if isinstance(m, LoraLinear)}
    for layer in layers:
        key = f"{paths[id(layer)]}.lora_B.weight"
        a = layer.lora_A.weight.detach()
        per_client = [layer.scaling * (global_[key] + d[key]) @ a for d in deltas]
        expected = sum(w * p for w, p in zip(weights, per_client)) / sum(weights)
        got = layer.scaling * (global_[key] + merged[key]) @ a
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lora_factor_averaging_is_not_exact_which_the_ffa_test_would_catch():
    """The same check fails for LoRA (both factors move): the exactness test above can fail."""
    server = _build("lora")
    g = torch.Generator().manual_seed(0)
    global_ = server.sent_state()
    deltas = [{n: torch.randn(t.shape, generator=g) for n, t in global_.items()} for _ in range(2)]
    merged = aggregate(deltas, [1.0, 1.0], server.aggregation_of())
    path = next(p for p, m in server.model.named_modules() if isinstance(m, LoraLinear))
    a, b = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
    products = [(global_[b] + d[b]) @ (global_[a] + d[a]) for d in deltas]
    assert not torch.allclose((global_[b] + merged[b]) @ (global_[a] + merged[a]), sum(products) / 2, atol=1e-3)


def test_every_sent_tensor_has_an_aggregation_kind():
    for kind in ("lora", "ffa-lora"):
        adapter = _build(kind)
        assert set(adapter.aggregation_of()) == set(adapter.names(sent=True))
        assert set(adapter.aggregation_of().values()) == {Aggregation.MEAN}
