"""Where a client trains: ``train.device`` (or a node's own ``device``) resolved, once, to a torch device.

The model is placed there before the adapter is injected, and the injected tensors follow the base at once
(``fed.adapters.build``), before an optimiser or Opacus holds a reference to them: moving a model after a
wrapper captured its parameters is how LoRA weights were silently corrupted in opacus#820. Batches and the
DP noise are then added on that device; what leaves the model (the sent state, masks, exports) is copied to
the CPU by ``fed.adapters.Adapter``.
"""

from __future__ import annotations

import torch

from fed.config import ConfigError, device_problems

_SIMULATION_HINT = (
    "in `fed simulate` give each client a GPU share with simulation.gpus_per_client (e.g. 0.25), "
    "else Ray hides the GPUs from the clients"
)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def resolve_device(setting: str, key: str = "train.device") -> torch.device:
    """``setting`` as a torch device on this machine: ``auto`` is ``cuda:0`` when a CUDA GPU is visible, else
    the CPU; a named device that this machine lacks is a ConfigError naming it (``key``: where it was set)."""
    problems = device_problems(key, setting)
    if problems:
        raise ConfigError(problems[0])
    if setting == "auto":
        return torch.device("cuda:0" if _cuda_count() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "mps":
        if not _mps_available():
            raise ConfigError(f"{key}='mps' but this machine has no usable Apple GPU (MPS); use 'cpu' or 'auto'")
        return torch.device("mps")
    index = int(setting.partition(":")[2] or 0)
    count = _cuda_count()
    if count == 0:
        raise ConfigError(
            f"{key}={setting!r} but no CUDA GPU is visible to this process; use 'cpu' or 'auto', or {_SIMULATION_HINT}"
        )
    if index >= count:
        raise ConfigError(f"{key}={setting!r} but this process sees {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)
