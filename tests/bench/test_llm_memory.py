"""The memory bench measures in a fresh process and reports the estimate beside the measured peak."""

from __future__ import annotations

import json

import numpy as np

from bench import llm_memory


def test_the_sampler_sees_a_short_lived_allocation():
    with llm_memory.PeakSampler() as sampler:
        before = llm_memory._rss()
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert sampler.peak - before > 48 * 2**20


def test_llm_memory_runs_at_tiny_size_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench"])
    path = llm_memory.main(["--model", "tiny-llama", "--lengths", "16", "--batch", "2"], tmp_path)
    assert path is not None
    record = json.loads(path.read_text())
    assert [row["length"] for row in record["rows"]] == [16]
    row = record["rows"][0]
    parts = row["weights"] + row["activations"] + row["per-sample grads"] + row["optimiser"]
    assert row["estimate"] > 0 and row["measured"] > 0
    assert abs(parts - row["estimate"]) < 1e-6 * row["estimate"]  # the breakdown adds up to the estimate
