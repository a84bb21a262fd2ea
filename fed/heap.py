"""Handing a finished message's memory back, so that a process serving client after client stays flat.

A simulation actor (and a resident node) trains one client after another in one process. Two things keep
memory there that no Python object owns: reference cycles that Opacus's hooks leave behind (freed only by
the cycle collector), and glibc's heap, which keeps the pages of freed tensors mapped for reuse; each
client's batches have other shapes, so the pages left behind by one are seldom a fit for the next and the
resident size creeps up client by client. ``malloc_trim`` returns those pages to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release() -> None:
    """Collect reference cycles, then give the heap's free pages back to the system."""
    gc.collect()
    if (trim := _trim()) is not None:
        trim(0)
