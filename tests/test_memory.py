"""The per-client memory estimate against sizes computed by hand from the tiny model's shape."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fed.config import RunConfig
from fed.memory import estimate
from fed.session import adapted_model
from fed.train import per_example_losses
from tests.helpers import ARCHITECTURES, VOCAB
from tests.test_architectures import _adapted

# tiny-llama (fed.models._tiny_config): hidden 32, intermediate 64, 2 blocks, MiniLM's vocabulary
HIDDEN, INTERMEDIATE, BLOCKS = 32, 64, 2


def _cfg(**overrides) -> RunConfig:
    flat = {"task": "causal-lm", "model.name": "tiny-llama", "model.max_length": 16, "train.batch_size": 8}
    return RunConfig.from_flat(flat | {"train.micro_batch": 4, "adapter.rank": 4} | overrides)


def _wide(name: str):
    """The tiny architecture at hidden 128 (its vocabulary stays at 50), frozen and in train mode."""
    _, model_type, fields = ARCHITECTURES[name]
    wide = {**fields, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
    if "head_dim" in fields:
        wide["head_dim"] = 32
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **wide))
    return model.requires_grad_(False).train()


def test_each_part_matches_a_hand_count():
    cfg = _cfg(**{"dp.enabled": True, "dp.noise_multiplier": 1.0})
    adapter, _ = adapted_model(cfg)
    model = adapter.model
    vocab = model.config.vocab_size
    # LoRA on q_proj (32 -> 32) and v_proj (32 -> 16: 2 of 4 heads for keys and values), rank 4, two blocks
    trained = BLOCKS * (4 * (32 + 32) + 4 * (32 + 16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trained
    found = estimate(model, cfg)
    assert found.per_sample == 8 * trained * 4  # the whole batch's per-sample gradients, float32
    assert found.optimizer == 3 * trained * 4  # AdamW's two moments and the gradient
    tokens = 4 * 16  # one micro-batch chunk of 16 tokens each
    assert found.activations == tokens * (BLOCKS * (12 * HIDDEN + 5 * INTERMEDIATE) * 4 + 3 * vocab * 4)
    assert found.weights == sum(p.numel() * 4 for p in model.parameters())
    assert found.total == found.weights + found.activations + found.per_sample + found.optimizer


def test_checkpointing_ghost_clipping_and_no_dp_shrink_what_they_should():
    base = _cfg(**{"dp.enabled": True, "dp.noise_multiplier": 1.0})
    model = adapted_model(base)[0].model
    hooks = estimate(model, base)
    checkpointed = estimate(model, base.with_overrides({"train.gradient_checkpointing": True}))
    assert checkpointed.activations < hooks.activations and checkpointed.per_sample == hooks.per_sample
    ghost = estimate(model, base.with_overrides({"dp.grad_sample_mode": "ghost"}))
    assert ghost.per_sample == 0 and ghost.activations == 2 * hooks.activations  # whole batches, not chunks of 4
    plain = estimate(model, base.with_overrides({"dp.enabled": False}))
    assert plain.per_sample == 0 and plain.activations == hooks.activations
    assert estimate(model, base, activation_bytes=2).activations < hooks.activations


def test_fed_plan_prints_the_estimate(capsys):
    from simulations.cli import main

    main(["plan", "--preset", "instruct", "--set", "model.name=tiny-llama", "--set", "dp.enabled=false"])
    out = capsys.readouterr().out
    assert "estimated memory per client" in out and "per-sample gradients" in out and "total" in out


def _saved_bytes(adapter, task, batch) -> int:
    """Bytes autograd keeps for the backward pass of one forward: every saved tensor's storage, once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_example_losses(adapter, task, adapter.model, batch)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_the_activation_estimate_is_near_what_autograd_keeps(name):
    """An independent count: the tensors autograd saves, against the estimate less the logits' gradient (which
    exists only during the backward pass). Wide blocks and a small vocabulary, so the blocks' part decides."""
    adapter, task = _adapted(name, "lora", _wide(name))
    cfg = _cfg(**{"model.max_length": 24, "train.batch_size": 3, "train.micro_batch": 0})
    ids = torch.randint(1, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    saved = _saved_bytes(adapter, task, batch)
    tokens = 3 * 24
    without_gradient = estimate(adapter.model, cfg).activations - tokens * VOCAB * 4  # one of the 3 vocab copies
    assert 0.75 * saved < without_gradient < 1.33 * saved
