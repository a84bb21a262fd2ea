"""The prepared GPU benchmark runs end to end on the CPU at tiny sizes and writes its one JSON result."""

from __future__ import annotations

import json

import torch

from bench import llm_steps

TINY = ["--model", "tiny-llama", "--length", "24", "--batch", "2", "--steps", "2", "--repeats", "1"]


def test_llm_steps_runs_at_tiny_sizes_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench"])
    path = llm_steps.main([*TINY, "--device", "cpu"], tmp_path)
    record = json.loads(path.read_text())
    assert record["bench"] == "llm_steps" and record["card"]
    rows = record["rows"]
    assert [(r["adapter"], r["step"]) for r in rows] == [
        ("lora", "plain"),
        ("lora", "dp"),
        ("ffa-lora", "plain"),
        ("ffa-lora", "dp"),
    ]
    shares = [r["noise share of the step"] for r in rows]
    assert all(0 < s < 100 for s in shares[1::2]) and shares[::2] == [None, None]  # the noise took some, not all


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
