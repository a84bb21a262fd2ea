"""The prepared GPU benchmark runs end to end on the CPU at tiny sizes and writes its one JSON result."""

from __future__ import annotations

import json

import torch

from bench import llm_steps

TINY = ["--model", "random-llama-tiny", "--large", "none", "--length", "24", "--batch", "2", "--steps", "2"]


def test_llm_steps_runs_at_tiny_sizes_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench"])
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))  # the random checkpoint is written there
    path = llm_steps.main([*TINY, "--repeats", "1", "--device", "cpu"], tmp_path)
    record = json.loads(path.read_text())
    assert record["bench"] == "llm_steps" and record["card"]
    rows = record["rows"]
    assert [(r["model"], r["adapter"], r["step"]) for r in rows] == [
        ("random-llama-tiny", "lora", "plain"),
        ("random-llama-tiny", "lora", "dp"),
        ("random-llama-tiny", "ffa-lora", "plain"),
        ("random-llama-tiny", "ffa-lora", "dp"),
    ]
    dp = [r for r in rows if r["step"] == "dp"]
    assert all(0 < r["noise share of the step"] < 100 for r in dp)  # the noise took some, not all
    assert all(r["noise share of the step"] is None and r["noise values"] is None for r in rows if r not in dp)
    recipe = [r for r in rows if r["adapter"] == "lora"]  # the hand-built recipe's LoRA steps beside fedlora's
    assert all(r["recipe s/step"] > 0 and r["recipe / fedlora"] > 0 for r in recipe)
    assert all(r["recipe s/step"] is None for r in rows if r["adapter"] == "ffa-lora")
    assert all(r["noise draw, os"] > 0 and r["noise draw, stream"] > 0 and r["noise values"] > 0 for r in dp)
    assert dp[0]["noise values"] > dp[1]["noise values"]  # FFA-LoRA trains half of LoRA's matrices
    if not torch.cuda.is_available():
        assert "Shared GPU: skipped: no CUDA GPU visible" in record["about"]


def test_the_large_model_is_a_random_llama_of_about_a_billion_parameters():
    from transformers import LlamaConfig

    shape = llm_steps.RANDOM_LLAMAS["random-llama-1b"]
    config = LlamaConfig(vocab_size=49152, num_key_value_heads=4, tie_word_embeddings=True, **shape)
    hidden, inter, layers, heads = (
        shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    )
    kv = hidden // heads * config.num_key_value_heads
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden  # q, o; k, v; MLP; norms
    total = 49152 * hidden + layers * block + hidden  # tied embeddings, blocks, final norm (counted by hand)
    assert 0.9e9 < total < 1.2e9
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        assert sum(p.numel() for p in LlamaForCausalLM(config).parameters()) == total


def test_every_synthetic_row_fills_the_length():
    from fed.models import load_tokenizer
    from fed.tasks import CausalLM

    task = CausalLM(load_tokenizer("tiny-llama", "causal-lm"), 24)
    batch = task.encode(llm_steps.synthetic_rows(3, 24)[:])
    assert batch["input_ids"].shape == (3, 24) and bool(batch["attention_mask"].all())


def test_the_noise_timer_counts_every_draw_and_leaves_the_draw_alone():
    from fed.privacy import secure_rng

    with llm_steps.timed_noise() as spent:
        noise = secure_rng.normal((1000,), 2.0)
    assert len(spent) == 1 and spent[0] > 0
    assert noise.shape == (1000,) and 1.5 < float(noise.std()) < 2.5
    assert secure_rng.normal.__name__ == "normal"  # restored
    assert torch.is_tensor(noise)
