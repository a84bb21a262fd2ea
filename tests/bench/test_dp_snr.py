"""bench/dp_snr.py's clipped mean and per-example norms, computed one example at a time by autograd, against
the DP step Opacus takes without noise and Opacus's own per-sample gradients."""

from __future__ import annotations

import pytest
import torch

from bench.studies import dp_snr
from fed.adapters import build
from fed.privacy.dpsgd import DpStepper, per_sample_module
from fed.privacy.mechanism import DpSettings
from fed.tasks import Classification
from fed.train import per_example_losses
from tests.helpers import _NoTokenizer, randomise, spec, tiny_bert


def _adapter(kind: str):
    """Its large scale (alpha 200, rank 4) gives the adapter a tenth or more of each example's gradient norm, so
    clipping on the head's norm alone, or on the adapter's, would show."""
    adapter = build(
        tiny_bert(), spec(kind, ("query", "value"), alpha=200.0), seed=3, head=("classifier.weight", "classifier.bias")
    )
    randomise(adapter, 0.3)
    return adapter, Classification(_NoTokenizer(), 16)


@pytest.mark.parametrize("kind", ["ffa-lora", "mole"])  # mole: a balance loss on top of the task's
def test_the_clipped_mean_is_the_noiseless_dp_step_and_the_norms_opacus_per_sample_norms(kind: str, batch) -> None:
    adapter, task = _adapter(kind)
    names = adapter.names(trainable=True)
    clip = 0.05
    mean, head_norms, adapter_norms = dp_snr.clipped_mean(adapter, task, batch, clip)

    gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
    per_example_losses(adapter, task, gsm, batch)[1].sum().backward()
    params = dict(adapter.model.named_parameters())
    head = set(adapter.head_names())
    for group, got in ((True, head_norms), (False, adapter_norms)):
        squares = sum(params[n].grad_sample.flatten(1).pow(2).sum(1) for n in names if (n in head) == group)
        torch.testing.assert_close(torch.tensor(got), squares.sqrt(), rtol=1e-4, atol=1e-7)
    assert min(a / h for a, h in zip(adapter_norms, head_norms)) > 0.1 and min(head_norms) > clip  # all clipped
    gsm._close()
    for p in adapter.trainable_parameters():
        p.grad = None

    before = adapter.state(names)
    size = len(batch["input_ids"])
    stepper = DpStepper(
        adapter.model,
        torch.optim.SGD(adapter.trainable_parameters(), lr=1.0),
        DpSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=size / 100, num_examples=100),
    )
    stepper.accumulate(per_example_losses(adapter, task, stepper.module, batch)[1], size)
    stepper.step()
    stepper.close()
    after = adapter.state(names)
    for n in names:
        torch.testing.assert_close(before[n] - after[n], mean[n], rtol=1e-4, atol=1e-7)
