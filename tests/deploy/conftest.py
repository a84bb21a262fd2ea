"""The deployment tests' shared fixture: a tiny model saved where every process can load it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from deploy.launcher import Layout
from deploy.pki import make_pki
from fed.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny BERT + tokenizer saved as a plain checkpoint: a model any process can load by path."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = load_tokenizer("tiny-bert", "classification")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def node_file_run(model_dir, *extra: str):
    """The deployment tests' run: the tiny model, a DP FFA-LoRA run of 2 rounds of 2 steps on 2 nodes, each on
    its own file (the server's data name does not exist: it must never need client data), plus ``extra``."""
    from fed.config.sources import resolve

    return resolve(
        "quickstart",
        [
            f"model.name={model_dir}",
            "model.max_length=16",
            "data.name=/not/on/the/server.csv",
            "data.labels=neg,pos",
            "adapter.kind=ffa-lora",
            "dp.enabled=true",
            "federation.num_clients=2",
            "federation.rounds=2",
            "federation.fraction_evaluate=0",
            "train.local_steps=2",
            "train.batch_size=8",
            *extra,
        ],
    )


QUICK_GRID = {"reply-delay": 1.0}
"""A node policy for deployment tests that test something other than the reply grid: DP replies on a 1 s grid
instead of the default 30 s, so each DP round does not wait half a minute (tests/deploy/test_deploy.py keeps
the default an operator gets)."""


@pytest.fixture(autouse=True, scope="module")
def deployed_nodes():
    """Nodes started here are deployed nodes: their policy is their own (the strict default), not the run
    config as in a simulation, so the deployment tests run what an operator gets. Module-scoped, so it
    holds before a module's cluster starts."""
    from fed.privacy.client import POLICY_ENV

    saved = os.environ.pop(POLICY_ENV, None)
    yield
    if saved is not None:
        os.environ[POLICY_ENV] = saved


def tls_layout(root: Path, nodes: int = 2) -> Layout:
    """A deployment folder under ``root`` with loopback TLS certificates and keys for ``nodes`` nodes."""
    layout = Layout(root)
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes=nodes)
    return layout
