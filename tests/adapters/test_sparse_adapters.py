"""RoseLoRA (line-sparse factors, masked aggregation, DP-safe importance) and Dynamic LoRA (rank reallocation)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fed.adapters import Clock, Structure, build
from fed.adapters.base import Aggregation, MaskedParams
from fed.adapters.families.dynamic_lora import DynamicLinear, allocate_ranks, reallocate
from fed.adapters.families.roselora import BETA, RoseLinear, keep_fraction, line_budget
from fed.config import DPConfig, StrategyConfig
from fed.privacy.book import LedgerBook
from fed.privacy.dpsgd import DpStepper
from fed.privacy.mechanism import DpSettings
from fed.tasks import Classification
from fed.wire import MASK_SUFFIX, PayloadError, from_record, from_sparse_record, metas, to_record, to_sparse_record
from strategies.build import influence_stages, reply_stages
from strategies.core import AdapterStrategy, ServerUpdate
from strategies.kinds import Replies, aggregate
from strategies.pipeline import AdapterModel
from strategies.validation import ReplyRules
from tests.helpers import HEAD, _Encoded, _NoTokenizer, _Rows, randomise, reply_from, spec, tiny_bert

LATE = Clock(round_=5, rounds=5, steps=1)
"""A clock at the end of the run: the schedule is at ``keep_ratio``."""


def _rose(keep: float = 0.25, seed: int = 3):
    adapter = build(tiny_bert(), spec("roselora", ("query", "value"), keep_ratio=keep), seed=seed, head=HEAD)
    randomise(adapter, 0.3)
    return adapter


def _top_k_reference(scores: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """The k largest of every line by a full sort (an independent top-k)."""
    lines = scores if axis == 1 else scores.T
    mask = torch.zeros(lines.shape, dtype=torch.bool)
    for i, line in enumerate(lines):
        mask[i, torch.argsort(line, descending=True, stable=True)[:k]] = True
    return mask if axis == 1 else mask.T


def test_cubic_schedule_and_budgets():
    assert keep_fraction(0.5, 10, 0.1) == 1.0  # dense warm-up (first 10% of the run)
    assert keep_fraction(4.5, 10, 0.1) == pytest.approx(0.1 + 0.9 * (1 - (4.5 - 1) / 7) ** 3)
    assert keep_fraction(8.0, 10, 0.1) == keep_fraction(10, 10, 0.1) == 0.1
    assert line_budget(384, 0.1) == 39 and line_budget(16, 0.01) == 1
    adapter = _rose(keep=0.1)  # MiniLM-free tiny BERT: A is (r, 16), B is (16, r)
    widths = {n: adapter.model.get_parameter(n).shape[axis] for n, axis in adapter.structure().lines.items()}
    assert adapter.round_budgets(2, 2) == {n: line_budget(w, 0.1) for n, w in widths.items()}
    assert adapter.round_budgets(1, 10) == widths  # round 1 of 10 ends inside the dense warm-up


def test_pruning_keeps_each_lines_top_k_by_ema_of_w_times_its_step():
    """After one 'step' (a parameter change), each row of A and column of B keeps exactly its budget: the
    largest (1-β)·|w·Δw|, computed here independently; everything else is zero."""
    adapter = _rose()
    layer = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    adapter.begin_round(LATE)
    before = {n: p.detach().clone() for n, p in layer._factors().items()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer._factors().values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    after = {n: p.detach().clone() for n, p in layer._factors().items()}
    adapter.after_step()
    for name, axis in (("lora_A.weight", 1), ("lora_B.weight", 0)):
        k = line_budget(after[name].shape[axis], 0.25)
        expected = _top_k_reference((1 - BETA) * (after[name] * (after[name] - before[name])).abs(), axis, k)
        assert torch.equal(layer.masks()[name], expected)
        assert (expected.sum(axis) == k).all()
        torch.testing.assert_close(layer._factors()[name].detach(), after[name] * expected, rtol=0, atol=0)


def test_importance_under_dp_reads_the_released_parameters_only_never_a_gradient(batch):
    """A real DP step leaves the raw per-example gradients (grad_sample) and the noised gradient on the
    parameters. A second adapter that only loads the released parameters (no gradient at all) and a third
    whose gradients are replaced by garbage prune to the same masks and values: the importance is a
    function of what DP-SGD released, so it is post-processing."""
    task = Classification(_NoTokenizer(), 16)
    dp_side = _rose()
    start = dp_side.sent_state()
    dp_side.begin_round(LATE)
    optimizer = torch.optim.AdamW(dp_side.trainable_parameters(), lr=0.05)
    stepper = DpStepper(
        dp_side.model,
        optimizer,
        DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05, num_examples=100),
    )
    stepper.accumulate(task.per_example_loss(stepper.module, batch), len(batch["input_ids"]))
    stepper.optimizer.step()  # not stepper.step(), which also clears them: the raw gradients stay attached
    released = dp_side.sent_state()
    params = dict(dp_side.model.named_parameters())
    assert all(params[n].grad_sample is not None and params[n].grad is not None for n in dp_side.masks())
    dp_side.after_step()  # with the raw per-example gradients still attached
    stepper.close()
    for tamper in (False, True):
        other = _rose()
        other.load(start)
        other.begin_round(LATE)
        other.load(released)
        named = dict(other.model.named_parameters())
        if tamper:
            for n in other.masks():
                named[n].grad = torch.randn(named[n].shape) * 1e3
                named[n].grad_sample = torch.randn(5, *named[n].shape) * 1e3
        other.after_step()
        for name, mask in dp_side.masks().items():
            assert torch.equal(other.masks()[name], mask)
            torch.testing.assert_close(named[name].detach(), params[name].detach(), rtol=0, atol=0)


def test_a_dp_round_ends_at_the_rounds_budget_on_every_line(batch):
    """``fed.train`` runs the step hooks after each noised step: a DP round that ends the run leaves every
    row of A and column of B at exactly ``keep_ratio`` of its width, zeros elsewhere."""
    from fed.train import train_round

    adapter = _rose(keep=0.25)
    adapter.begin_round(Clock(round_=2, rounds=2, steps=3))
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.6, num_examples=5)
    train_round(
        adapter,
        _Encoded(_NoTokenizer(), 16),
        _Rows(batch),
        steps=3,
        batch_size=5,
        lr=0.01,
        weight_decay=0.0,
        dp=dp,
        gen=torch.Generator(),
    )
    params = dict(adapter.model.named_parameters())
    for name, mask in adapter.masks().items():
        axis = 1 if name.endswith("lora_A.weight") else 0
        assert (mask.sum(axis) == line_budget(mask.shape[axis], 0.25)).all()
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0


def test_sparse_wire_round_trip_and_bytes():
    """Kept deltas + bit masks decode to the dense delta (``-global`` where the client pruned), and at keep 0.1
    a 384-wide factor costs well under a third of its dense record."""
    g = torch.Generator().manual_seed(0)
    global_ = {
        "l.lora_A.weight": torch.randn(8, 384, generator=g),
        "l.lora_B.weight": torch.randn(384, 8, generator=g),
        "head": torch.randn(2, 8, generator=g),
    }
    lines = {"l.lora_A.weight": 1, "l.lora_B.weight": 0}
    budgets = {n: 39 for n in lines}
    masks = {n: _top_k_reference(torch.rand(global_[n].shape, generator=g), a, 39) for n, a in lines.items()}
    delta = {n: torch.randn(t.shape, generator=g) for n, t in global_.items()}
    record = to_sparse_record(delta, masks, lines)
    assert record[f"l.lora_A.weight{MASK_SUFFIX}"].dtype == "uint8"
    decoded, kept = from_sparse_record(record, metas(global_), global_, lines, budgets)
    for name in lines:
        assert torch.equal(kept[name], masks[name])
        torch.testing.assert_close(decoded[name], torch.where(masks[name], delta[name], -global_[name]))
    torch.testing.assert_close(decoded["head"], delta["head"])
    sparse_bytes = sum(len(record[k].data) for k in record if k != "head")
    dense_bytes = sum(len(to_record(delta)[n].data) for n in lines)
    assert sparse_bytes < dense_bytes / 3


def _forged(values: torch.Tensor, bits: np.ndarray):
    return to_record({"a": values, f"a{MASK_SUFFIX}": torch.from_numpy(bits)})


def test_sparse_wire_refuses_masks_that_break_the_budget():
    """Values shaped for the budget but a mask that keeps more per line, or sets padding bits: dropped."""
    global_, lines = {"a": torch.zeros(2, 12)}, {"a": 1}  # 12 entries in 2 bytes: the last 4 bits are padding
    values = torch.ones(2, 3)
    mask = np.zeros((2, 12), dtype=bool)
    mask[:, :4] = True
    with pytest.raises(PayloadError, match=r"lines keep \[4\] entries; this round's budget is 3"):
        from_sparse_record(_forged(values, np.packbits(mask, axis=1)), metas(global_), global_, lines, {"a": 3})
    mask[:, 3] = False
    bits = np.packbits(mask, axis=1)
    bits[:, 1] |= 1  # a padding bit
    with pytest.raises(PayloadError, match="mask bits set beyond the width 12"):
        from_sparse_record(_forged(values, bits), metas(global_), global_, lines, {"a": 3})
    with pytest.raises(PayloadError, match="a: shape"):  # values for another budget
        from_sparse_record(
            _forged(torch.ones(2, 4), np.packbits(mask, axis=1)), metas(global_), global_, lines, {"a": 3}
        )
    decoded, _ = from_sparse_record(
        _forged(values, np.packbits(mask, axis=1)), metas(global_), global_, lines, {"a": 3}
    )
    assert int(decoded["a"].count_nonzero()) == 6


def test_masked_mean_is_the_mean_over_the_clients_that_kept_each_entry_then_the_line_budget():
    g = torch.Generator().manual_seed(2)
    global_ = {"A": torch.randn(3, 10, generator=g), "B": torch.randn(10, 3, generator=g)}
    structure = Structure(
        {n: Aggregation.MASKED for n in global_}, rules=((("A",), MaskedParams(1)), (("B",), MaskedParams(0)))
    )
    weights = [1.0, 2.0, 3.0]
    masks = [
        {n: _top_k_reference(torch.rand(t.shape, generator=g), structure.lines[n], 4) for n, t in global_.items()}
        for _ in weights
    ]
    deltas = [{n: torch.where(m[n], torch.randn(t.shape, generator=g), -t) for n, t in global_.items()} for m in masks]
    merged = aggregate(Replies(global_, deltas, weights, masks=masks), structure)
    for name, axis in structure.lines.items():
        expected = torch.zeros_like(global_[name])
        for idx in itertools.product(*(range(s) for s in global_[name].shape)):
            kept = [(w, global_[name][idx] + d[name][idx]) for w, d, m in zip(weights, deltas, masks) if m[name][idx]]
            if kept:
                expected[idx] = sum(w * v for w, v in kept) / sum(w for w, _ in kept)
        expected = expected * _top_k_reference(expected.abs(), axis, 4)
        torch.testing.assert_close(global_[name] + merged[name], expected, rtol=1e-5, atol=1e-6)


def _sparse_reply(record, fingerprint: int, round_: int):
    node = next(_NODES)  # its own client: a partition id binds to the first node that names it
    msg = reply_from(
        node,
        None,
        {
            "partition-id": node,
            "round": round_,
            "num-examples": 50,
            "steps": 3,
            "fingerprint": fingerprint,
            "train_loss": 0.5,
        },
    )
    msg.content["arrays"] = record
    return msg


_NODES = itertools.count(500)


def test_the_row_and_column_budget_holds_after_every_round_through_the_strategy(flower_identity):
    """Three rounds of the server on replies encoded as clients encode them (their own masks, each at the
    round's budget): after every round every row of A and column of B has at most the budget's non-zeros,
    and a reply over the budget is dropped."""
    server = _rose(keep=0.1)
    rounds, global_ = 3, server.sent_state()
    shapes = {n: m.shape for n, m in metas(global_).items()}
    structure = server.structure()
    model = AdapterModel(metas(global_), structure, server.products)
    strategy = AdapterStrategy(
        model=model,
        update=ServerUpdate(budgets=lambda r: server.round_budgets(r, rounds)),
        stages=[
            *reply_stages(model, ReplyRules(fingerprint=server.fingerprint()), LedgerBook(DPConfig())),
            *influence_stages(StrategyConfig(clip="off"), math.inf),
        ],
    )
    g = torch.Generator().manual_seed(4)
    for round_ in range(1, rounds + 1):
        strategy._global = global_
        budgets = server.round_budgets(round_, rounds)
        replies = []
        for _ in range(3):
            masks = {
                n: _top_k_reference(torch.rand(shapes[n], generator=g), a, budgets[n])
                for n, a in structure.lines.items()
            }
            delta = {n: torch.randn(t.shape, generator=g) for n, t in global_.items()}
            replies.append(_sparse_reply(to_sparse_record(delta, masks, structure.lines), server.fingerprint(), round_))
        over = {
            n: _top_k_reference(torch.rand(shapes[n], generator=g), a, budgets[n] + 1)
            for n, a in structure.lines.items()
        }
        replies.append(_sparse_reply(to_sparse_record(global_, over, structure.lines), server.fingerprint(), round_))
        arrays, _ = strategy.aggregate_train(round_, replies)
        global_ = from_record(arrays, metas(global_))
        assert strategy.rounds[round_].accepted and len(strategy.rounds[round_].dropped) == 1
        for name, axis in structure.lines.items():
            assert int((global_[name] != 0).sum(axis).max()) <= budgets[name]
        assert 0 < strategy.rounds[round_].aggregation_error < np.inf  # measured: cross terms, masks, projection


def test_peft_loads_a_pruned_roselora_adapter(batch, tmp_path):
    peft = pytest.importorskip("peft")
    from fed.models import load_model
    from fed.run.export import export_adapter

    model = load_model("tiny-bert", "classification", num_labels=2, seed=5)
    adapter = build(model, spec("roselora", ("query", "value"), keep_ratio=0.25), seed=1, head=HEAD)
    randomise(adapter, 0.2)
    with torch.no_grad():
        for _path, layer in ((p, m) for p, m in model.named_modules() if isinstance(m, RoseLinear)):
            for name, axis in (("lora_A.weight", 1), ("lora_B.weight", 0)):
                w = layer._factors()[name]
                w.mul_(_top_k_reference(w.abs(), axis, line_budget(w.shape[axis], 0.25)))
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert")
    loaded = peft.PeftModel.from_pretrained(
        load_model("tiny-bert", "classification", num_labels=2, seed=5), str(tmp_path)
    ).eval()
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**args).logits, model.eval()(**args).logits, rtol=1e-5, atol=1e-5)


def test_allocate_ranks_is_highest_averages_apportionment():
    """Against an independent construction: the top ``total - L`` of every quotient ``s/j`` (j = 2..cap)."""
    scores, cap = [5.0, 1.0, 0.2, 2.5], 6
    for total in (4, 9, 13, 24):
        quotients = sorted(((s / j, -i, i) for i, s in enumerate(scores) for j in range(2, cap + 1)), reverse=True)
        expected = [1 + sum(1 for q in quotients[: total - 4] if q[2] == i) for i in range(4)]
        assert allocate_ranks(scores, total, cap) == expected and sum(expected) == total
    with pytest.raises(ValueError, match="rank budget 30 cannot give 4 layers between 1 and 6"):
        allocate_ranks(scores, 30, cap)


def test_reallocation_moves_rank_to_the_layer_the_round_changed_and_keeps_the_budget():
    adapter = build(tiny_bert(), spec("dynamic-lora", ("query", "value")), seed=3, head=HEAD)
    layers = list(zip(*(adapter.group(name).params for name in ("rank_mask", "lora_B", "lora_A"))))
    before = adapter.sent_state()
    g = torch.Generator().manual_seed(0)
    after = dict(before)
    busy_mask, busy_b, _busy_a = layers[0]
    for _mask, b, _a in layers:  # every layer moves a little, the first a lot
        after[b] = before[b] + (1.0 if b == busy_b else 0.01) * torch.randn(before[b].shape, generator=g)
    new = reallocate(before, after, layers)
    assert adapter.after_aggregate(before, after).keys() == new.keys()
    ranks = [int(new[m].sum()) for m, _, _ in layers]
    assert sum(ranks) == sum(int(before[m].sum()) for m, _, _ in layers) == 4 * len(ranks)
    assert ranks[0] == 8 and all(1 <= r < 4 for r in ranks[1:])
    for mask, b, _ in layers:
        assert torch.count_nonzero(new[b][:, new[mask] == 0]) == 0  # inactive slots hold a zero column of B
    # the busy layer grew: its old slots are kept as they were, the new ones start at zero, so its update is too
    torch.testing.assert_close(new[busy_b] * new[busy_mask], after[busy_b] * before[busy_mask])
    assert reallocate(before, before, layers) == before  # no change, no reshuffle


def test_dynamic_layer_is_the_gated_masked_low_rank_update(batch):
    adapter = build(tiny_bert(), spec("dynamic-lora", ("query",)), seed=3)
    randomise(adapter, 0.3)
    layer = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(layer, DynamicLinear) and layer.lora_A.weight.shape[0] == 8  # r_max = 2 x rank 4
    with torch.no_grad():
        layer.rank_mask.copy_(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float32))
        x = torch.randn(2, 3, 16)
        a, b, w, m = layer.lora_A.weight, layer.lora_B.weight, layer.gate.weight, layer.rank_mask
        expected = layer.base_layer(x) + layer.scaling * (1 + torch.tanh(x @ w.T)) * (x @ (b @ torch.diag(m) @ a).T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        dense, _ = adapter.products({})["bert.encoder.layer.0.attention.self.query"]
        torch.testing.assert_close(dense, layer.scaling * b @ torch.diag(m) @ a, rtol=1e-5, atol=1e-6)


def test_config_refuses_a_partial_server_step_for_roselora():
    from fed.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="server_lr=0.5 with adapter.kind='roselora'"):
        RunConfig().with_overrides({"adapter.kind": "roselora", "federation.server_lr": 0.5})
    with pytest.raises(ConfigError, match="adapter.keep_ratio=0.0"):
        RunConfig().with_overrides({"adapter.kind": "roselora", "adapter.keep_ratio": 0.0})
    assert DPConfig().enabled is False and np.isfinite(keep_fraction(1.0, 1, 0.5))
