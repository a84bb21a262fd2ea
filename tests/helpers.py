"""Helpers shared by the tests: tiny models built from configs (no downloads, milliseconds), the adapter matrix,
and small builders used by more than one test module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fed.adapters import build
from fed.adapters.base import Aggregation
from fed.adapters.families.lora import LoraLinear
from fed.config import DPConfig
from fed.tasks import Classification
from fed.train import per_example_losses

if TYPE_CHECKING:
    from flwr.app import Message  # imported where used, so collecting the tests does not load Flower

VOCAB = 50
# The test matrix: one row per registered adapter family (derived from the registry), with the options that
# keep each tiny, and one per mode that changes what trains or travels.
SIZES: dict[str, dict] = {
    "mole": {"experts": 3, "balance": 0.5},
    "mor": {"experts": 3},
    "roselora": {"keep_ratio": 0.25},
}
MODES: dict[str, dict] = {"moslora-frozen-a": {"kind": "moslora", "freeze_a": True}}


def _matrix() -> dict[str, dict]:
    from fed.adapters import kinds

    return {kind: SIZES.get(kind, {}) for kind in kinds()} | MODES


MATRIX: dict[str, dict] = _matrix()
KINDS = list(MATRIX)
HEAD = ("classifier.weight", "classifier.bias")
DP = DPConfig(enabled=True, target_epsilon=8.0, delta=1e-5)


def spec(row: str, targets: tuple[str, ...], **extra):
    """The AdapterSpec of a matrix row (rank 4, alpha 8) on ``targets``."""
    from fed.adapters import make_spec

    return make_spec(**{"kind": row, "rank": 4, "alpha": 8.0, "targets": targets, **MATRIX[row], **extra})


M = TypeVar("M", bound=nn.Module)


def seeded(build: Callable[[], M], seed: int) -> M:
    """A model built under ``seed`` without touching the process's RNG, frozen and in training mode (what a
    base is once loaded: dropout, where configured, on)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    model.requires_grad_(False)
    return model.train()


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return seeded(lambda: BertForSequenceClassification(config), seed)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(**{k: v for k, v in _DECODER.items() if k != "pad_token_id"})  # no padding row
    return seeded(lambda: LlamaForCausalLM(config), seed)


def randomise(adapter, std: float, seed: int = 0) -> None:
    """Fill the adapter's sent tensors with seeded noise: a non-zero B, so every factor gets a gradient
    and an exported adapter differs from the base model. Server-owned tensors (Dynamic LoRA's 0/1 rank
    masks) keep their values: noise there is a state no run can reach."""
    g = torch.Generator().manual_seed(seed)
    params = dict(adapter.model.named_parameters())
    owned = set(adapter.names(sent=True)) - {
        n for n, kind in adapter.aggregation_of().items() if kind != Aggregation.ALLOCATION
    }
    with torch.no_grad():
        for name in adapter.names(sent=True):
            if name not in owned:
                params[name].copy_(torch.randn(params[name].shape, generator=g) * std)


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


# Adapters on the tiny BERT, and client deltas for them.


def make(row: str, seed: int = 7, model_seed: int = 0, **extra):
    return build(tiny_bert(model_seed), spec(row, ("query", "value"), **extra), seed, head=HEAD)


def client_deltas(adapter, count: int, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {n: scale * torch.randn(t.shape, generator=g) for n, t in adapter.sent_state().items()} for _ in range(count)
    ]


def _layers(adapter):
    return [(p, m) for p, m in adapter.model.named_modules() if isinstance(m, LoraLinear)]


def _dense(layer, path, tensors):
    """s·B·(M)·A from explicit tensors, the frozen A taken from the layer: an independent product."""
    a = tensors.get(f"{path}.lora_A.weight", layer.lora_A.weight.detach())
    mixer = tensors.get(f"{path}.lora_AB.weight")
    b = tensors[f"{path}.lora_B.weight"]
    return layer.scaling * (b @ mixer @ a if mixer is not None else b @ a)


# Per-example gradients: the reference loop, one backward pass per example.


class _NoTokenizer:
    pad_token_id = 0


def _bert_adapter(kind: str):
    adapter = build(tiny_bert(), spec(kind, ("query", "value")), seed=3, head=("classifier.weight", "classifier.bias"))
    randomise(adapter, 0.3)
    return adapter, Classification(_NoTokenizer(), 16)


def _naive_grads(adapter, task, batch):
    """One forward/backward per example: the reference per-example gradients."""
    names = adapter.names(trainable=True)
    params = dict(adapter.model.named_parameters())
    out = []
    for i in range(len(batch["input_ids"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        objective = per_example_losses(adapter, task, adapter.model, one)[1]  # what training minimises
        grads = torch.autograd.grad(objective.sum(), [params[n] for n in names])
        out.append(dict(zip(names, grads)))
    return out


def check_per_sample_gradients(model, kind: str, batch) -> None:
    """Opacus's per-example gradients of every trained tensor against one backward pass per example."""
    from fed.models import task_head_names
    from fed.privacy.dpsgd import per_sample_module

    adapter = build(model, spec(kind, ("query", "value")), seed=3, head=tuple(task_head_names(model)))
    randomise(adapter, 0.3)
    task = Classification(_NoTokenizer(), 16)
    reference = _naive_grads(adapter, task, batch)
    gsm = per_sample_module(model, "hooks", loss_reduction="sum")
    task.per_example_loss(gsm, batch).sum().backward()
    params = dict(model.named_parameters())
    for name in adapter.names(trainable=True):
        expected = torch.stack([r[name] for r in reference])
        torch.testing.assert_close(params[name].grad_sample, expected, rtol=1e-4, atol=1e-6)
    gsm._close()


# A training round on rows that are already tensors.


class _Rows:
    """A five-row 'dataset' whose rows are already tensors."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.batch.items()}


class _Encoded(Classification):
    def encode(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rows


# The deployment tests' node data.

WORDS = (("bad", "awful", "poor"), ("good", "great", "nice"))


def _node_files(root) -> list[str]:
    """Node 0 holds a CSV with string labels, node 1 a parquet file with integer labels."""
    import pandas as pd

    rows = [{"text": f"a {WORDS[i % 2][i % 3]} film number {i}", "label": ("neg", "pos")[i % 2]} for i in range(40)]
    frame = pd.DataFrame(rows)
    frame.iloc[:20].to_csv(root / "node0.csv", index=False)
    frame.iloc[20:].assign(label=[i % 2 for i in range(20, 40)]).to_parquet(root / "node1.parquet")
    return [str(root / "node0.csv"), str(root / "node1.parquet")]


# Every common architecture, tiny and random (no downloads): its task and config. No dropout, so a DP step
# compares exactly with a per-example loop.

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    pad_token_id=0,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
)
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("causal-lm", "llama", _DECODER),
    "qwen2": ("causal-lm", "qwen2", _DECODER),
    "mistral": ("causal-lm", "mistral", _DECODER),
    "gemma": ("causal-lm", "gemma", {**_DECODER, "head_dim": 8}),
    "phi3": ("causal-lm", "phi3", _DECODER),
    "gpt2": (
        "causal-lm",
        "gpt2",
        dict(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "bert": ("classification", "bert", _ENCODER),
    "roberta": ("classification", "roberta", {**_ENCODER, "pad_token_id": 1}),
    "distilbert": (
        "classification",
        "distilbert",
        dict(
            vocab_size=VOCAB,
            dim=16,
            n_layers=2,
            n_heads=2,
            hidden_dim=32,
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            num_labels=2,
        ),
    ),
}


def hf_arch(name: str, seed: int = 0):
    """The tiny random Hugging Face model of architecture ``name`` as Hugging Face builds it (a PEFT user's base)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    task, model_type, fields = ARCHITECTURES[name]
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return seeded(lambda: auto.from_config(AutoConfig.for_model(model_type, **fields)), seed)


def tiny_arch(name: str, seed: int = 0):
    """``hf_arch`` prepared as ``fed.models.load_model`` prepares a base (GPT-2's Conv1D made nn.Linear)."""
    from fed.models import linear_projections

    model = hf_arch(name, seed)
    linear_projections(model)
    return model
