"""Centre the mean-pooled head's features on public text (``model.center``), and scale them (``model.scale``).

Most of a sentence-embedding feature is shared by every input: most of the squared norm of a MiniLM
block-4 feature is the mean feature. A linear head over raw features learns its weights along that
shared direction as a second bias, about ten times faster than the bias itself, and under DP that part
takes its share of every example's clipping bound while it says nothing about the label. On a client
that holds one class, that fast bias is what its local steps push the furthest. Subtracting the mean
feature first removes the direction; ``W (x - m) + b`` is still a linear head, so nothing else changes.

The mean ``m`` comes from the first ``TEXTS`` texts of a public built-in dataset read by the base model
(before any adapter): it depends on nothing a client holds, so it costs no privacy, and server and
clients compute the same vector from the same shipped files.

``model.scale`` also divides each centred dimension by its standard deviation over the same public texts.
Clipped SGD on a linear head moves fastest along the features' widest directions and slowest along the
narrowest, and the step budget of a private run ends before the narrow ones are learned; the public scale
evens them out at no privacy cost, where the clients' own standard deviations would cost budget. What it
gained on the ``private`` preset is measured in docs/studies/2026-12-03-head-replay.md.

Both vectors are cached on disk under a digest of the base weights, the texts and the token budget, so one
run computes them once however many processes build the model.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fed.atomic import save_atomic
from fed.data.datasets import load_task_dataset
from fed.models import MeanPooledClassifier, cache_root, mean_over_tokens

TEXTS = 2000
"""Public texts averaged: the mean of 2,000 SMS texts points within cosine 0.88 of a sentiment client's own."""
BATCH = 64
SCALE_FLOOR = 1e-3


def _digest(model: MeanPooledClassifier, texts: list[str], max_length: int) -> str:
    """Names the mean by everything it depends on, so a changed model, source or budget never reuses it."""
    h = hashlib.sha256(f"{max_length}\n".encode())
    for text in texts:
        h.update(text.encode() + b"\0")
    for name, tensor in sorted(model.trunk.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def _feature_stats(
    model: MeanPooledClassifier, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """The mean and the (population) standard deviation over ``texts`` of the pooled feature the head
    reads, dropout off, summed in float64."""
    was_training = model.training
    model.eval()
    total = torch.zeros(model.classifier.in_features, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(
            texts[start : start + BATCH], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        hidden = model.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        pooled = mean_over_tokens(hidden, batch["attention_mask"]).double()
        total += pooled.sum(0)
        squares += (pooled**2).sum(0)
    model.train(was_training)
    mean = total / len(texts)
    std = (squares / len(texts) - mean**2).clamp(min=0).sqrt()
    return {"mean": mean.float(), "std": std.float()}


def public_stats(
    model: MeanPooledClassifier, tokenizer: PreTrainedTokenizerBase, source: str, max_length: int
) -> dict[str, torch.Tensor]:
    """``mean`` and ``std``: the pooled features of ``source``'s first ``TEXTS`` texts under ``model``'s
    current trunk, per dimension."""
    texts = list(load_task_dataset(source, "classification")["text"][:TEXTS])
    if not texts:
        raise ValueError(f"model.center={source!r} has no texts to average")
    path = cache_root() / "public-stats" / f"{_digest(model, texts, max_length)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    stats = _feature_stats(model, tokenizer, texts, max_length)
    save_atomic(path, stats)  # processes of one run race here
    return stats


def centre_on(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, source: str, max_length: int, *, scale: bool = False
) -> None:
    """Make ``model``'s head subtract ``source``'s public mean feature and, with ``scale``, divide by its
    public standard deviation (in place; before any adapter). A dimension the public texts barely move is
    divided by at least ``SCALE_FLOOR`` of the mean deviation, so it cannot blow up."""
    if not isinstance(model, MeanPooledClassifier):
        raise ValueError(
            f"model.center={source!r} needs the mean-pooled head (model.pooling='mean'), not {type(model).__name__}"
        )
    stats = public_stats(model, tokenizer, source, max_length)
    model.center.copy_(stats["mean"])
    if scale:
        model.scale.copy_(stats["std"].clamp(min=SCALE_FLOOR * float(stats["std"].mean())))
