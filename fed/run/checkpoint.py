"""The server's per-round checkpoint: one safetensors file, replaced atomically, that a run resumes from.

The global adapter is the file's tensors; the round number, the privacy book and the strategy's state
ride in its (string) metadata. One file, one ``os.replace``: a crash leaves the previous round's
checkpoint or this one, never an adapter from one round beside a ledger from another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fed.atomic import save_atomic

FORMAT = "fedlora-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    """Last completed round."""
    arrays: dict[str, torch.Tensor]
    book: str
    """``LedgerBook.to_json()``: the server's copy of every client's DP events so far."""
    strategy: dict[str, Any] = field(default_factory=dict)
    """Strategy state beyond the global adapter (server optimiser moments, masks...); empty for FedAvg."""

    def save(self, path: Path) -> None:
        save_atomic(
            path,
            self.arrays,
            {"format": FORMAT, "round": str(self.round), "book": self.book, "strategy": json.dumps(self.strategy)},
        )

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint; ValueError naming the file when it is not one (e.g. from an older fedlora)."""
        if not path.is_file():
            raise ValueError(f"no checkpoint at {path}: the run has not completed a round yet")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a resumable checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})"
                )
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (safe_open is not iterable)
        return cls(int(meta["round"]), arrays, meta["book"], json.loads(meta["strategy"]))
