"""The local round a client runs: a fixed number of optimiser steps on its own data, plain or DP-SGD.

Only the adapter's trainable tensors enter the optimiser, so DP clipping covers exactly what is
trained and sent. Evaluation lives here too because it shares the task's batching and loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

import torch
from datasets import Dataset
from torch import nn

from fed.adapters import Adapter
from fed.config import LrSchedule, OptimizerName
from fed.precision import autocast, loss_scale, model_device
from fed.privacy.mechanism import DpSettings, poisson_batches
from fed.tasks import Task

if TYPE_CHECKING:
    from fed.privacy.dpsgd import DpStepper


@dataclass(frozen=True)
class RoundResult:
    steps: int
    num_examples: int
    loss: float
    """Mean per-example training loss over the round's non-empty batches."""
    wall_s: float
    usage: dict[str, float] = field(default_factory=dict)
    """Use of each expert slot over the round: MoLE's routed tokens, MoR's summed router probabilities
    (routed families only; sent only without DP)."""
    released_loss: float | None = None
    """Under DP with a loss release: the noised mean loss, the only loss a DP client may send."""


class PlainStepper:
    """Non-private steps: the batch's mean loss (accumulated chunk by chunk), backward, step."""

    chunkable = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_scale: float = 1.0) -> None:
        """``loss_scale``: what the losses handed to ``accumulate`` were multiplied by (float16), undone at the step."""
        self.module = model
        self.optimizer = optimizer
        self.loss_scale = loss_scale

    def accumulate(self, per_example_loss: torch.Tensor, batch_len: int) -> None:
        """Backward of one chunk's share of the batch mean (its loss sum over the whole batch's size)."""
        (per_example_loss.sum() / batch_len).backward()

    def step(self) -> None:
        if self.loss_scale != 1.0:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = torch.nan_to_num(p.grad / self.loss_scale, nan=0.0, posinf=0.0, neginf=0.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Nothing to undo."""


def _plain_batches(num_examples: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Fixed-size batches drawn without replacement, reshuffled every pass over the data."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def round_lr(lr: float, schedule: str, round_: int, rounds: int) -> float:
    """The learning rate of round ``round_`` (1-based) of ``rounds`` under ``schedule`` (``train.lr_schedule``)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (min(max(round_, 1), rounds) - 1) / rounds)) / 2
    raise ValueError(f"unknown lr schedule {schedule!r}; accepted: {', '.join(get_args(LrSchedule))}")


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """AdamW, or SGD with (heavy-ball) momentum.

    Under DP the choice matters: Adam divides every coordinate by its own running scale, so a
    coordinate whose gradient is mostly noise still moves by about ``lr`` each step; SGD moves it by the
    noise itself, which momentum averages out over steps.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(get_args(OptimizerName))}")


def length_chunks(lengths: Sequence[int], indices: list[int], size: int) -> list[list[int]]:
    """``indices`` (``lengths[k]`` tokens for ``indices[k]``) sorted by length and cut into chunks of at most
    ``size`` (0: one chunk).

    Each chunk is padded only to its own longest text, so little compute goes to padding (the sentiment
    texts average 25 tokens; a batch of 32 pads to about 50, a chunk of 4 to about its mean). Examples never
    interact (per-example loss, no layer couples a batch), so the step's gradient does not depend on how its
    batch is cut.
    """
    if size <= 0 or len(indices) <= size:
        return [indices]
    ordered = [i for _, i in sorted(zip(lengths, indices))]
    return [ordered[k : k + size] for k in range(0, len(ordered), size)]


@contextlib.contextmanager
def dropout_seeded_from(gen: torch.Generator, device: torch.device) -> Iterator[None]:
    """Dropout draws from torch's global generator, whose state depends on whatever the process (a
    simulation actor serving many clients) ran before. Seeded from ``gen`` for the round, a plain round's
    masks follow the run seed alone; the global state (the CPU's, and ``device``'s when it is a GPU) is
    restored afterwards. (Under DP dropout is off.)"""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def encode_on(task: Task, rows: dict[str, list], device: torch.device) -> dict[str, torch.Tensor]:
    """``rows`` tokenised into a batch on ``device`` (the model's: the CPU here, a GPU where one is used)."""
    return {name: tensor.to(device) for name, tensor in task.encode(rows).items()}


def per_example_losses(
    adapter: Adapter, task: Task, model: nn.Module, batch: dict[str, torch.Tensor], private: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's task loss, and what training minimises: that loss plus the adapter's auxiliary (a
    mixture's balance) loss. ``private`` (DP-SGD): the auxiliary loss is per example, so DP's bound holds;
    else it is the batch-level loss (the paper's). It is read after the forward because the router records
    its gates during it. ``model`` is the adapter's model or Opacus's wrapper of it."""
    loss = task.per_example_loss(model, batch)
    aux = adapter.auxiliary_loss(batch["attention_mask"], per_example=private)
    return loss, loss if aux is None else loss + aux


def train_round(
    adapter: Adapter,
    task: Task,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    dp: DpSettings | None,
    gen: torch.Generator,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    precision: torch.dtype = torch.float32,
    micro_batch: int = 0,
) -> RoundResult:
    """Run ``steps`` local steps on ``data``; with ``dp``, Poisson batches at ``dp.sample_rate``.

    ``precision`` is the frozen base's autocast dtype; the trained tensors and DP arithmetic stay float32
    (``fed.precision``; under float16 the loss is scaled and the gradients unscaled before anything reads them).
    ``micro_batch`` > 0 runs each batch as length-sorted chunks of at most that many examples (one optimiser step
    per batch either way): less padding, less activation memory.

    ``gen`` orders the plain (non-private) batches and seeds their dropout only: under DP every random
    choice comes from a cryptographic source, so nothing the server knows (the run seed) can reproduce it, and
    dropout is off.
    """
    start = time.perf_counter()
    model = adapter.model
    model.train()
    device = model_device(model)
    opt = make_optimizer(adapter.trainable_parameters(), optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    adapter.watch(opt)  # step hooks (RoseLoRA's sensitivity) read the gradient the optimizer applies
    scale = loss_scale(precision)
    if dp is None:
        stepper: PlainStepper | DpStepper = PlainStepper(model, opt, scale)
        batches = _plain_batches(len(data), min(batch_size, len(data)), steps, gen)
    else:
        head = set(adapter.head_names())
        from fed.privacy.dpsgd import (
            DpStepper,  # Opacus only in a process that trains privately
        )

        stepper = DpStepper(model, opt, dp, [n in head for n in adapter.names(trainable=True)], loss_scale=scale)
        batches = poisson_batches(len(data), dp.sample_rate, steps)
    losses: list[float] = []
    released: list[float] = []
    releaser = dp if dp is not None and dp.loss_noise_multiplier > 0 else None  # the noised loss, when released
    usage: Counter[str] = Counter()
    size = micro_batch if stepper.chunkable else 0
    with dropout_seeded_from(gen, device) if dp is None else contextlib.nullcontext(), contextlib.closing(stepper):
        for indices in batches:
            if not indices:
                assert not isinstance(stepper, PlainStepper)  # only Poisson sampling (DP) yields empty batches
                stepper.empty_step()
                adapter.after_step()  # a noise-only step is still a step of the schedule
                if releaser is not None:
                    released.append(releaser.noised_loss_sum(None))
                continue
            chunk_losses: list[torch.Tensor] = []
            lengths = task.lengths(data[indices]) if 0 < size < len(indices) else []  # this batch's rows only
            for chunk in length_chunks(lengths, indices, size):
                batch = encode_on(task, data[chunk], device)
                with autocast(model, precision):
                    loss, objective = per_example_losses(adapter, task, stepper.module, batch, dp is not None)
                stepper.accumulate(objective * scale if scale != 1.0 else objective, len(indices))
                chunk_losses.append(loss.detach())
                usage.update(adapter.usage(batch["attention_mask"]))
            stepper.step()
            adapter.after_step()  # step hooks (RoseLoRA's pruning) read the applied gradient: post-processing under DP
            batch_losses = torch.cat(chunk_losses)
            if releaser is not None:  # one noised release per step, over the whole sampled batch
                released.append(releaser.noised_loss_sum(batch_losses))
            losses.append(float(batch_losses.mean()))
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    noised = (
        sum(released) / (len(released) * releaser.expected_batch_size) if releaser is not None and released else None
    )
    return RoundResult(
        steps=steps,
        num_examples=len(data),
        loss=mean_loss,
        wall_s=time.perf_counter() - start,
        usage=dict(usage),
        released_loss=noised,
    )


@torch.no_grad()
def evaluate(
    adapter: Adapter,
    task: Task,
    data: Dataset,
    *,
    batch_size: int,
    limit: int = 0,
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Mean loss (and accuracy where the task has one) on up to ``limit`` examples (0 = all)."""
    model = adapter.model
    model.eval()
    device = model_device(model)
    count = len(data) if limit <= 0 else min(limit, len(data))
    loss_sum, correct_sum = 0.0, 0.0
    try:  # batches of similar length: little padding
        for chunk in length_chunks(task.lengths(data[:count]), list(range(count)), batch_size):
            with autocast(model, precision):
                loss, correct = task.score(model, encode_on(task, data[chunk], device))
            loss_sum += float(loss.sum())
            correct_sum += float(correct.sum())
    finally:
        model.train()
    metrics = {"loss": loss_sum / max(count, 1), "num_examples": float(count)}
    if not math.isnan(correct_sum):
        metrics["accuracy"] = correct_sum / max(count, 1)
    return metrics
