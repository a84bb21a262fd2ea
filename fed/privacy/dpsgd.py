"""Opacus wiring for one local round of DP-SGD over the adapter's trainable tensors only.

We compose Opacus's parts (a grad-sample wrapper, a DP optimizer, its uniform Poisson sampler)
instead of calling ``make_private``: our loss is a per-example vector we build ourselves (token-mean
per example for causal LMs, so one example's gradient never depends on another's length), the
sample rate is the one the ledger plans with, and an empty Poisson batch becomes an honest
noise-only step instead of an exception. All of the mechanism's randomness (which examples a batch
holds, the noise) comes from a cryptographic source (``fed.privacy.secure_rng``), never from a seedable
generator; dropout is off while a DP step runs, so no other randomness touches the update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.grad_sample import AbstractGradSampleModule, register_grad_sampler
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from fed.privacy import secure_rng
from fed.privacy.mechanism import DpSettings, layer_bounds


class SecureNoise:
    """Mixin for an Opacus DP optimizer: the Gaussian noise comes from a cryptographic source, in bulk.

    Same arithmetic as Opacus's ``add_noise`` (noise of std ``noise_multiplier * max_grad_norm`` added to
    the clipped sum), with ``secure_rng.normal`` in place of a ``torch.Generator``: one draw for every
    trained tensor of the step, on the device they live on, split among them.
    """

    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    noise_source: str = "os"  # the DpStepper sets dp.noise_source on its optimizer

    def add_noise(self) -> None:
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        sums = [_summed_grad(p) for p in self.params]
        for summed in sums:
            _check_processed_flag(summed)
        flat = secure_rng.normal(
            (sum(s.numel() for s in sums),),
            sigma * self.max_grad_norm,
            sums[0].dtype,
            sums[0].device,
            self.noise_source,
        )
        for p, summed, noise in zip(self.params, sums, flat.split([s.numel() for s in sums])):
            p.grad = (summed + noise.view_as(summed)).view_as(p)
            _mark_as_processed(summed)


def unscale_per_example(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-example gradients (examples on dim 0) divided by ``scale``, an example with a non-finite entry (a
    float16 overflow in its own backward) set to zero: a function of that example alone, so its clipped
    contribution stays within the bound and the others' are untouched."""
    finite = torch.isfinite(grad.flatten(1)).all(1).view(-1, *[1] * (grad.dim() - 1))
    return torch.where(finite, grad / scale, torch.zeros((), dtype=grad.dtype, device=grad.device))


def _summed_grad(p: nn.Parameter) -> torch.Tensor:
    """The clipped per-sample gradient sum that Opacus's ``clip_and_accumulate`` attaches to ``p``."""
    summed: torch.Tensor = p.summed_grad  # type: ignore[attr-defined]  # Opacus sets it; torch does not declare it
    return summed


def per_sample_module(
    model: nn.Module, mode: str, *, loss_reduction: str = "mean", **extra: object
) -> AbstractGradSampleModule:
    """Opacus's grad-sample wrapper of ``model`` (``hooks`` or ``ghost``), per-example ("mean") loss.

    First registers the per-sample gradient rule of every module type in ``model`` that declares one
    (a ``grad_sampler(layer, activations, backprops)`` static method: a layer a family defines, whose
    parameters Opacus has no rule for). Registering here rather than at import keeps Opacus out of a
    process that never trains privately.
    """
    for kind in {type(m) for m in model.modules()}:
        rule = getattr(kind, "grad_sampler", None)
        if rule is not None:
            register_grad_sampler(kind)(rule)
    return prepare_module(model, mode, batch_first=True, loss_reduction=loss_reduction, **extra)


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
                assert p.grad is not None  # add_noise has just set it
                p.grad /= self.expected_batch_size


DROPOUT_ATTRIBUTES = ("p", "attention_dropout", "attn_dropout", "dropout_p")
"""Where a model keeps a dropout probability: ``nn.Dropout.p`` (BERT's attention also reads its module's
``.p`` and hands it to the attention function), and the float attributes attention modules keep instead."""


def dropouts_off(model: nn.Module) -> list[tuple[nn.Module, str, float]]:
    """Set every dropout probability in ``model`` to 0 and return what to restore. Zeroing the probability,
    not ``eval()``, also reaches the functional dropout attention modules apply while they are training
    (Opacus needs training mode for its hooks), so no random source but the mechanism's touches a DP step."""
    changed = []
    for module in model.modules():
        is_dropout = isinstance(module, nn.modules.dropout._DropoutNd)
        for attr in DROPOUT_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0 and (attr != "p" or is_dropout):
                setattr(module, attr, 0.0)
                changed.append((module, attr, value))
    return changed


class DpStepper:
    """DP-SGD steps: per-sample clipping of the trainable tensors, Gaussian noise, expected-batch scaling.

    ``hooks`` computes per-sample gradients with Opacus's module hooks; ``ghost`` computes only their
    norms (ghost clipping) and a second backward, which saves memory on large layers.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DpSettings,
        is_head: Sequence[bool] = (),
        loss_scale: float = 1.0,
    ) -> None:
        """``is_head`` flags the optimizer's parameters that belong to the task head, in its order; it
        matters only under per-layer clipping (``dp.head_clip_share`` > 0). ``loss_scale``: what the losses
        handed to ``accumulate`` were multiplied by (float16), divided out of every per-sample gradient
        before clipping (hooks only: ghost clipping clips inside the backward pass)."""
        if loss_scale != 1.0 and dp.mode == "ghost":
            raise ValueError("a loss scale (float16) needs mode='hooks': ghost clipping clips the scaled gradients")
        self.loss_scale = loss_scale
        check_dp_compatible(model)
        ghost, per_layer = dp.mode == "ghost", dp.head_clip_share > 0
        if per_layer and ghost:
            raise ValueError("per-layer clipping (head_clip_share > 0) needs mode='hooks': ghost clipping is flat only")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        flags = list(is_head) or [False] * len(params)
        if len(flags) != len(params):
            raise ValueError(f"is_head flags {len(flags)} tensors, the optimizer holds {len(params)}")
        extra: dict[str, object] = {"max_grad_norm": dp.max_grad_norm, "use_ghost_clipping": True} if ghost else {}
        self.dropouts = dropouts_off(model)  # their masks would come from the process-global generator
        self.module = per_sample_module(model, dp.mode, loss_reduction="mean", **extra)
        bound = layer_bounds(flags, dp.max_grad_norm, dp.head_clip_share) if per_layer else dp.max_grad_norm
        base = get_optimizer_class(
            clipping="per_layer" if per_layer else "flat", distributed=False, grad_sample_mode=dp.mode
        )
        secure = type(f"Secure{base.__name__}", (SecureNoise, OneLogicalBatch, base), {})
        self.optimizer = secure(
            optimizer,
            noise_multiplier=dp.gradient_noise_multiplier,
            max_grad_norm=bound,
            expected_batch_size=dp.expected_batch_size,
            loss_reduction="mean",
        )
        self.optimizer.noise_source = dp.noise_source
        self.optimizer.max_grad_norm = (
            dp.max_grad_norm
        )  # the noise's scale, exactly (Opacus re-sums the bounds in float32)
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
        if self.loss_scale != 1.0:
            for p in self.optimizer.params:
                sample = getattr(p, "grad_sample", None)  # one tensor, or one per backward pass (chunks)
                if isinstance(sample, list):
                    p.grad_sample = [unscale_per_example(g, self.loss_scale) for g in sample]
                elif sample is not None:
                    p.grad_sample = unscale_per_example(sample, self.loss_scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def empty_step(self) -> None:
        """A Poisson batch with no examples: the update is pure noise, as the mechanism prescribes."""
        for p in self.optimizer.params:
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step()

    def close(self) -> None:
        """Detach Opacus from the model so the cached model is clean for the next round."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
        for module, attr, value in self.dropouts:
            setattr(module, attr, value)
