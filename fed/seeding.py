"""Separate, reproducible random streams derived from the run seed; the global RNG is never reseeded.

Every party derives the same stream for the same purpose (e.g. FFA-LoRA's frozen A of one layer), so
tensors that never travel can still be identical everywhere.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends on the run seed and on what it is for (layer name, round, client)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator for one purpose: same arguments, same stream, on every machine."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
