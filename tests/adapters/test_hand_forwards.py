"""Mixture forwards and MoLE's balance loss hand-computed from the raw weights (no adapter code in the reference)."""

from __future__ import annotations

import torch

from fed.adapters import build
from fed.adapters.families.mole import MoleLinear
from fed.adapters.families.mor import MorLinear
from fed.tasks import Classification
from fed.train import per_example_losses
from tests.helpers import HEAD, _NoTokenizer, randomise, spec, tiny_bert


def _capture(model, kind: type) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run hooks that record every ``kind`` layer's input and output of the next forward."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, module in model.named_modules():
        if isinstance(module, kind):
            module.register_forward_hook(
                lambda _m, args, out, path=path: seen.__setitem__(path, (args[0].detach(), out.detach()))
            )
    return seen


def _adapter(row: str, targets=("query", "value"), **extra):
    adapter = build(tiny_bert(), spec(row, targets, experts=3, **extra), seed=3, head=HEAD)
    randomise(adapter, 0.3)
    with torch.no_grad():  # a router far from uniform, so the routing matters
        for name, p in adapter.model.named_parameters():
            if "router" in name:
                p.mul_(20.0)
    return adapter


def _weights(adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in adapter.model.named_parameters()}


def test_mole_forward_equals_a_hand_computed_top1_mixture(batch):
    adapter = _adapter("mole")
    seen = _capture(adapter.model, MoleLinear)
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    w = _weights(adapter)
    scaling = 8.0 / 4
    for path, (x, out) in seen.items():
        block = path.rsplit(".attention", 1)[0]
        router_input = seen[f"{block}.attention.self.query"][0].double()  # the block's first projection routes
        probs = torch.softmax(router_input @ w[f"{block}.attention.self.query.router.gate.weight"].T, -1)
        top = probs.argmax(-1)
        x = x.double()
        expected = x @ w[f"{path}.base_layer.weight"].T + w[f"{path}.base_layer.bias"]
        for k in range(3):
            a, b = w[f"{path}.experts.{k}.lora_A.weight"], w[f"{path}.experts.{k}.lora_B.weight"]
            chosen = (top == k).double().unsqueeze(-1) * probs[..., k : k + 1]
            expected = expected + scaling * chosen * (x @ a.T @ b.T)
        assert int(top.unique().numel()) > 1  # more than one expert used: the routing is exercised
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_mor_forward_with_a_non_zero_router_equals_a_hand_computed_soft_mixture(batch):
    adapter = _adapter("mor")
    with torch.no_grad():  # scale tables away from 1, so every expert differs
        for name, p in adapter.model.named_parameters():
            if "scale_" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    seen = _capture(adapter.model, MorLinear)
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    w = _weights(adapter)
    for path, (x, out) in seen.items():
        x = x.double()
        gates = torch.softmax(x @ w[f"{path}.router.weight"].T, -1)
        assert float(gates.max(-1).values.mean()) > 0.6  # far from the uniform 1/3
        expected = x @ w[f"{path}.base_layer.weight"].T + w[f"{path}.base_layer.bias"]
        a, b = w[f"{path}.lora_A.weight"], w[f"{path}.lora_B.weight"]
        for i in range(3):
            d_i = torch.diag(w[f"{path}.scale_B.weight"][i]) @ b @ torch.diag(w[f"{path}.scale_A.weight"][i]) @ a
            expected = expected + 2.0 * gates[..., i : i + 1] * (x @ d_i.T)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def _router_stats(adapter, batch):
    """Per router, its probabilities and top-1 choices over the batch, from the raw gate weights."""
    seen = _capture(adapter.model, MoleLinear)
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    w = _weights(adapter)
    stats = []
    for path, (x, _) in seen.items():
        if path.endswith(".query"):
            probs = torch.softmax(x.double() @ w[f"{path}.router.gate.weight"].T, -1)
            stats.append((probs, torch.nn.functional.one_hot(probs.argmax(-1), 3).double()))
    return stats


def test_mole_balance_loss_is_batch_level_without_dp(batch):
    adapter = _adapter("mole", balance=0.5)
    mask = batch["attention_mask"].double().unsqueeze(-1)
    expected = 0.0
    for probs, onehot in _router_stats(adapter, batch):
        f, p = (onehot * mask).sum((0, 1)) / mask.sum(), (probs * mask).sum((0, 1)) / mask.sum()
        expected += 0.5 * 3 * float((f * p).sum()) / 2  # weight · K Σ_j f_j P_j, mean over the 2 routers
    task = Classification(_NoTokenizer(), 16)
    loss, objective = per_example_losses(adapter, task, adapter.model, batch, private=False)
    torch.testing.assert_close((objective - loss).double(), torch.full_like(loss, expected).double())


def test_mole_balance_loss_is_per_example_under_dp(batch):
    adapter = _adapter("mole", balance=0.5)
    mask = batch["attention_mask"].double().unsqueeze(-1)
    expected = torch.zeros(len(batch["input_ids"]), dtype=torch.float64)
    for probs, onehot in _router_stats(adapter, batch):
        tokens = mask.sum(1)
        f, p = (onehot * mask).sum(1) / tokens, (probs * mask).sum(1) / tokens
        expected += 0.5 * 3 * (f * p).sum(-1) / 2
    task = Classification(_NoTokenizer(), 16)
    loss, objective = per_example_losses(adapter, task, adapter.model, batch, private=True)
    torch.testing.assert_close((objective - loss).double(), expected)
