"""Cryptographically secure randomness for the DP mechanism: Poisson sampling and Gaussian noise.

Why not a ``torch.Generator``: torch's CPU Mersenne Twister keeps only 32 bits of its seed
(``manual_seed(s)`` and ``manual_seed(s & 0xffffffff)`` draw the same numbers), so a server that sees a
noised update could search all 2^32 seeds in about a CPU-day, regenerate the noise and subtract it.
Opacus's ``secure_mode`` fixes that with torchcsprng, which no longer builds for current torch. So every
draw here comes from a cryptographic source with no seed to search and no state to recover from observed
outputs (``dp.noise_source``):

- ``os``: the operating system's CSPRNG (``os.urandom``: getrandom(2), ChaCha20 on Linux);
- ``stream``: the ChaCha20 keystream of ``cryptography`` (OpenSSL's vectorised cipher) under a 256-bit key
  and a nonce drawn fresh from ``os.urandom`` for every draw and never kept: the same construction as the
  kernel's, run in user space in bulk, without a system call per 256 bytes. No draw can be reproduced.

Gaussians follow Opacus's secure-mode recipe against floating-point attacks on the sampler (Jin et
al., arXiv 2112.05307; Holohan & Braghin, arXiv 2107.10138 §5.1): the sum of four draws of standard
deviation ``std``, halved, computed in float64 from 53-bit uniforms (Box-Muller), whatever the dtype the
noise is added in. The transform runs on the device the noise is added on (float64: never on Apple's
MPS, which has none), so a GPU step pays for the random bytes and one copy only.
"""

from __future__ import annotations

import math
import os
from typing import get_args

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fed.config import NoiseSource

SOURCES: dict[str, str] = {
    "os": "os.urandom (kernel CSPRNG)",
    "stream": "ChaCha20 keystream (cryptography), fresh key and nonce from os.urandom per draw",
}
"""What the privacy report names as the source of the mechanism's randomness, per ``dp.noise_source``."""


def random_bytes(n: int, source: str = "os") -> bytes:
    """``n`` bytes from ``source`` (``os`` or ``stream``, see the module docstring)."""
    if source == "os":
        return os.urandom(n)
    if source == "stream":
        # The nonce's first 4 bytes are ChaCha20's block counter: from 0, a draw never wraps it (256 GiB).
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(4) + os.urandom(12)), mode=None)
        return cipher.encryptor().update(bytes(n))
    raise ValueError(f"unknown noise source {source!r}; accepted: {', '.join(get_args(NoiseSource))}")


def uniform(n: int, source: str = "os") -> torch.Tensor:
    """``n`` float64 draws, uniform on [0, 1), each from 53 fresh bits of ``source``."""
    words = np.frombuffer(random_bytes(8 * n, source), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy(words.astype(np.float64) * 2.0**-53)


def _transform_device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device or "cpu")
    return torch.device("cpu") if device.type == "mps" else device  # MPS computes no float64


def _standard_normal(n: int, source: str = "os", device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` float64 standard normals by Box-Muller (both outputs of every pair are used), on ``device``."""
    pairs = (n + 1) // 2
    u = uniform(2 * pairs, source).to(_transform_device(device))
    radius = u[:pairs].neg_().add_(1.0).log_().mul_(-2.0).sqrt_()  # 1 - u in (0, 1]: the log is finite
    angle = u[pairs:].mul_(2.0 * math.pi)
    return torch.cat([radius * torch.cos(angle), radius.mul_(angle.sin_())])[:n]


def normal(
    shape: torch.Size | tuple[int, ...],
    std: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    source: str = "os",
) -> torch.Tensor:
    """Gaussian noise N(0, std^2) of ``shape`` on ``device``: four draws summed and halved (Opacus secure
    mode), from ``source``; the whole of it in one draw, so a step's noise for every tensor costs one call."""
    n = math.prod(shape)
    if std == 0 or n == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    total = _standard_normal(4 * n, source, device).view(4, n).sum(0)
    return total.mul_(std / 2.0).reshape(shape).to(device=device, dtype=dtype)


def bernoulli_indices(n: int, rate: float) -> list[int]:
    """Indices ``i < n`` kept independently with probability ``rate``: one Poisson-sampled batch (its coins
    from the OS CSPRNG: 8 bytes an example)."""
    return torch.nonzero(uniform(n) < rate).flatten().tolist()
