"""The mechanism of a DP-SGD round, without Opacus: its settings, its Poisson batches, its clipping bounds.

What the planner, the ledger and a non-private client need to know about DP lives here, so a process
that never trains privately never imports Opacus (about a second of a client's start-up);
``fed.privacy.dpsgd`` wires these settings into Opacus when a DP step runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fed.privacy import secure_rng


@dataclass(frozen=True)
class DpSettings:
    """The mechanism of one local round; ``sample_rate`` is the Poisson rate the accountant sees.

    Each step releases the noised sum of clipped gradients and, when ``loss_noise_multiplier`` > 0, the
    noised sum of the batch's per-example losses clipped to [0, ``loss_clip``], from the same Poisson
    batch. Together they are one Gaussian mechanism whose per-example sensitivity, in units of each
    part's noise, is sqrt(1/sigma_g^2 + 1/sigma_l^2): exactly a single Gaussian of noise multiplier
    ``noise_multiplier`` (what the accountant composes) when the gradient's own noise is
    ``gradient_noise_multiplier``.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    num_examples: int
    mode: str = "hooks"
    head_clip_share: float = 0.0
    loss_noise_multiplier: float = 0.0
    loss_clip: float = 0.0
    noise_source: str = "stream"
    """``dp.noise_source``: where the noise's random bits come from (``fed.privacy.secure_rng``)."""

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_examples))

    @property
    def gradient_noise_multiplier(self) -> float:
        """The gradient's share: ``1/sigma^2 = 1/sigma_g^2 + 1/sigma_l^2`` solved for sigma_g."""
        if self.loss_noise_multiplier <= 0:
            return self.noise_multiplier
        if self.loss_noise_multiplier <= self.noise_multiplier:
            raise ValueError(
                f"dp.loss_noise_multiplier={self.loss_noise_multiplier:g} must exceed the accounted "
                f"noise multiplier {self.noise_multiplier:.4g}: the loss release would use the whole budget"
            )
        return (self.noise_multiplier**-2 - self.loss_noise_multiplier**-2) ** -0.5

    def noised_loss_sum(self, per_example_loss: torch.Tensor | None) -> float:
        """One step's loss release: the clipped losses of the batch summed, plus Gaussian noise (CSPRNG)."""
        clipped = 0.0 if per_example_loss is None else float(per_example_loss.detach().clamp(0, self.loss_clip).sum())
        return clipped + float(
            secure_rng.normal(
                (1,), self.loss_noise_multiplier * self.loss_clip, torch.float64, source=self.noise_source
            )
        )


def layer_bounds(is_head: Sequence[bool], max_grad_norm: float, head_share: float) -> list[float]:
    """Per-tensor clipping bounds for per-layer clipping, in the order of ``is_head``.

    The task head's tensors share ``head_share`` of ``max_grad_norm``², the adapter's tensors the rest,
    in equal parts within each group (all tensors equal parts when one group is empty). The squares sum
    to ``max_grad_norm``², so a clipped example's whole gradient still has norm at most ``max_grad_norm``:
    the one sensitivity the noise is scaled to and the accountant assumes.
    """
    heads = sum(is_head)
    rest = len(is_head) - heads
    if not heads or not rest:
        return [max_grad_norm / math.sqrt(len(is_head))] * len(is_head)
    return [max_grad_norm * math.sqrt(head_share / heads if h else (1 - head_share) / rest) for h in is_head]


def poisson_batches(num_examples: int, sample_rate: float, steps: int) -> Iterator[list[int]]:
    """Index lists of Poisson-sampled batches (possibly empty): the sampling the accountant assumes.

    Opacus's ``UniformWithReplacementSampler`` does the same with a ``torch.Generator``; we draw the
    coins from the CSPRNG instead, because which examples a batch holds is part of the secret.
    """
    for _ in range(steps):
        yield secure_rng.bernoulli_indices(num_examples, sample_rate)
