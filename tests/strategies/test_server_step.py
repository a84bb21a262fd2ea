"""A server step of s on product-aggregated families moves the dense update by s times the aggregated change,
and MoSLoRA's re-factorisation keeps A at its scale: checked against dense products computed here."""

from __future__ import annotations

import pytest
import torch

from strategies.kinds import Replies, aggregate, apply_update
from tests.helpers import _dense, _layers, make, randomise

ROWS = [("lora", "product"), ("moslora", "mean"), ("moslora-frozen-a", "mean")]


def _rank_preserving_deltas(adapter, count: int, seed: int = 1):
    """Client deltas that leave A alone: every client's product, their mean and any step between the
    global and that mean keep the row space of A (rank <= r), so the re-factorisation is exact."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            n: (torch.zeros_like(t) if n.endswith("lora_A.weight") else 0.3 * torch.randn(t.shape, generator=g))
            for n, t in adapter.sent_state().items()
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("row, aggregation", ROWS, ids=[r for r, _ in ROWS])
@pytest.mark.parametrize("step", [0.25, 0.5, 1.0])
def test_a_server_step_moves_the_dense_update_by_step_times_the_aggregated_change(row, aggregation, step):
    server = make(row)
    randomise(server, 0.3)
    global_ = server.sent_state()
    deltas, weights = _rank_preserving_deltas(server, 3), [5.0, 1.0, 2.0]
    merged = aggregate(Replies(global_, deltas, weights, step=step), server.structure(), aggregation=aggregation)
    new = apply_update(global_, merged, step)
    for path, layer in _layers(server):
        old = _dense(layer, path, global_).double()
        clients = [_dense(layer, path, {n: global_[n] + d[n] for n in d}).double() for d in deltas]
        mean = sum(w * c for w, c in zip(weights, clients)) / sum(weights)
        expected = old + step * (mean - old)
        got = _dense(layer, path, new).double()
        assert float((got - expected).norm() / (expected - old).norm()) < 1e-5, path


def test_moslora_refactorisation_keeps_a_at_its_row_scale():
    server = make("moslora")
    randomise(server, 0.3)
    global_ = server.sent_state()
    g = torch.Generator().manual_seed(2)
    deltas = [{n: 0.05 * torch.randn(t.shape, generator=g) for n, t in global_.items()} for _ in range(3)]
    merged = aggregate(Replies(global_, deltas, [1.0, 2.0, 3.0]), server.structure())
    for path, _ in _layers(server):
        name = f"{path}.lora_A.weight"
        before = torch.linalg.norm(global_[name].double(), dim=1)
        after = torch.linalg.norm((global_[name] + merged[name]).double(), dim=1)
        scale = float(before.pow(2).mean().sqrt())
        torch.testing.assert_close(after, torch.full_like(after, scale), rtol=1e-5, atol=0.0)


def test_a_moslora_component_with_zero_singular_value_keeps_a_live_a_row(batch):
    server = make("moslora")  # B = 0: the global product, and so every singular value, is 0
    global_ = server.sent_state()
    zero = [{n: torch.zeros_like(t) for n, t in global_.items()} for _ in range(2)]
    merged = aggregate(Replies(global_, zero, [1.0, 1.0]), server.structure())
    server.load(apply_update(global_, merged, 1.0))
    params = dict(server.model.named_parameters())
    server.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.pow(2).sum().backward()
    for path, _ in _layers(server):
        a = params[f"{path}.lora_A.weight"].detach()
        assert bool((torch.linalg.norm(a, dim=1) > 0.1).all()), path  # live rows (Kaiming scale ~0.5)
        grad_b = params[f"{path}.lora_B.weight"].grad
        assert grad_b is not None and bool((torch.linalg.norm(grad_b, dim=0) > 0).all()), path
