"""The per-process model cache hands every caller the adapter as built, whatever the last caller left in it."""

from __future__ import annotations

import torch

from fed.adapters import build
from fed.config.sources import resolve
from fed.models import load_model, task_head_names
from fed.session import adapted_model, adapter_spec


def _fresh(cfg):
    """The reference: a model and adapter built from scratch, outside the cache."""
    model = load_model(cfg.model.name, cfg.task, num_labels=2, seed=cfg.seed, pooling=cfg.model.pooling)
    return build(model, adapter_spec(cfg.adapter, model), cfg.seed, head=tuple(task_head_names(model)))


def test_a_second_run_in_one_process_starts_from_the_adapter_as_built():
    """The server loads a run's final adapter into the cached model to export it; a benchmark grid or a
    test session then starts the next run in the same process, which must not begin from that result."""
    cfg = resolve("quickstart", ["model.name=tiny-bert", 'data.labels=["negative","positive"]', "seed=7"])
    adapter, _ = adapted_model(cfg)
    g = torch.Generator().manual_seed(0)
    adapter.load({n: torch.randn(t.shape, generator=g) for n, t in adapter.sent_state().items()})  # a run's result
    adapter.set_rank(2)  # a lower-rank client was served last
    again, _ = adapted_model(cfg)
    assert again is adapter  # the cache is why this matters
    fresh = _fresh(cfg)
    expected, got = fresh.sent_state(), again.sent_state()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
    fresh.load({n: torch.randn(t.shape, generator=g) for n, t in expected.items()})  # B != 0: every rank shows
    again.load(fresh.sent_state())
    x = torch.randint(1, 50, (2, 6), generator=g)
    with torch.no_grad():  # full rank again: the fresh model's outputs exactly
        for model in (again.model, fresh.model):
            model.eval()
        outputs = [m(input_ids=x, attention_mask=torch.ones_like(x)).logits for m in (again.model, fresh.model)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
