"""Mixed precision: the frozen base model in bfloat16, everything DP-SGD touches in float32.

Autocast runs the base model's matrix products in bfloat16 where the hardware has native bfloat16
arithmetic (CUDA, or a CPU with AVX-512 BF16 / AMX), which is where it pays. Every module that owns a
trained parameter (adapter factors, mixers, routers, the head) runs with autocast switched off and its
inputs cast to float32, so its activations, the gradients flowing into it, Opacus's per-sample
gradients, their norms, the clipping and the noise are all float32: the clipping bound, and with it the
DP guarantee, stays exact. On a CPU without native bfloat16 autocast is several times slower, so
``auto`` keeps float32 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from fed.config import Precision

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises bfloat16 arithmetic (Linux ``/proc/cpuinfo`` flags; False elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(flag in cpuinfo.split() for flag in _NATIVE_BF16_FLAGS)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live: batches are moved there and autocast runs for its device type."""
    return next(model.parameters()).device


def resolve_precision(setting: str, device_type: str = "cpu") -> torch.dtype:
    """``train.precision`` as a dtype for a model on ``device_type``: ``auto`` is bfloat16 only where the
    hardware computes it natively (a CUDA GPU that supports it, or a CPU with the flags above)."""
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto":
        native = (
            torch.cuda.is_bf16_supported(including_emulation=False) if device_type == "cuda" else cpu_has_native_bf16()
        )
        return torch.bfloat16 if native else torch.float32
    raise ValueError(f"unknown precision {setting!r}; accepted: {', '.join(get_args(Precision))}")


def _trained_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


@contextmanager
def autocast(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run ``model``'s forward passes under ``dtype`` autocast, except its trained modules (float32)."""
    if dtype == torch.float32:
        yield
        return
    states: list[bool] = []
    device = model_device(model).type

    def enter(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        states.append(torch.is_autocast_enabled(device))
        torch.set_autocast_enabled(device, False)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(*_: Any) -> None:
        torch.set_autocast_enabled(device, states.pop())

    handles = [
        h for m in _trained_modules(model) for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        with torch.autocast(device, dtype=dtype):
            yield
    finally:
        for handle in handles:
            handle.remove()
