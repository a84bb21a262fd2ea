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
    lines = record["body"].splitlines()
    rows = [r.split(" | ") for r in lines if r.startswith("| random-llama-tiny | ")]
    steps = [r for r in rows if r[2] in ("plain", "dp") and len(r) == 8]
    assert [(r[1], r[2]) for r in steps] == [
        ("lora", "plain"),
        ("lora", "dp"),
        ("ffa-lora", "plain"),
        ("ffa-lora", "dp"),
    ]
    shares = [r[-1].rstrip(" |") for r in steps if r[2] == "dp"]
    assert all(s.endswith("%") and 0 < float(s[:-1]) < 100 for s in shares)  # the noise took some, not all
    recipe = [r for r in rows if len(r) == 5]  # the hand-built recipe's LoRA steps beside fedlora's
    assert [r[1] for r in recipe] == ["plain", "dp"] and all(float(r[-1].rstrip(" |")) > 0 for r in recipe)
    draws = [r for r in rows if len(r) == 7]
    assert sorted(r[2] for r in draws) == ["os", "os", "stream", "stream"]
    if not torch.cuda.is_available():
        assert "Shared GPU: skipped: no CUDA GPU visible" in record["body"]


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
