"""What the resident runtime's deployment tests share: the data file, the run configs, and reading the nodes'
logs and the runs' metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from fed.config.sources import resolve

SERVED = "resident: task of run"
STARTED = "resident ClientApp process"
VOLATILE = {"wall_s"}  # the only field of a round's line that depends on the machine, not on the run


def data_file(root: Path) -> Path:
    words = ("good fine great", "bad dull poor")
    path = root / "reviews.csv"
    rows = [f"a {words[i % 2].split()[i % 3]} film number {i},{('pos', 'neg')[i % 2]}" for i in range(48)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def run_config(model_dir: Path, data: Path, *extra: str):
    return resolve(
        "quickstart",
        [
            f"model.name={model_dir}",
            "model.max_length=16",
            f"data.name={data}",
            "data.labels=neg,pos",
            "adapter.kind=ffa-lora",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=8",
            *extra,
        ],
    )


PLAIN = ("dp.enabled=false", "federation.fraction_evaluate=1", "simulation.actors=1")  # one Ray actor: memory
PRIVATE = ("dp.enabled=true", "dp.target_epsilon=8", "federation.fraction_evaluate=0")


def round_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def wait_for(condition, what: str, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def log_lines(path: Path, text: str) -> list[str]:
    """Lines of a node's log holding ``text``, in Flower's format only: importing Opacus adds a handler to the
    root logger that repeats every line in its own format (a date first)."""
    if not path.is_file():
        return []
    return [line for line in path.read_text(errors="replace").splitlines() if text in line and not line[:1].isdigit()]


def count_lines(path: Path, text: str) -> int:
    return len(log_lines(path, text))


def resident_pids(path: Path) -> set[str]:
    """The pids of the resident processes a node's log says started (each logs its pid once, when ready)."""
    return {m.group(1) for line in log_lines(path, STARTED) if (m := re.search(r"process (\d+) ready", line))}
