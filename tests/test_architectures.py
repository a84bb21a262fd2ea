"""Every common architecture, tiny and random: default targets inject, a DP step equals an independent
per-example loop, and the export loads with PEFT on the architecture's own (unconverted) model."""

from __future__ import annotations

import pytest
import torch

from fed.adapters import build, make_spec
from fed.models import default_targets, task_head_names
from fed.privacy.dpsgd import DpStepper
from fed.privacy.mechanism import DpSettings
from fed.run.export import export_adapter
from fed.tasks import CausalLM, Classification
from fed.train import per_example_losses
from tests.helpers import ARCHITECTURES, KINDS, MATRIX, _naive_grads, _NoTokenizer, hf_arch, randomise, tiny_arch

peft = pytest.importorskip("peft")

NAMES = list(ARCHITECTURES)
CLIP = 0.05
EXPECTED_BATCH = 4  # deliberately not the batch's size: DP-SGD divides by the expected size


def _adapted(name: str, kind: str, model=None, **options):
    """The architecture's tiny model with a ``kind`` adapter on its default targets, B non-zero, and its task."""
    model = tiny_arch(name) if model is None else model
    spec = make_spec(
        **{
            "kind": kind,
            "rank": 4,
            "alpha": 8.0,
            "targets": tuple(default_targets(model)),
            **MATRIX.get(kind, {}),
            **options,
        }
    )
    adapter = build(model, spec, seed=3, head=tuple(task_head_names(model)))
    randomise(adapter, 0.3)
    task = CausalLM(_NoTokenizer(), 16) if ARCHITECTURES[name][0] == "causal-lm" else Classification(_NoTokenizer(), 16)
    return adapter, task


def _task_batch(name: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if ARCHITECTURES[name][0] == "classification":
        return batch
    labels = batch["input_ids"].clone()
    labels[:, :2] = -100  # prompt tokens are not scored
    labels[batch["attention_mask"] == 0] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def clipped_mean(adapter, task, batch) -> dict[str, torch.Tensor]:
    """The noiseless DP-SGD update from one backward pass per example: each clipped to CLIP, summed, divided by
    the expected batch size."""
    total: dict[str, torch.Tensor] = {}
    for grads in _naive_grads(adapter, task, batch):
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
        for n, g in grads.items():
            total[n] = total.get(n, 0) + g * min(1.0, CLIP / (norm + 1e-6))
    return {n: g / EXPECTED_BATCH for n, g in total.items()}


def dp_step_update(adapter, task, batch, mode: str = "hooks") -> dict[str, torch.Tensor]:
    """The update one noiseless ``DpStepper`` step (SGD, lr 1) applies to the trained tensors."""
    names = adapter.names(trainable=True)
    before = adapter.state(names)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    dp = DpSettings(
        noise_multiplier=0.0, max_grad_norm=CLIP, sample_rate=EXPECTED_BATCH / 100, num_examples=100, mode=mode
    )
    stepper = DpStepper(adapter.model, optimizer, dp)
    stepper.accumulate(per_example_losses(adapter, task, stepper.module, batch)[1], len(batch["input_ids"]))
    stepper.step()
    stepper.close()
    after = adapter.state(names)
    return {n: before[n] - after[n] for n in names}


def assert_same_update(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    assert any(bool(g.abs().sum() > 0) for g in expected.values())  # the comparison can fail
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_exist_and_are_adapted(name):
    model = tiny_arch(name)
    targets = default_targets(model)
    adapter, _ = _adapted(name, "lora", model)
    adapted = {p.split(".lora_")[0].rsplit(".", 1)[-1] for p in adapter.names(trainable=True) if ".lora_" in p}
    assert adapted == set(targets)
    assert len(adapter.names(trainable=True)) >= 2 * 2 * len(targets)  # A and B in both blocks


@pytest.mark.parametrize("kind", ["lora", "ffa-lora"])
@pytest.mark.parametrize("name", NAMES)
def test_a_dp_step_equals_the_clipped_per_example_loop(name, kind, batch):
    adapter, task = _adapted(name, kind)
    batch = _task_batch(name, batch)
    expected = clipped_mean(adapter, task, batch)  # before the step moves the tensors
    assert_same_update(dp_step_update(adapter, task, batch), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_every_family_takes_a_dp_step_on_a_gpt2(kind, batch):
    """GPT-2 as the one causal LM every family runs on: its Conv1D projections, converted, are plain targets."""
    adapter, task = _adapted("gpt2", kind)
    batch = _task_batch("gpt2", batch)
    expected = clipped_mean(adapter, task, batch)  # before the step moves the tensors
    assert_same_update(dp_step_update(adapter, task, batch), expected)


@pytest.mark.parametrize("name", NAMES)
def test_the_export_loads_with_peft_on_the_architectures_own_model(name, batch, tmp_path):
    adapter, _ = _adapted(name, "lora")
    export_adapter(adapter, tmp_path, task=ARCHITECTURES[name][0], base_model="tiny")
    loaded = peft.PeftModel.from_pretrained(hf_arch(name), str(tmp_path)).eval()
    adapter.model.eval()
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**args).logits, adapter.model(**args).logits, rtol=1e-5, atol=1e-5)
