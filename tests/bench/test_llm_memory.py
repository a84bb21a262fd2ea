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
    rows = [r.split(" | ") for r in record["body"].splitlines() if r.startswith("| 16 |")]
    assert len(rows) == 1
    estimate, measured = float(rows[0][5].replace(",", "")), float(rows[0][6].replace(",", ""))
    assert estimate > 0 and measured > 0
