"""Files written by write-then-rename, so a crash or a racing writer leaves the old file or the new one, never half
of one: ledgers, checkpoints, cached features."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def _replace(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary sibling, synced to disk, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text``, or what it held before."""
    _replace(path, lambda tmp: Path(tmp).write_text(text))


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``path`` is the safetensors file of ``tensors``, or what it was before."""
    _replace(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))
