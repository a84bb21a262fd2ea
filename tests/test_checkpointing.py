"""Gradient checkpointing under DP-SGD: with the blocks recomputed in the backward pass, Opacus's per-sample
gradients and the clipped, noiseless step are those of the model without checkpointing (an independent
per-example loop on it)."""

from __future__ import annotations

import pytest
import torch

from fed.config import ConfigError, RunConfig
from fed.models import checkpoint_blocks
from fed.privacy.dpsgd import per_sample_module
from fed.train import per_example_losses
from tests.helpers import KINDS, _naive_grads, tiny_arch
from tests.test_architectures import _adapted, _task_batch, assert_same_update, clipped_mean, dp_step_update


def _checkpointed(kind: str):
    """The tiny Llama with a ``kind`` adapter, its blocks checkpointed as ``fed.session`` does (before injection);
    MoLE without its balance loss, which checkpointing cannot train (the config refuses it, below)."""
    model = tiny_arch("llama")
    checkpoint_blocks(model)
    return _adapted("llama", kind, model, **({"balance": 0.0} if kind == "mole" else {}))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_keeps_the_per_sample_gradients(kind, batch):
    adapter, task = _checkpointed(kind)
    batch = _task_batch("llama", batch)
    assert adapter.model.model.gradient_checkpointing
    adapter.model.eval()  # Hugging Face checkpoints only in train mode: the reference runs without it
    reference = _naive_grads(adapter, task, batch)
    adapter.model.train()
    gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
    per_example_losses(adapter, task, gsm, batch)[1].sum().backward()
    params = dict(adapter.model.named_parameters())
    for name in adapter.names(trainable=True):
        expected = torch.stack([r[name] for r in reference])
        torch.testing.assert_close(params[name].grad_sample, expected, rtol=1e-4, atol=1e-6)
    gsm._close()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("kind", ["lora", "ffa-lora"])
def test_checkpointing_keeps_the_clipped_noiseless_step(kind, mode, batch):
    adapter, task = _checkpointed(kind)
    batch = _task_batch("llama", batch)
    adapter.model.eval()
    expected = clipped_mean(adapter, task, batch)
    adapter.model.train()
    assert_same_update(dp_step_update(adapter, task, batch, mode), expected)


def test_a_balance_loss_under_checkpointing_is_refused_by_name():
    with pytest.raises(ConfigError, match="adapter.balance"):
        RunConfig.from_flat({"adapter.kind": "mole", "adapter.balance": 0.1, "train.gradient_checkpointing": True})
    RunConfig.from_flat({"adapter.kind": "mole", "adapter.balance": 0.0, "train.gradient_checkpointing": True})


def test_a_model_without_checkpointing_support_is_refused_by_name():
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        checkpoint_blocks(torch.nn.Linear(2, 2))
