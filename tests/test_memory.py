"""The per-client memory estimate against sizes computed by hand from the tiny model's shape."""

from __future__ import annotations

from fed.config import RunConfig
from fed.memory import estimate
from fed.session import adapted_model

# tiny-llama (fed.models._tiny_config): hidden 32, intermediate 64, 2 blocks, MiniLM's vocabulary
HIDDEN, INTERMEDIATE, BLOCKS = 32, 64, 2


def _cfg(**overrides) -> RunConfig:
    flat = {"task": "causal-lm", "model.name": "tiny-llama", "model.max_length": 16, "train.batch_size": 8}
    return RunConfig.from_flat(flat | {"train.micro_batch": 4, "adapter.rank": 4} | overrides)


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
    assert found.activations == tokens * (BLOCKS * (8 * HIDDEN + 3 * INTERMEDIATE) * 4 + 3 * vocab * 4)
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
