"""The run directory: everything a run leaves behind, written as it goes so a crash loses nothing.

``config.toml`` (resolved), ``metrics.jsonl`` (a line per round, appended and flushed at once),
``privacy.json`` (per-client ledgers, rewritten atomically every round), ``checkpoints/latest.safetensors``
(what a resumed run continues from) and ``adapter/``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fed.atomic import write_atomic
from fed.config import RunConfig
from fed.config.sources import flatten
from fed.run.checkpoint import Checkpoint


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, root: str | Path, cfg: RunConfig, name: str = "") -> RunDir:
        """A new run folder under ``root`` (named by time and adapter unless ``name`` is given)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / (name or f"{stamp}-{cfg.adapter.kind}{'-dp' if cfg.dp.enabled else ''}")
        suffix = 1
        while path.exists() and any(path.iterdir()):
            suffix += 1
            path = path.with_name(f"{path.name.rsplit('.', 1)[0]}.{suffix}")
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / "config.toml", cfg.to_toml())
        return cls(path)

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "latest.safetensors"

    def config(self) -> RunConfig:
        """The run's resolved config, as written when it started (what a resumed run must use)."""
        return RunConfig.from_flat(flatten(tomllib.loads((self.path / "config.toml").read_text())))

    def resume_point(self) -> Checkpoint:
        """The last completed round's checkpoint, with the metric lines of any later, lost round dropped."""
        checkpoint = Checkpoint.load(self.checkpoint)
        self.keep_rounds_up_to(checkpoint.round)
        return checkpoint

    def keep_rounds_up_to(self, last_round: int) -> None:
        """Drop metric lines past ``last_round``: a round logged but not checkpointed before a crash
        is run again on resume, and must not appear twice."""
        kept = [line for line in self.metrics() if line["round"] <= last_round]
        write_atomic(self.path / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in kept))

    def append_metrics(self, line: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()

    def write_privacy(self, report: dict[str, Any]) -> None:
        write_atomic(self.path / "privacy.json", json.dumps(report, indent=2))

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
