"""Centre the mean-pooled head's features on public text (``model.center``).

Most of a sentence-embedding feature is shared by every input: 59% of the squared norm of a MiniLM
block-4 feature is the mean feature. A linear head over raw features learns its weights along that
shared direction as a second bias, about ten times faster than the bias itself, and under DP that part
takes its share of every example's clipping bound while it says nothing about the label. On a client
that holds one class, that fast bias is what its local steps push the furthest. Subtracting the mean
feature first removes the direction; ``W (x - m) + b`` is still a linear head, so nothing else changes.

The mean ``m`` comes from the first ``TEXTS`` texts of a public built-in dataset read by the base model
(before any adapter): it depends on nothing a client holds, so it costs no privacy, and server and
clients compute the same vector from the same shipped files. It is cached on disk under a digest of the
base weights, the texts and the token budget, so one run computes it once however many processes build
the model.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file

from fed.checkpoint import save_atomic
from fed.data import load_task_dataset
from fed.models import MeanPooledClassifier, cache_root, mean_over_tokens

TEXTS = 2000
"""Public texts averaged: the mean of 2,000 SMS texts points within cosine 0.88 of a sentiment client's own."""
BATCH = 64


def _digest(model: MeanPooledClassifier, texts: list[str], max_length: int) -> str:
    """Names the mean by everything it depends on, so a changed model, source or budget never reuses it."""
    h = hashlib.sha256(f"{max_length}\n".encode())
    for text in texts:
        h.update(text.encode() + b"\0")
    for name, tensor in sorted(model.trunk.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def _mean_feature(model: MeanPooledClassifier, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """The mean over ``texts`` of the pooled feature the head reads, dropout off."""
    was_training = model.training
    model.eval()
    total = torch.zeros(model.classifier.in_features, dtype=torch.float64)
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(texts[start:start + BATCH], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        hidden = model.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        total += mean_over_tokens(hidden, batch["attention_mask"]).sum(0, dtype=torch.float64)
    model.train(was_training)
    return (total / len(texts)).float()


def public_mean(model: MeanPooledClassifier, tokenizer, source: str, max_length: int) -> torch.Tensor:
    """The mean pooled feature of ``source``'s first ``TEXTS`` texts under ``model``'s current trunk."""
    texts = list(load_task_dataset(source, "classification")["text"][:TEXTS])
    if not texts:
        raise ValueError(f"model.center={source!r} has no texts to average")
    path = cache_root() / "centres" / f"{_digest(model, texts, max_length)}.safetensors"
    if path.is_file():
        return load_file(str(path))["mean"]
    mean = _mean_feature(model, tokenizer, texts, max_length)
    save_atomic(path, {"mean": mean})  # processes of one run race here
    return mean


def centre_on(model: MeanPooledClassifier, tokenizer, source: str, max_length: int) -> None:
    """Make ``model``'s head subtract ``source``'s public mean feature (in place; before any adapter)."""
    if not isinstance(model, MeanPooledClassifier):
        raise ValueError(f"model.center={source!r} needs the mean-pooled head (model.pooling='mean'), "
                         f"not {type(model).__name__}")
    model.center.copy_(public_mean(model, tokenizer, source, max_length))
