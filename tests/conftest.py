"""The tests' environment and shared fixtures; the helpers they share live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

# before transformers is imported (by tests.helpers, below)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests call the ClientApp as a simulation's worker does: the run config is the node's policy. A test of a
# deployed node's own policy removes it (tests/privacy/test_hostile_server.py).
os.environ.setdefault("FEDLORA_POLICY", "run-config")

from tests.helpers import VOCAB


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a slow test first, each file kept whole and in its own order: the workers take whole files
    in this order, so the minutes-long end-to-end files start early and the quick ones fill in behind them,
    instead of one long file running alone at the end while the other worker idles."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


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
