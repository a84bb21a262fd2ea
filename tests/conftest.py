"""Tiny models built from configs (no downloads, milliseconds) shared by the tests."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import torch

# before transformers is imported (below)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from flwr.app import Message  # imported where used, so collecting the tests does not load Flower

VOCAB = 50
# The test matrix: one row per registered adapter family (derived from the registry), with the options that
# keep each tiny, and one per mode that changes what trains or travels.
SIZES: dict[str, dict] = {"mole": {"experts": 3, "balance": 0.5}, "mor": {"experts": 3}, "roselora": {"keep_ratio": 0.25}}
MODES: dict[str, dict] = {"moslora-frozen-a": {"kind": "moslora", "freeze_a": True}}


def _matrix() -> dict[str, dict]:
    from fed.adapters import kinds

    return {kind: SIZES.get(kind, {}) for kind in kinds()} | MODES


MATRIX: dict[str, dict] = _matrix()


def spec(row: str, targets: tuple[str, ...], **extra):
    """The AdapterSpec of a matrix row (rank 4, alpha 8) on ``targets``."""
    from fed.adapters import make_spec

    return make_spec(**{"kind": row, "rank": 4, "alpha": 8.0, "targets": targets, **MATRIX[row], **extra})


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout))
    model.requires_grad_(False)
    return model.train()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=32))
    model.requires_grad_(False)
    return model.train()


def randomise(adapter, std: float, seed: int = 0) -> None:
    """Fill the adapter's sent tensors with seeded noise: a non-zero B, so every factor gets a gradient
    and an exported adapter differs from the base model."""
    g = torch.Generator().manual_seed(seed)
    params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for name in adapter.names(sent=True):
            params[name].copy_(torch.randn(params[name].shape, generator=g) * std)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (5, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    labels = torch.tensor([0, 1, 1, 0, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a running Flower process need the run/node/task identity Flower would set."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1, raising=False)


def reply_from(node: int, arrays: dict[str, torch.Tensor] | None, metrics: dict) -> Message:
    """A train reply as the server receives it from ``node`` (Flower's metadata has no public setter)."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fed.wire import to_record

    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = to_record(arrays)
    msg = Message(content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg
