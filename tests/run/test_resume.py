"""Checkpoint and resume: the checkpoint round-trips, and a server process killed mid-run resumes to the
same result as a run never interrupted (same seeds, no DP noise), with every round logged exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fed.config import DPConfig
from fed.config.sources import resolve
from fed.privacy.book import LedgerBook
from fed.run.checkpoint import Checkpoint
from fed.run.rundir import RunDir

SMALL = [
    "model.name=tiny-bert",
    "data.name=synthetic",
    "federation.num_clients=2",
    "federation.rounds=2",
    "federation.fraction_evaluate=0",
    "train.local_steps=4",
    "train.batch_size=16",
    "adapter.kind=lora",
]


def _book() -> LedgerBook:
    book = LedgerBook(DPConfig(enabled=True, target_epsilon=8.0))
    for round_ in (1, 2):
        for cid in (0, 3):
            book.observe(
                round_,
                {
                    "partition-id": cid,
                    "dp-steps": 5,
                    "dp-noise-multiplier": 1.1,
                    "dp-sample-rate": 0.05,
                    "epsilon": 0.5 * round_,
                },
            )
    return book


def test_checkpoint_round_trips_adapter_round_and_book(tmp_path):
    book = _book()
    arrays = {"a.lora_B.weight": torch.arange(6.0).reshape(3, 2), "head.bias": torch.ones(2)}
    Checkpoint(2, arrays, book.to_json()).save(tmp_path / "ck.safetensors")
    back = Checkpoint.load(tmp_path / "ck.safetensors")
    assert back.round == 2 and back.arrays.keys() == arrays.keys()
    assert all(torch.equal(back.arrays[k], v) for k, v in arrays.items())
    again = LedgerBook.from_json(back.book)
    assert again.dp == book.dp and again.reported_epsilon == book.reported_epsilon
    for cid in (0, 3):
        assert again.ledgers[cid].events == book.ledgers[cid].events
        assert again.ledgers[cid].epsilon() == book.ledgers[cid].epsilon() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left behind


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a resumable checkpoint"):
        Checkpoint.load(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no checkpoint"):
        Checkpoint.load(tmp_path / "missing.safetensors")


def _checkpointed_round(path: Path) -> int:
    try:
        return Checkpoint.load(path).round
    except Exception:  # not written yet, or being replaced this instant
        return 0


@pytest.mark.slow
def test_server_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    from simulations.run import resume, simulate

    cfg = resolve("quickstart", SMALL)
    whole = simulate(cfg, tmp_path, name="whole")
    cut = RunDir(tmp_path / "cut")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [a for s in SMALL for a in ("--set", s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", *args, "--out", str(tmp_path), "--name", "cut"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while _checkpointed_round(cut.checkpoint) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server process and every worker it started
        proc.wait()
    done = _checkpointed_round(cut.checkpoint)
    assert done == 1 and not (cut.adapter / "fedlora.json").exists(), "the kill did not land mid-run"
    resumed = resume(cut.path)
    assert [line["round"] for line in resumed.metrics()] == [1, 2]
    ours = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    reference = load_file(str(whole.adapter / "adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6)
    assert json.loads((resumed.path / "privacy.json").read_text())["clients"] == {}
