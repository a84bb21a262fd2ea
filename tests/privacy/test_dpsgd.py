"""DP-SGD correctness against independent per-example loops (no Opacus in the reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fed.adapters import build
from fed.privacy.dpsgd import DpStepper, per_sample_module
from fed.privacy.mechanism import DpSettings, layer_bounds
from fed.tasks import CausalLM
from fed.train import PlainStepper, length_chunks, per_example_losses, round_lr, train_round
from tests.helpers import KINDS, _bert_adapter, _naive_grads, _NoTokenizer, randomise, spec, tiny_bert, tiny_llama


def _llama_adapter(kind: str):
    model = tiny_llama()
    adapter = build(model, spec(kind, ("q_proj", "v_proj")), seed=3)
    randomise(adapter, 0.3)
    return adapter, CausalLM(_NoTokenizer(), 16)


def _lm_batch(batch):
    labels = batch["input_ids"].clone()
    labels[:, :2] = -100  # prompt tokens are not scored
    labels[batch["attention_mask"] == 0] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "build_fn, batch_fn",
    [(_bert_adapter, lambda b: b), (_llama_adapter, _lm_batch)],
    ids=["classification", "causal-lm"],
)
def test_opacus_per_sample_gradients_equal_a_naive_loop(kind, build_fn, batch_fn, batch):
    adapter, task = build_fn(kind)
    batch = batch_fn(batch)
    reference = _naive_grads(adapter, task, batch)
    gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
    per_example_losses(adapter, task, gsm, batch)[1].sum().backward()
    params = dict(adapter.model.named_parameters())
    for name in adapter.names(trainable=True):
        per_sample = params[name].grad_sample
        expected = torch.stack([r[name] for r in reference])
        torch.testing.assert_close(per_sample, expected, rtol=1e-4, atol=1e-6)
    frozen = [n for n in adapter.names(trainable=False)]
    assert all(getattr(params[n], "grad_sample", None) is None for n in frozen)
    gsm._close()


def _chunks(batch, parts: int):
    """The batch cut into ``parts`` chunks of rows (as ``fed.train`` cuts a batch by length)."""
    rows = [list(range(len(batch["input_ids"])))[k::parts] for k in range(parts)]
    return [{key: value[r] for key, value in batch.items()} for r in rows]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode, parts", [("hooks", 1), ("ghost", 1), ("hooks", 2)], ids=["hooks", "ghost", "hooks-2-chunks"]
)
def test_dp_step_without_noise_is_the_mean_of_clipped_per_example_gradients(kind, mode, parts, batch):
    """Also when the batch arrives in chunks: one step, each example clipped once, divided by the expected size."""
    adapter, task = _bert_adapter(kind)
    names = adapter.names(trainable=True)
    reference = _naive_grads(adapter, task, batch)
    clip = 0.05
    clipped = []
    for grads in reference:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        clipped.append({n: g * min(1.0, clip / (float(norm) + 1e-6)) for n, g in grads.items()})
    expected_bs = 4  # deliberately not the actual batch size: DP-SGD divides by the *expected* size
    before = adapter.state(names)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(
        noise_multiplier=0.0, max_grad_norm=clip, sample_rate=expected_bs / 100, num_examples=100, mode=mode
    )
    stepper = DpStepper(adapter.model, optimizer, dp)
    for chunk in _chunks(batch, parts):
        stepper.accumulate(per_example_losses(adapter, task, stepper.module, chunk)[1], len(batch["input_ids"]))
    stepper.step()
    stepper.close()
    after = adapter.state(names)
    for n in names:
        update = -(after[n] - before[n])
        torch.testing.assert_close(update, sum(c[n] for c in clipped) / expected_bs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_clipping_clips_each_tensor_to_its_share_of_the_bound(kind, batch):
    """Head tensors clipped to C*sqrt(s/n_head) each, adapter tensors to C*sqrt((1-s)/n_adapter), then
    summed and divided by the expected batch size; the noise stays scaled to C itself."""
    adapter, task = _bert_adapter(kind)
    names = adapter.names(trainable=True)
    head = {"classifier.weight", "classifier.bias"}
    clip, share, expected_bs = 0.05, 0.3, 4
    n_head = len(head)
    n_rest = len(names) - n_head
    bound = {n: clip * (share / n_head if n in head else (1 - share) / n_rest) ** 0.5 for n in names}
    reference = _naive_grads(adapter, task, batch)
    expected = {
        n: sum(g[n] * min(1.0, bound[n] / (float(g[n].norm()) + 1e-6)) for g in reference) / expected_bs for n in names
    }
    before = adapter.state(names)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(
        noise_multiplier=0.0, max_grad_norm=clip, sample_rate=expected_bs / 100, num_examples=100, head_clip_share=share
    )
    stepper = DpStepper(adapter.model, optimizer, dp, [n in head for n in names])
    assert stepper.optimizer.max_grad_norm == clip  # the noise's scale: the whole example's sensitivity
    stepper.accumulate(per_example_losses(adapter, task, stepper.module, batch)[1], len(batch["input_ids"]))
    stepper.step()
    stepper.close()
    after = adapter.state(names)
    for n in names:
        torch.testing.assert_close(before[n] - after[n], expected[n], rtol=1e-4, atol=1e-7)


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.floats(0.01, 0.99), st.floats(0.01, 10.0))
def test_layer_bounds_square_sum_to_the_clipping_norm(is_head, share, clip):
    bounds = layer_bounds(is_head, clip, share)
    assert len(bounds) == len(is_head)
    assert abs(sum(b * b for b in bounds) - clip * clip) <= 1e-9 * clip * clip
    if any(is_head) and not all(is_head):
        head_sq = sum(b * b for b, h in zip(bounds, is_head) if h)
        assert abs(head_sq - share * clip * clip) <= 1e-9 * clip * clip


def test_empty_poisson_batch_is_a_noise_only_step():
    adapter, _ = _bert_adapter("ffa-lora")
    names = adapter.names(trainable=True)
    before = adapter.state(names)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, num_examples=10)
    stepper = DpStepper(adapter.model, optimizer, dp)
    stepper.empty_step()
    stepper.close()
    after = adapter.state(names)
    # noise std per coordinate = sigma * C / expected batch size = 1.0 (SGD, lr 1), pooled over every
    # trained coordinate (one small tensor's sample std strays past a tight band too often)
    noise = torch.cat([(after[n] - before[n]).flatten() for n in names])
    # 290 coordinates: the band is 3.6 standard errors wide on each side
    assert len(noise) >= 256 and 0.85 < float(noise.std()) < 1.15, (len(noise), float(noise.std()))
    for n in names:
        assert not torch.equal(after[n], before[n]), n


def test_every_dropout_is_off_during_dp_steps_attention_included_and_restored_after(batch):
    """BERT's attention applies a functional dropout with its module's ``.p`` while training: under DP two
    forwards of one batch must agree exactly (no random source but the mechanism), and after the round
    the model's dropout is back as it was."""
    from fed.adapters import build
    from fed.models import task_head_names
    from tests.helpers import spec, tiny_bert

    model = tiny_bert(dropout=0.5)
    adapter = build(model, spec("ffa-lora", ("query", "value")), 3, head=tuple(task_head_names(model)))
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)  # dropout is live outside DP
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, num_examples=10)
    stepper = DpStepper(model, optimizer, dp)
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    stepper.close()
    probabilities = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert probabilities and all(p == 0.5 for p in probabilities)


def test_plain_step_on_chunks_equals_the_step_on_the_whole_batch(batch):
    states = []
    for parts in (1, 3):
        adapter, task = _bert_adapter("lora")
        names = adapter.names(trainable=True)
        stepper = PlainStepper(adapter.model, torch.optim.SGD(adapter.trainable_parameters(), lr=1.0))
        for chunk in _chunks(batch, parts):
            stepper.accumulate(per_example_losses(adapter, task, adapter.model, chunk)[1], len(batch["input_ids"]))
        stepper.step()
        states.append(adapter.state(names))
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-5, atol=1e-7)


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), size=st.integers(0, 12))
def test_length_chunks_cover_the_batch_once_in_length_order(lengths, size):
    indices = [7 * k for k in range(len(lengths))][::-1]  # dataset rows; lengths[k] is row indices[k]'s
    length_of = dict(zip(indices, lengths))
    chunks = length_chunks(lengths, indices, size)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == sorted(indices)
    assert all(len(c) <= size for c in chunks) if 0 < size < len(indices) else len(chunks) == 1
    if len(chunks) > 1:
        assert [length_of[i] for i in flat] == sorted(lengths)


def _plain_round_with_dropout(batch: dict[str, torch.Tensor], seed: int, noise_before: int) -> dict[str, torch.Tensor]:
    from tests.helpers import _Encoded, _Rows

    adapter = build(
        tiny_bert(dropout=0.5), spec("lora", ("query", "value")), seed=3, head=("classifier.weight", "classifier.bias")
    )
    torch.rand(noise_before)  # what else the process (a simulation actor) drew before this round
    before = torch.get_rng_state()
    train_round(
        adapter,
        _Encoded(_NoTokenizer(), 16),
        _Rows(batch),
        steps=3,
        batch_size=5,
        lr=0.1,
        weight_decay=0.0,
        dp=None,
        gen=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(torch.get_rng_state(), before)  # the round leaves the process's generator as it was
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}


def test_a_plain_round_with_dropout_follows_the_run_seed_alone_and_leaves_the_global_generator_alone(batch):
    """Batches are the same in every call here (one batch of all five rows), so only dropout can differ."""
    first = _plain_round_with_dropout(batch, seed=1, noise_before=0)
    again = _plain_round_with_dropout(batch, seed=1, noise_before=1000)
    other = _plain_round_with_dropout(batch, seed=2, noise_before=0)
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    assert any(not torch.equal(other[name], first[name]) for name in first)  # dropout is on: the seed matters


_PLAIN_ROUND = """
import sys, torch
from datasets import Dataset
import clients.app, fed.privacy.ledger as ledger
from fed.config import RunConfig
from fed.session import adapted_model
from fed.train import train_round

cfg = RunConfig().with_overrides({"model.name": "tiny-bert", "adapter.kind": "mor", "model.max_length": 8})
adapter, task = adapted_model(cfg)
data = Dataset.from_dict({"text": ["good", "bad film", "fine", "awful"], "label": [1, 0, 1, 0]})
dp = None
if sys.argv[1] == "dp":
    from fed.privacy.mechanism import DpSettings
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, num_examples=4)
train_round(adapter, task, data, steps=2, batch_size=2, lr=0.1, weight_decay=0.0, dp=dp,
            gen=torch.Generator().manual_seed(0))
assert ledger.epsilon([], 1e-5, "rdp") == 0.0
print(sorted({m.split(".")[0] for m in sys.modules} & {"opacus"}))
"""


@pytest.mark.parametrize("mode, expected", [("plain", "[]"), ("dp", "['opacus']")])
def test_a_process_that_never_trains_privately_never_imports_opacus(mode, expected):
    """A non-DP client (the client app, a plain round of the family that has its own grad sampler, an empty
    ledger) starts about a second faster without Opacus; a DP round loads it (the check can tell)."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_ROUND, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("rounds", [1, 5, 16])
def test_the_cosine_schedule_matches_torchs_cosine_annealing_round_by_round(rounds):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.7)
    torchs = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds)
    for round_ in range(1, rounds + 1):
        assert round_lr(0.7, "cosine", round_, rounds) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        assert round_lr(0.7, "constant", round_, rounds) == 0.7
        opt.step()
        torchs.step()
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; accepted: constant, cosine"):
        round_lr(0.7, "step", 1, rounds)
