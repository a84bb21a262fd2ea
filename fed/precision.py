"""Mixed precision: the frozen base model in bfloat16 (or float16), everything DP-SGD touches in float32.

Autocast runs the base model's matrix products in bfloat16 where the hardware has native bfloat16
arithmetic (CUDA, or a CPU with AVX-512 BF16 / AMX), which is where it pays; a GPU without it gets float16,
whose small gradients a static loss scale keeps from underflowing (undone on each example's gradient before
clipping). Every module that owns a trained parameter (adapter factors, mixers, routers, the head) runs with
autocast switched off and its inputs cast to float32, so its activations, the gradients flowing into it,
Opacus's per-sample gradients, their norms, the clipping and the noise are all float32: the clipping bound,
and with it the DP guarantee, stays exact. On a GPU (or when ``train.precision`` names a dtype) the frozen
base is also stored in that dtype, and ``model.quantize`` stores its linear layers in 8 or 4 bits
(bitsandbytes, CUDA only). On a CPU without native bfloat16 autocast is several times slower, so ``auto``
keeps float32 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from fed.config import ConfigError, Precision

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
    hardware computes it natively (a CUDA GPU that supports it, or a CPU with the flags above); a CUDA GPU
    without it (before Ampere) gets float16, with its loss scale (``loss_scale``)."""
    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if setting in named:
        return named[setting]
    if setting == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    raise ValueError(f"unknown precision {setting!r}; accepted: {', '.join(get_args(Precision))}")


def storage_dtype(setting: str, device_type: str) -> torch.dtype:
    """The dtype the frozen base's parameters are stored in: the compute dtype on a GPU (half the weight memory)
    or wherever ``train.precision`` names one; float32 for ``auto`` on a CPU, where bfloat16 is an autocast only
    (its residual stream stays float32, as the runs measured so far had it)."""
    if setting == "auto" and device_type != "cuda":
        return torch.float32
    return resolve_precision(setting, device_type)


def store_frozen(model: nn.Module, dtype: torch.dtype, keep: set[str]) -> None:
    """Cast ``model``'s frozen parameters to ``dtype`` in place, except those named in ``keep`` (the adapter's
    own tensors, frozen ones included: server and clients must hold the same seeded values) and every trained
    one (float32: its gradient, the clipping and the noise are computed in it)."""
    if dtype == torch.float32:
        return
    for name, param in model.named_parameters():
        if not param.requires_grad and name not in keep and param.is_floating_point():
            param.data = param.data.to(dtype)


LOSS_SCALE = 2.0**12
"""float16's static loss scale: its smallest normal number is 6e-5, and the gradients flowing back through a
frozen float16 base to an adapter's lower layers fall below it; scaled up, they keep their digits. A static
scale (not a dynamic one that skips steps on overflow) because a skipped step would depend on the batch."""


def loss_scale(dtype: torch.dtype) -> float:
    """What the training loss is multiplied by before its backward pass under compute ``dtype`` (1: none)."""
    return LOSS_SCALE if dtype == torch.float16 else 1.0


def quantize_base(model: nn.Module, bits: str, device: torch.device, keep: set[str]) -> None:
    """Replace the frozen base's ``nn.Linear`` layers (not the adapter's, named in ``keep``, nor the output head
    tied to the embeddings) by bitsandbytes' ``bits`` (``8bit``, ``4bit`` NF4) layers, quantised as they move to
    ``device``. ``model.quantize`` needs a CUDA GPU and the ``gpu`` extra; anything else is refused by name."""
    if device.type != "cuda":
        raise ConfigError(f"model.quantize={bits!r} needs a CUDA GPU (bitsandbytes); this client trains on {device}")
    try:
        import bitsandbytes as bnb  # optional: the `gpu` extra
    except ImportError:
        raise ConfigError(
            f"model.quantize={bits!r} needs bitsandbytes: pip install 'fedlora[gpu]' (or set it to 'none')"
        ) from None
    output = getattr(model, "get_output_embeddings", lambda: None)()
    for path, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or linear is output or any(p.requires_grad for p in linear.parameters()):
            continue
        if any(f"{path}.{leaf}" in keep for leaf, _ in linear.named_parameters()):
            continue
        bias = linear.bias is not None
        weight = linear.weight.data.to("cpu")
        if bits == "4bit":
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
        if bias:
            layer.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer.to(device))


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
