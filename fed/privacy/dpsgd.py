"""Opacus wiring for one local round of DP-SGD over the adapter's trainable tensors only.

We compose Opacus's parts (a grad-sample wrapper, a DP optimizer, its uniform Poisson sampler)
instead of calling ``make_private``: our loss is a per-example vector we build ourselves (token-mean
per example for causal LMs, so one example's gradient never depends on another's length), the
sample rate is the one the ledger plans with, and an empty Poisson batch becomes an honest
noise-only step instead of an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn


@dataclass(frozen=True)
class DpSettings:
    """The mechanism of one local round; ``sample_rate`` is the Poisson rate the accountant sees."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    num_examples: int
    mode: str = "hooks"

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_examples))


def poisson_batches(num_examples: int, sample_rate: float, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Index lists of Poisson-sampled batches (possibly empty): the sampling the accountant assumes."""
    return iter(UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate,
                                              generator=gen, steps=steps))


class PlainStepper:
    """Non-private steps: mean loss, backward, step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = model
        self.optimizer = optimizer

    def step(self, per_example_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        per_example_loss.mean().backward()
        self.optimizer.step()

    def close(self) -> None:
        """Nothing to undo."""


class DpStepper:
    """DP-SGD steps: per-sample clipping of the trainable tensors, Gaussian noise, expected-batch scaling.

    ``hooks`` computes per-sample gradients with Opacus's module hooks; ``ghost`` computes only their
    norms (ghost clipping) and a second backward, which saves memory on large layers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp: DpSettings,
                 gen: torch.Generator) -> None:
        ghost = dp.mode == "ghost"
        extra = {"max_grad_norm": dp.max_grad_norm, "use_ghost_clipping": True} if ghost else {}
        self.module = prepare_module(model, dp.mode, batch_first=True, loss_reduction="mean", **extra)
        optimizer_cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=dp.mode)
        self.optimizer = optimizer_cls(optimizer, noise_multiplier=dp.noise_multiplier,
                                       max_grad_norm=dp.max_grad_norm,
                                       expected_batch_size=dp.expected_batch_size,
                                       loss_reduction="mean", generator=gen)
        self.ghost = ghost

    def step(self, per_example_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.ghost:
            DPTensorFastGradientClipping(self.module, self.optimizer, per_example_loss, "mean").backward()
        else:
            per_example_loss.mean().backward()
        self.optimizer.step()

    def empty_step(self) -> None:
        """A Poisson batch with no examples: the update is pure noise, as the mechanism prescribes."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        self.optimizer.step()

    def close(self) -> None:
        """Detach Opacus from the model so the cached model is clean for the next round."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
