"""Opacus wiring for one local round of DP-SGD over the adapter's trainable tensors only.

We compose Opacus's parts (a grad-sample wrapper, a DP optimizer, its uniform Poisson sampler)
instead of calling ``make_private``: our loss is a per-example vector we build ourselves (token-mean
per example for causal LMs, so one example's gradient never depends on another's length), the
sample rate is the one the ledger plans with, and an empty Poisson batch becomes an honest
noise-only step instead of an exception. All of the mechanism's randomness (which examples a batch
holds, the noise) comes from the OS CSPRNG (``fed.privacy.secure_rng``), never from a seedable
generator; dropout is off while a DP step runs, so no other randomness touches the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

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
    loss_noise_multiplier: float = 0.0
    loss_clip: float = 0.0

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_examples))

    @property
    def gradient_noise_multiplier(self) -> float:
        """The gradient's share: ``1/sigma^2 = 1/sigma_g^2 + 1/sigma_l^2`` solved for sigma_g."""
        if self.loss_noise_multiplier <= 0:
            return self.noise_multiplier
        if self.loss_noise_multiplier <= self.noise_multiplier:
            raise ValueError(f"dp.loss_noise_multiplier={self.loss_noise_multiplier:g} must exceed the accounted "
                             f"noise multiplier {self.noise_multiplier:.4g}: the loss release would use the whole budget")
        return (self.noise_multiplier ** -2 - self.loss_noise_multiplier ** -2) ** -0.5

    def noised_loss_sum(self, per_example_loss: torch.Tensor | None) -> float:
        """One step's loss release: the clipped losses of the batch summed, plus Gaussian noise (CSPRNG)."""
        clipped = 0.0 if per_example_loss is None else float(per_example_loss.detach().clamp(0, self.loss_clip).sum())
        return clipped + float(secure_rng.normal((1,), self.loss_noise_multiplier * self.loss_clip, torch.float64))


def poisson_batches(num_examples: int, sample_rate: float, steps: int) -> Iterator[list[int]]:
    """Index lists of Poisson-sampled batches (possibly empty): the sampling the accountant assumes.

    Opacus's ``UniformWithReplacementSampler`` does the same with a ``torch.Generator``; we draw the
    coins from the CSPRNG instead, because which examples a batch holds is part of the secret.
    """
    for _ in range(steps):
        yield secure_rng.bernoulli_indices(num_examples, sample_rate)


class SecureNoise:
    """Mixin for an Opacus DP optimizer: the Gaussian noise comes from the OS CSPRNG.

    Same arithmetic as Opacus's ``add_noise`` (noise of std ``noise_multiplier * max_grad_norm`` added to
    the clipped sum), with ``secure_rng.normal`` in place of a ``torch.Generator``.
    """

    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float

    def add_noise(self) -> None:
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_rng.normal(p.summed_grad.shape, sigma * self.max_grad_norm, p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a model whose layers couple the examples of a batch (BatchNorm): one example's gradient
    would then depend on the others, and per-example clipping would no longer bound its influence."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"this model cannot train under DP-SGD: {'; '.join(str(e)[:160] for e in errors)}")


class OneLogicalBatch:
    """Mixin for an Opacus DP optimizer: several backward passes before a step are chunks of *one* batch.

    Opacus divides the clipped sum by ``expected_batch_size * accumulated_iterations``, treating every
    backward pass as a batch of its own (gradient accumulation). Our chunks (a Poisson batch cut by
    length) are one sampled batch, so the sum is divided by the expected batch size alone: the
    release is exactly DP-SGD's noised mean over the sampled batch.
    """

    params: list[nn.Parameter]
    expected_batch_size: int
    loss_reduction: str

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size


class PlainStepper:
    """Non-private steps: the batch's mean loss (accumulated chunk by chunk), backward, step."""

    chunkable = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = model
        self.optimizer = optimizer

    def accumulate(self, per_example_loss: torch.Tensor, batch_len: int) -> None:
        """Backward of one chunk's share of the batch mean (its loss sum over the whole batch's size)."""
        (per_example_loss.sum() / batch_len).backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Nothing to undo."""


class DpStepper:
    """DP-SGD steps: per-sample clipping of the trainable tensors, Gaussian noise, expected-batch scaling.

    ``hooks`` computes per-sample gradients with Opacus's module hooks; ``ghost`` computes only their
    norms (ghost clipping) and a second backward, which saves memory on large layers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp: DpSettings) -> None:
        check_dp_compatible(model)
        ghost = dp.mode == "ghost"
        extra = {"max_grad_norm": dp.max_grad_norm, "use_ghost_clipping": True} if ghost else {}
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        for dropout in self.dropouts:
            dropout.eval()  # its masks would come from the process-global generator
        self.module = prepare_module(model, dp.mode, batch_first=True, loss_reduction="mean", **extra)
        base = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=dp.mode)
        secure = type(f"Secure{base.__name__}", (SecureNoise, OneLogicalBatch, base), {})
        self.optimizer = secure(optimizer, noise_multiplier=dp.gradient_noise_multiplier, max_grad_norm=dp.max_grad_norm,
                                expected_batch_size=dp.expected_batch_size, loss_reduction="mean")
        self.ghost = ghost

    @property
    def chunkable(self) -> bool:
        """Whether a batch may arrive in several backward passes: hooks keep each pass's per-sample
        gradients (Opacus concatenates them at the step); ghost clipping clips inside its backward."""
        return not self.ghost

    def accumulate(self, per_example_loss: torch.Tensor, batch_len: int) -> None:
        """Per-sample gradients of one chunk (``batch_len`` is implied: every example keeps its own)."""
        if self.ghost:
            DPTensorFastGradientClipping(self.module, self.optimizer, per_example_loss, "mean").backward()
        else:
            per_example_loss.mean().backward()  # hooks rescale by the chunk's size: per-example gradients

    def step(self) -> None:
        """Clip each example, sum, add noise once, divide by the expected batch size, update."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def empty_step(self) -> None:
        """A Poisson batch with no examples: the update is pure noise, as the mechanism prescribes."""
        for p in self.optimizer.params:
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        self.step()

    def close(self) -> None:
        """Detach Opacus from the model so the cached model is clean for the next round."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
        for dropout in self.dropouts:
            dropout.train()
