"""bfloat16 autocast of the frozen base: adapter, head and every DP quantity stay float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed.precision import autocast, cpu_has_native_bf16, resolve_precision
from fed.privacy.dpsgd import per_sample_module
from fed.train import per_example_losses
from tests.helpers import KINDS, _bert_adapter, _naive_grads


def test_auto_picks_bfloat16_only_with_native_cpu_support():
    assert cpu_has_native_bf16("flags : fpu sse avx512f avx512_bf16 amx_tile")
    assert cpu_has_native_bf16("flags : fpu amx_bf16")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f")
    assert resolve_precision("float32") == torch.float32 and resolve_precision("bfloat16") == torch.bfloat16
    assert resolve_precision("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="'half'.*auto, float32, bfloat16"):
        resolve_precision("half")


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_auto_on_a_gpu_follows_the_gpus_bfloat16_support(monkeypatch, gpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert resolve_precision("auto", "cuda") == (torch.bfloat16 if gpu_bf16 else torch.float32)


def test_roselora_masks_are_built_where_the_scores_live():
    """A GPU run prunes on the GPU: the mask may not silently come back on the CPU (meta stands in here)."""
    from fed.adapters.base import top_lines

    mask = top_lines(torch.empty(3, 5, device="meta"), 1, 2)
    assert mask.device.type == "meta" and mask.dtype == torch.bool


def test_frozen_base_runs_in_bfloat16_and_trained_modules_in_float32(batch):
    adapter, _task = _bert_adapter("lora")
    model = adapter.model
    dtypes: dict[str, torch.dtype] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, name=name: dtypes.__setitem__(name, out.dtype))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with autocast(model, torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in hooks:
        h.remove()
    trained = {n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert trained and logits.dtype == torch.float32
    for name, dtype in dtypes.items():
        assert dtype == (torch.float32 if name in trained else torch.bfloat16), name
    assert not torch.is_autocast_enabled("cpu")  # the context and every hook are gone afterwards


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_are_float32_and_match_a_naive_loop(kind, batch):
    adapter, task = _bert_adapter(kind)
    with autocast(adapter.model, torch.bfloat16):
        reference = _naive_grads(adapter, task, batch)
    gsm = per_sample_module(adapter.model, "hooks", loss_reduction="sum")
    with autocast(adapter.model, torch.bfloat16):
        loss = per_example_losses(adapter, task, gsm, batch)[1].sum()
    loss.backward()
    params = dict(adapter.model.named_parameters())
    for name in adapter.names(trainable=True):
        per_sample = params[name].grad_sample
        assert per_sample.dtype == torch.float32, name
        # the base's bfloat16 rounding differs between a batch and one example: a loose but real match
        torch.testing.assert_close(per_sample, torch.stack([r[name] for r in reference]), rtol=0.1, atol=2e-3)
    gsm._close()
