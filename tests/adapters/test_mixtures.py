"""Mixture adapters (MoLE, MoR): routing, the no-token expert under DP, usage-weighted aggregation."""

from __future__ import annotations

import pytest
import torch

from fed.adapters import Adapter, build
from fed.adapters.families.mole import BlockRouter, MoleLinear
from fed.privacy.dpsgd import DpStepper, per_sample_module
from fed.privacy.mechanism import DpSettings
from fed.tasks import Classification
from fed.train import per_example_losses
from strategies.kinds import Replies, aggregate, aggregation_error
from tests.helpers import HEAD, _naive_grads, _NoTokenizer, client_deltas, make, randomise, spec, tiny_bert


def _mole(experts: int = 3):
    adapter = build(tiny_bert(), spec("mole", ("query", "value"), experts=experts), seed=3, head=HEAD)
    randomise(adapter, 0.3)
    return adapter


def _starve_last_expert(adapter) -> None:
    """Router rows (w, -w, ..., 0): one of the first two logits is >= 0 = the last one's, so it never wins."""
    with torch.no_grad():
        for router in (m for m in adapter.model.modules() if isinstance(m, BlockRouter)):
            w = router.gate.weight
            w[1] = -w[0] * 5
            w[0] = w[0] * 5
            w[-1] = 0.0


def test_one_router_per_block_shared_by_its_projections(batch):
    adapter = _mole()
    routers = [n for n in adapter.names(sent=True) if ".router." in n]
    assert routers == [f"bert.encoder.layer.{i}.attention.self.query.router.gate.weight" for i in range(2)]
    value = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.value")
    query = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(value, MoleLinear) and value._shared[0] is query.router
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counts = adapter.usage(batch["attention_mask"])
    assert len(counts) == 2 * 3 and sum(counts.values()) == 2 * int(batch["attention_mask"].sum())


def test_a_layer_called_before_its_blocks_router_is_refused():
    adapter = _mole()
    value = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.value")
    with pytest.raises(RuntimeError, match="did not run before this layer"):
        value(torch.randn(2, 3, 16))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_per_sample_gradients_with_an_expert_that_gets_no_token(mode, batch):
    """The starved expert has zero per-sample gradients (not missing ones), the rest match a per-example loop,
    and a DP step over the batch runs (Opacus raises on a trainable tensor without per-sample gradients)."""
    adapter = _mole()
    _starve_last_expert(adapter)
    task = Classification(_NoTokenizer(), 16)
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counts = adapter.usage(batch["attention_mask"])
    assert all(counts[f"bert.encoder.layer.{i}/2"] == 0 for i in range(2)) and sum(counts.values()) > 0
    reference = _naive_grads(adapter, task, batch)
    params = dict(adapter.model.named_parameters())
    if mode == "hooks":
        gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
        per_example_losses(adapter, task, gsm, batch)[1].sum().backward()
        for name in adapter.names(trainable=True):
            expected = torch.stack([r[name] for r in reference])
            torch.testing.assert_close(params[name].grad_sample, expected, rtol=1e-4, atol=1e-6)
            if ".experts.2." in name:
                assert torch.count_nonzero(params[name].grad_sample) == 0
        gsm._close()
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.05, num_examples=100, mode=mode)
    stepper = DpStepper(adapter.model, optimizer, dp)
    before = adapter.state(adapter.names(trainable=True))
    stepper.accumulate(per_example_losses(adapter, task, stepper.module, batch)[1], len(batch["input_ids"]))
    stepper.step()
    stepper.close()
    after = adapter.state(list(before))
    for name in before:  # no clipping at this bound: the update is the summed per-example gradient / 5
        torch.testing.assert_close(
            before[name] - after[name], sum(r[name] for r in reference) / 5, rtol=1e-4, atol=1e-6
        )


def test_balance_loss_under_dp_is_per_example(batch):
    """Example i's balance loss from the whole batch equals the one computed from example i alone."""
    adapter = _mole()
    adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    together = adapter.auxiliary_loss(batch["attention_mask"])
    for i in range(len(batch["input_ids"])):
        adapter.model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])
        alone = adapter.auxiliary_loss(batch["attention_mask"][i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def _skewed_usage_round(kind: str) -> tuple[Adapter, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Two clients (weights 100 and 1): the first routes 3 to expert 0, the second 1 to expert 0 and 2 to
    expert 1; nobody uses expert 2. Returns the server's adapter, the deltas and their aggregate."""
    server = make(kind)
    deltas = client_deltas(server, 2)
    slots = server.structure().slot_names
    usage = [
        {s: (3.0 if s.endswith("/0") else 0.0) for s in slots},
        {s: (1.0 if s.endswith("/0") else 2.0 if s.endswith("/1") else 0.0) for s in slots},
    ]
    return (
        server,
        deltas,
        aggregate(Replies(server.sent_state(), deltas, [100.0, 1.0], usage=usage), server.structure()),
    )


def test_experts_are_weighted_by_routed_tokens_and_an_unused_expert_keeps_its_value():
    server, deltas, merged = _skewed_usage_round("mole")
    name0 = "bert.encoder.layer.1.attention.self.value.experts.0.lora_B.weight"
    torch.testing.assert_close(merged[name0], 0.75 * deltas[0][name0] + 0.25 * deltas[1][name0])
    name1 = name0.replace("experts.0", "experts.1")
    torch.testing.assert_close(merged[name1], deltas[1][name1])
    assert torch.count_nonzero(merged[name0.replace("experts.0", "experts.2")]) == 0
    router = "bert.encoder.layer.1.attention.self.query.router.gate.weight"
    torch.testing.assert_close(merged[router], (100 * deltas[0][router] + deltas[1][router]) / 101)
    # Without counts (DP) experts fall back to the example weights.
    fallback = aggregate(Replies(server.sent_state(), deltas, [100.0, 1.0]), server.structure())
    torch.testing.assert_close(fallback[name1], (100 * deltas[0][name1] + deltas[1][name1]) / 101)


def test_mole_aggregation_error_uses_usage_weights_and_skips_unused_experts():
    """One client per expert: each expert's mean is that client's own, so usage-weighted merging is exact;
    with example weights (no counts) the same deltas mix inside every expert, and the error says so."""
    server = make("mole")
    deltas = client_deltas(server, 3)
    slots = server.structure().slot_names
    usage = [{s: float(s.endswith(f"/{k}")) for s in slots} for k in range(2)] + [{s: 0.0 for s in slots}]
    keep = [n for n in server.names(sent=True) if ".experts." in n]
    deltas = [{n: (d[n] if n in keep else torch.zeros_like(d[n])) for n in d} for d in deltas]
    replies = Replies(server.sent_state(), deltas, [1.0, 1.0, 1.0], usage=usage)
    assert aggregation_error(server.products, replies, aggregate(replies, server.structure())) < 1e-6
    plain = Replies(server.sent_state(), deltas, [1.0, 1.0, 1.0])
    assert aggregation_error(server.products, plain, aggregate(plain, server.structure())) > 1e-2


def test_mor_gauge_renormalisation_keeps_the_function_and_centres_the_scales(batch):
    """Scales drifted off 1 (as after a round): renormalising leaves the logits as they were, and every
    column of each scale table then averages 1 over the experts."""
    adapter = build(tiny_bert(), spec("mor", ("query", "value")), seed=3, head=HEAD)
    randomise(adapter, 0.3)
    params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for name in adapter.names(sent=True):
            if ".scale_" in name:
                params[name].add_(1.0)  # scales near 1 + noise, columns far from mean 1
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    adapter.model.eval()
    with torch.no_grad():
        before = adapter.model(**args).logits
        products_before = adapter.products({})
        fixed = adapter.after_aggregate(adapter.sent_state(), adapter.sent_state())
        adapter.load(fixed)
        after = adapter.model(**args).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for name, (dense, _) in adapter.products({}).items():
        torch.testing.assert_close(dense, products_before[name][0], rtol=1e-4, atol=1e-6)
    for name in (n for n in fixed if ".scale_" in n):
        torch.testing.assert_close(fixed[name].mean(0), torch.ones(fixed[name].shape[1]), rtol=1e-5, atol=1e-5)


def test_mor_products_are_the_per_expert_updates_of_the_forward(batch):
    """Independent check of MoR's products against its forward: with a zero router the gates are uniform."""
    adapter = build(tiny_bert(), spec("mor", ("query",)), seed=3)
    randomise(adapter, 0.3)
    path = "bert.encoder.layer.0.attention.self.query"
    layer = adapter.model.get_submodule(path)
    x = torch.randn(2, 3, 16)
    dense = adapter.products({})
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform gates: the update is the mean of the experts' D_k x
        expected = sum(x @ dense[f"{path}.experts.{k}"][0].T for k in range(3)) / 3
        torch.testing.assert_close(layer(x) - layer.base_layer(x), expected, rtol=1e-4, atol=1e-6)


def test_mor_scale_rows_are_weighted_by_each_clients_soft_usage_of_that_expert():
    _, deltas, merged = _skewed_usage_round("mor")
    for name in (n for n in merged if ".scale_" in n):
        torch.testing.assert_close(merged[name][0], 0.75 * deltas[0][name][0] + 0.25 * deltas[1][name][0])
        torch.testing.assert_close(merged[name][1], deltas[1][name][1])
        assert torch.count_nonzero(merged[name][2]) == 0  # nobody used expert 2: its scales keep their value
    shared = next(n for n in merged if n.endswith("lora_A.weight"))
    torch.testing.assert_close(merged[shared], (100 * deltas[0][shared] + deltas[1][shared]) / 101)


def test_mor_soft_usage_is_the_router_probability_mass_of_the_real_tokens(batch):
    adapter = build(tiny_bert(), spec("mor", ("query",)), seed=3, head=HEAD)
    randomise(adapter, 0.3)
    inputs = {}
    for path, module in adapter.model.named_modules():
        if path.endswith("query"):
            module.register_forward_hook(lambda m, args, out, path=path: inputs.__setitem__(path, args[0]))
    with torch.no_grad():
        adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    usage, mask = adapter.usage(batch["attention_mask"]), batch["attention_mask"].bool()
    assert len(usage) == 2 * 3
    for path, x in inputs.items():
        layer = adapter.model.get_submodule(path)
        expected = torch.softmax(x[mask] @ layer.router.weight.T, dim=-1).sum(0)
        got = torch.tensor([usage[f"{path}/{i}"] for i in range(3)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert float(got.sum()) == pytest.approx(int(mask.sum()), rel=1e-5)
