"""``allocation`` groups: tensors only the server sets (its family's server-side step decides them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fed.adapters.base import Structure
from strategies.kinds.base import Replies, Tensors


def server_owned(replies: Replies, structure: Structure, names: Sequence[str]) -> Tensors:
    """Tensors only the server sets (Dynamic LoRA's rank masks): clients' deltas are ignored."""
    return {n: torch.zeros_like(replies.global_[n]) for n in names}
