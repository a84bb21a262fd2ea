"""Cryptographically secure randomness for the DP mechanism: Poisson sampling and Gaussian noise.

Why not a ``torch.Generator``: torch's CPU Mersenne Twister keeps only 32 bits of its seed
(``manual_seed(s)`` and ``manual_seed(s & 0xffffffff)`` draw the same numbers), so a server that sees a
noised update could search all 2^32 seeds in about a CPU-day, regenerate the noise and subtract it.
Opacus's ``secure_mode`` fixes that with torchcsprng, which no longer builds for current torch. So every
draw here comes from the operating system's CSPRNG (``os.urandom``: getrandom(2), ChaCha20 on Linux):
there is no seed to search, and no state to recover from observed outputs.

Gaussians follow Opacus's secure-mode recipe against floating-point attacks on the sampler (Jin et
al., arXiv 2112.05307; Holohan & Braghin, arXiv 2107.10138 §5.1): the sum of four draws of standard
deviation ``std``, halved, computed in float64 from 53-bit uniforms (Box-Muller).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

SOURCE = "os.urandom (kernel CSPRNG)"
"""What the privacy report names as the source of the mechanism's randomness."""


def uniform(n: int) -> torch.Tensor:
    """``n`` float64 draws, uniform on [0, 1), each from 53 fresh bits of the OS CSPRNG."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy(words.astype(np.float64) * 2.0**-53)


def _standard_normal(n: int) -> torch.Tensor:
    """``n`` float64 standard normals by Box-Muller (both outputs of every pair are used)."""
    pairs = (n + 1) // 2
    u1, u2 = 1.0 - uniform(pairs), uniform(pairs)  # u1 in (0, 1]: log is finite
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def normal(shape: torch.Size | tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise N(0, std^2) of ``shape``: four CSPRNG draws summed and halved (Opacus secure mode)."""
    n = math.prod(shape)
    if std == 0 or n == 0:
        return torch.zeros(shape, dtype=dtype)
    total = _standard_normal(n) + _standard_normal(n) + _standard_normal(n) + _standard_normal(n)
    return (total * (std / 2.0)).reshape(shape).to(dtype)


def bernoulli_indices(n: int, rate: float) -> list[int]:
    """Indices ``i < n`` kept independently with probability ``rate``: one Poisson-sampled batch."""
    return torch.nonzero(uniform(n) < rate).flatten().tolist()
