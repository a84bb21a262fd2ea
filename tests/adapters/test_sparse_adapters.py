"""RoseLoRA (line-sparse factors, masked aggregation, DP-safe importance) and Dynamic LoRA (rank reallocation)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fed.adapters import Clock, Structure, build
from fed.adapters.base import Aggregation, MaskedParams
from fed.adapters.families.dynamic_lora import (
    DynamicLinear,
    Smoothing,
    layer_scores,
    next_ranks,
    reallocate,
    smoothed_scores,
)
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


def _sensitivity_masks(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each line's top-k by the first EMA step of the paper's sensitivity, ``(1-β)·|w·g|``, computed here."""
    out = {}
    for name, axis in (("lora_A.weight", 1), ("lora_B.weight", 0)):
        k = line_budget(weights[name].shape[axis], 0.25)
        out[name] = _top_k_reference((1 - BETA) * (weights[name] * grads[name]).abs(), axis, k)
    return out


def test_pruning_under_adamw_keeps_each_lines_top_k_by_the_papers_sensitivity(batch):
    """One AdamW step: each row of A and column of B keeps the largest ``|w·∇w|`` (EMA from zero), with ``∇w``
    the gradient AdamW received and ``w`` the weights it is the gradient of, computed here; everything else
    is zero. Ranking by ``|w|`` alone (what ``|w·Δw|`` becomes under Adam) keeps other entries."""
    adapter = _rose()
    layer = adapter.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    adapter.begin_round(LATE)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=0.01, weight_decay=0.0)
    adapter.watch(optimizer)
    task = Classification(_NoTokenizer(), 16)
    task.per_example_loss(adapter.model, batch).mean().backward()
    weights = {n: p.detach().clone() for n, p in layer._factors().items()}
    grads = {n: p.grad.detach().clone() for n, p in layer._factors().items()}
    optimizer.step()
    stepped = {n: p.detach().clone() for n, p in layer._factors().items()}
    adapter.after_step()
    expected = _sensitivity_masks(weights, grads)
    magnitude = _sensitivity_masks(weights, {n: torch.ones_like(w) for n, w in weights.items()})
    for name, mask in expected.items():
        assert torch.equal(layer.masks()[name], mask)
        torch.testing.assert_close(layer._factors()[name].detach(), stepped[name] * mask, rtol=0, atol=0)
        assert not torch.equal(mask, magnitude[name])


def test_importance_under_dp_is_the_sensitivity_of_the_released_gradient(batch):
    """A real DP step with SGD: the gradient the optimizer applied is the privatised one, recovered here from
    the released parameters alone (``(w - w')/lr``); the masks are the top-k of ``|w·that|``, so the
    importance is post-processing of what DP-SGD released."""
    task = Classification(_NoTokenizer(), 16)
    adapter = _rose()
    adapter.begin_round(LATE)
    lr = 0.05
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=lr)
    adapter.watch(optimizer)
    stepper = DpStepper(
        adapter.model,
        optimizer,
        DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05, num_examples=100),
    )
    layer = adapter.model.get_submodule("bert.encoder.layer.1.attention.self.value")
    weights = {n: p.detach().clone() for n, p in layer._factors().items()}
    stepper.accumulate(task.per_example_loss(stepper.module, batch), len(batch["input_ids"]))
    stepper.step()
    released = {n: p.detach().clone() for n, p in layer._factors().items()}
    adapter.after_step()
    stepper.close()
    expected = _sensitivity_masks(weights, {n: (weights[n] - released[n]) / lr for n in weights})
    for name, mask in expected.items():
        assert torch.equal(layer.masks()[name], mask)


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


def _vote_reference(votes: torch.Tensor, values: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Each line's k entries with the most (weighted) votes, ties by magnitude, by sorting tuples (independent)."""
    mask = torch.zeros(values.shape, dtype=torch.bool)
    for line in range(values.shape[1 - axis]):
        entries = [(i, line) if axis == 0 else (line, i) for i in range(values.shape[axis])]
        ranked = sorted(entries, key=lambda e: (float(votes[e]), abs(float(values[e]))), reverse=True)
        for e in ranked[:k]:
            mask[e] = True
    return mask


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
        expected, votes = torch.zeros_like(global_[name]), torch.zeros_like(global_[name])
        for idx in itertools.product(*(range(s) for s in global_[name].shape)):
            kept = [(w, global_[name][idx] + d[name][idx]) for w, d, m in zip(weights, deltas, masks) if m[name][idx]]
            if kept:
                expected[idx] = sum(w * v for w, v in kept) / sum(w for w, _ in kept)
                votes[idx] = sum(w for w, _ in kept)
        expected = expected * _vote_reference(votes, expected, axis, 4)
        torch.testing.assert_close(global_[name] + merged[name], expected, rtol=1e-5, atol=1e-6)


def test_the_server_keeps_the_entries_most_clients_kept_before_the_largest():
    """One line of width 3, budget 2: both clients kept entry 0 (small), one kept 1, the other 2 (large).
    Magnitude alone would keep {1, 2}; the clients' sensitivity masks agree on 0, so {0, 2} stays."""
    global_ = {"A": torch.zeros(1, 3)}
    structure = Structure({"A": Aggregation.MASKED}, rules=((("A",), MaskedParams(1)),))
    masks = [{"A": torch.tensor([[True, True, False]])}, {"A": torch.tensor([[True, False, True]])}]
    deltas = [{"A": torch.tensor([[0.01, 0.5, 0.0]])}, {"A": torch.tensor([[0.01, 0.0, 5.0]])}]
    merged = aggregate(Replies(global_, deltas, [1.0, 1.0], masks=masks), structure)
    torch.testing.assert_close(merged["A"], torch.tensor([[0.01, 0.0, 5.0]]))


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


def test_next_ranks_without_a_margin_reaches_highest_averages_apportionment():
    """Against an independent construction: the top ``total - L`` of every quotient ``s/j`` (j = 2..cap)."""
    scores, cap = [5.0, 1.0, 0.2, 2.5], 6
    for total in (4, 9, 13, 24):
        quotients = sorted(((s / j, -i, i) for i, s in enumerate(scores) for j in range(2, cap + 1)), reverse=True)
        expected = [1 + sum(1 for q in quotients[: total - 4] if q[2] == i) for i in range(4)]
        start = [total // 4 + (1 if i < total % 4 else 0) for i in range(4)]
        assert next_ranks(scores, start, cap, margin=0.0) == expected and sum(expected) == total
    assert next_ranks([1.0, 1.1, 0.95, 1.0], [4, 4, 4, 4], 8, margin=0.25) == [4, 4, 4, 4]  # hysteresis


def test_reallocation_moves_rank_to_the_layer_the_round_changed_and_keeps_the_budget():
    adapter = build(tiny_bert(), spec("dynamic-lora", ("query", "value")), seed=3, head=HEAD)
    layers = list(zip(*(adapter.group(name).params for name in ("rank_mask", "lora_B", "lora_A"))))
    before = adapter.sent_state()
    g = torch.Generator().manual_seed(0)
    after = dict(before)
    busy_mask, busy_b, _busy_a = layers[0]
    for _mask, b, _a in layers:  # every layer moves a little, the first a lot
        after[b] = before[b] + (1.0 if b == busy_b else 0.01) * torch.randn(before[b].shape, generator=g)
    new = reallocate(before, after, layers, layer_scores(before, after, layers))
    ranks = [int(new[m].sum()) for m, _, _ in layers]
    assert sum(ranks) == sum(int(before[m].sum()) for m, _, _ in layers) == 4 * len(ranks)
    assert ranks[0] == 8 and all(1 <= r < 4 for r in ranks[1:])
    for mask, b, _ in layers:
        assert torch.count_nonzero(new[b][:, new[mask] == 0]) == 0  # inactive slots hold a zero column of B
    # the busy layer grew: its old slots are kept as they were, the new ones start at zero, so its update is too
    torch.testing.assert_close(new[busy_b] * new[busy_mask], after[busy_b] * before[busy_mask])
    assert reallocate(before, before, layers, layer_scores(before, before, layers)) == before  # no change
    # through the family: no reallocation during the warm-up, then the busy layer grows
    for round_ in range(1, 5):
        new = adapter.after_aggregate(before, after)
        grown = int(new[busy_mask].sum())
        assert grown == 4 if round_ <= 2 else grown > 4, round_


class _Layer:
    """A layer's server-side smoothing state only (what ``smoothed_scores`` reads and writes)."""

    score: float | None = None
    scored = 0


def _churn(smoothing: Smoothing, rounds: int = 40, layers: int = 6, seed: int = 0) -> tuple[float, list[int]]:
    """Slots switched on per round when every layer matters equally and each round's score is that plus
    noise (lognormal, sd 0.3): every switch is churn for nothing. Returns the mean and the last ranks."""
    g = torch.Generator().manual_seed(seed)
    state, ranks, switched = [_Layer() for _ in range(layers)], [4] * layers, 0
    for _ in range(rounds):
        raw = torch.exp(0.3 * torch.randn(layers, generator=g)).tolist()
        scores = smoothed_scores(state, raw, smoothing)
        new = ranks if scores is None else next_ranks(scores, ranks, 8, smoothing.margin)
        switched += sum(max(0, n - r) for n, r in zip(new, ranks))
        ranks = new
    return switched / rounds, ranks


def test_smoothed_reallocation_stops_churning_on_noise_but_follows_a_real_difference():
    noisy, _ = _churn(Smoothing(beta=0.0, warmup=0, margin=0.0))  # one round's score, every round
    smoothed, _ = _churn(Smoothing())
    assert noisy > 1.0 and smoothed < 0.1 * noisy, (noisy, smoothed)
    state, ranks = [_Layer() for _ in range(2)], [4, 4]
    for _ in range(6):  # a layer that really matters 3x more gets the slots
        scores = smoothed_scores(state, [3.0, 1.0], Smoothing())
        ranks = ranks if scores is None else next_ranks(scores, ranks, 8, Smoothing().margin)
    assert ranks == [6, 2]


def test_switched_off_slots_neither_train_nor_travel_under_dp(batch):
    """A DP round (AdamW with weight decay, noise on every coordinate): the off slots' A rows and B columns
    are exactly where they started, so the reply's delta is zero there; the live slots moved."""
    from fed.train import train_round

    adapter = build(tiny_bert(), spec("dynamic-lora", ("query", "value")), seed=3, head=HEAD)
    randomise(adapter, 0.3)
    start = adapter.sent_state()
    masks = {n: t for n, t in start.items() if n.endswith("rank_mask")}
    assert all(set(m.unique().tolist()) == {0.0, 1.0} for m in masks.values())
    adapter.begin_round(Clock(round_=1, rounds=2, steps=3))
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.6, num_examples=5)
    data = _Rows(batch)
    train_round(
        adapter,
        _Encoded(_NoTokenizer(), 16),
        data,
        steps=3,
        batch_size=5,
        lr=0.05,
        weight_decay=0.1,
        dp=dp,
        gen=torch.Generator(),
    )
    delta = {n: t - start[n] for n, t in adapter.sent_state().items()}
    for mask_name, mask in masks.items():
        layer = mask_name.removesuffix(".rank_mask")
        off, on = mask == 0, mask == 1
        assert torch.count_nonzero(delta[f"{layer}.lora_A.weight"][off]) == 0
        assert torch.count_nonzero(delta[f"{layer}.lora_B.weight"][:, off]) == 0
        assert torch.count_nonzero(delta[f"{layer}.lora_A.weight"][on]) > 0


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
