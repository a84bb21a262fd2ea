"""The local round a client runs: a fixed number of optimiser steps on its own data, plain or DP-SGD.

Only the adapter's trainable tensors enter the optimiser, so DP clipping covers exactly what is
trained and sent. Evaluation lives here too because it shares the task's batching and loss.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from datasets import Dataset

from fed.adapters import Adapter
from fed.privacy.dpsgd import DpSettings, DpStepper, PlainStepper, poisson_batches
from fed.tasks import Task


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


def _plain_batches(num_examples: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Fixed-size batches drawn without replacement, reshuffled every pass over the data."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def train_round(adapter: Adapter, task: Task, data: Dataset, *, steps: int, batch_size: int, lr: float,
                weight_decay: float, dp: DpSettings | None, gen: torch.Generator) -> RoundResult:
    """Run ``steps`` local steps on ``data``; with ``dp``, Poisson batches at ``dp.sample_rate``.

    ``gen`` orders the plain (non-private) batches only: under DP every random choice comes from the
    OS CSPRNG, so nothing the server knows (the run seed) can reproduce it.
    """
    start = time.perf_counter()
    model = adapter.model
    model.train()
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    if dp is None:
        stepper: PlainStepper | DpStepper = PlainStepper(model, optimizer)
        batches = _plain_batches(len(data), min(batch_size, len(data)), steps, gen)
    else:
        stepper = DpStepper(model, optimizer, dp)
        batches = poisson_batches(len(data), dp.sample_rate, steps)
    losses: list[float] = []
    released: list[float] = []
    release = dp is not None and dp.loss_noise_multiplier > 0
    usage: Counter[str] = Counter()
    try:
        for indices in batches:
            if not indices:
                stepper.empty_step()  # type: ignore[union-attr]  (only Poisson sampling yields empty batches)
                if release:
                    released.append(dp.noised_loss_sum(None))  # type: ignore[union-attr]
                continue
            batch = task.encode(data[indices])
            loss = task.per_example_loss(stepper.module, batch)
            if release:
                released.append(dp.noised_loss_sum(loss))  # type: ignore[union-attr]
            aux = adapter.auxiliary_loss(batch["attention_mask"])  # per example: keeps the DP bound
            stepper.step(loss if aux is None else loss + aux)
            losses.append(float(loss.detach().mean()))
            usage.update(adapter.usage(batch["attention_mask"]))
    finally:
        stepper.close()
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    noised = sum(released) / (len(released) * dp.expected_batch_size) if released else None  # type: ignore[union-attr]
    return RoundResult(steps=steps, num_examples=len(data), loss=mean_loss, wall_s=time.perf_counter() - start,
                       usage=dict(usage), released_loss=noised)


@torch.no_grad()
def evaluate(adapter: Adapter, task: Task, data: Dataset, *, batch_size: int, limit: int = 0) -> dict[str, float]:
    """Mean loss (and accuracy where the task has one) on up to ``limit`` examples (0 = all)."""
    model = adapter.model
    model.eval()
    count = len(data) if limit <= 0 else min(limit, len(data))
    loss_sum, correct_sum = 0.0, 0.0
    try:
        for start in range(0, count, batch_size):
            loss, correct = task.score(model, task.encode(data[start:min(start + batch_size, count)]))
            loss_sum += float(loss.sum())
            correct_sum += float(correct.sum())
    finally:
        model.train()
    metrics = {"loss": loss_sum / max(count, 1), "num_examples": float(count)}
    if not math.isnan(correct_sum):
        metrics["accuracy"] = correct_sum / max(count, 1)
    return metrics
