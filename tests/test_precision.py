"""bfloat16 autocast of the frozen base: adapter, head and every DP quantity stay float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed.precision import autocast, cpu_has_native_bf16, resolve_precision
from fed.privacy.dpsgd import per_sample_module
from fed.train import per_example_losses
from tests.helpers import KINDS, _bert_adapter, _naive_grads, randomise


def test_auto_picks_bfloat16_only_with_native_cpu_support():
    assert cpu_has_native_bf16("flags : fpu sse avx512f avx512_bf16 amx_tile")
    assert cpu_has_native_bf16("flags : fpu amx_bf16")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f")
    assert resolve_precision("float32") == torch.float32 and resolve_precision("bfloat16") == torch.bfloat16
    assert resolve_precision("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="'half'.*auto, float32, bfloat16, float16"):
        resolve_precision("half")


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_auto_on_a_gpu_follows_the_gpus_bfloat16_support(monkeypatch, gpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert resolve_precision("auto", "cuda") == (torch.bfloat16 if gpu_bf16 else torch.float16)


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


def test_float16_is_named_and_is_auto_on_a_gpu_without_bfloat16(monkeypatch):
    from fed.precision import storage_dtype

    assert resolve_precision("float16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == torch.float16
    assert storage_dtype("auto", "cuda") == torch.float16  # on a GPU the base is stored as it computes
    assert storage_dtype("auto", "cpu") == torch.float32  # a CPU's auto is an autocast only
    assert storage_dtype("bfloat16", "cpu") == torch.bfloat16  # named: stored so


@pytest.mark.parametrize("kind", ["lora", "ffa-lora"])
def test_a_named_bfloat16_stores_the_frozen_base_in_it_and_the_adapter_in_float32(kind):
    from fed.config import RunConfig
    from fed.session import adapted_model

    cfg = RunConfig.from_flat(
        {"task": "causal-lm", "model.name": "tiny-llama", "adapter.kind": kind, "train.precision": "bfloat16"}
    )
    adapter, _ = adapted_model(cfg)
    own = set(adapter.names())
    dtypes = {n: p.dtype for n, p in adapter.model.named_parameters()}
    assert {dtypes[n] for n in own} == {torch.float32}  # FFA-LoRA's frozen, seeded A included
    assert {d for n, d in dtypes.items() if n not in own} == {torch.bfloat16}
    plain, _ = adapted_model(
        RunConfig.from_flat({"task": "causal-lm", "model.name": "tiny-llama", "adapter.kind": kind})
    )
    assert plain is not adapter and {p.dtype for p in plain.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_dp_step_over_a_low_precision_base_is_float32_and_clips_each_example(monkeypatch, precision):
    """The noiseless DP update against its definition: each example's gradient (one backward each, no loss
    scale) clipped to C, summed, divided by the expected batch size; the base stored in ``precision``."""
    from fed.config import RunConfig
    from fed.data.datasets import load_task_dataset
    from fed.privacy import secure_rng
    from fed.privacy.mechanism import DpSettings
    from fed.session import adapted_model
    from fed.train import encode_on, train_round

    cfg = RunConfig.from_flat({"task": "causal-lm", "model.name": "tiny-llama", "train.precision": precision})
    adapter, task = adapted_model(cfg)
    randomise(adapter, 0.3)
    dtype = getattr(torch, precision)
    rows = load_task_dataset("synthetic", "causal-lm", seed=0).select(range(4))
    batch = encode_on(task, rows[:], torch.device("cpu"))
    with autocast(adapter.model, dtype):
        reference = _naive_grads(adapter, task, batch)
    clipped = {n: torch.zeros_like(g) for n, g in reference[0].items()}
    for grads in reference:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        for n, g in grads.items():
            clipped[n] += g * min(1.0, 0.1 / float(norm))
    before = adapter.state(adapter.names(trainable=True))
    monkeypatch.setattr(secure_rng, "normal", lambda shape, std, dtype=torch.float32, *_: torch.zeros(shape))
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=1.0, num_examples=4)
    train_round(
        adapter, task, rows, steps=1, batch_size=4, lr=1.0, weight_decay=0.0, dp=dp,
        gen=torch.Generator(), optimizer="sgd", momentum=0.0, precision=dtype, micro_batch=2,
    )  # fmt: skip
    after = adapter.state(adapter.names(trainable=True))
    for name, value in after.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(before[name] - value, clipped[name] / 4, rtol=0.1, atol=2e-4)


def test_the_loss_scale_is_divided_out_and_an_overflowed_example_contributes_nothing():
    from fed.precision import LOSS_SCALE, loss_scale
    from fed.privacy.dpsgd import unscale_per_example

    assert loss_scale(torch.float16) == LOSS_SCALE and loss_scale(torch.bfloat16) == loss_scale(torch.float32) == 1
    grads = torch.tensor([[[2.0, 4.0]], [[float("inf"), 1.0]], [[float("nan"), 0.0]], [[-8.0, 0.0]]])
    out = unscale_per_example(grads, 2.0)
    assert out.tolist() == [[[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[-4.0, 0.0]]]


def test_float16_with_ghost_clipping_is_refused_by_the_config():
    from fed.config import ConfigError, RunConfig

    flat = {"train.precision": "float16", "dp.enabled": True, "dp.noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="float16.*dp.grad_sample_mode='hooks'"):
        RunConfig.from_flat(flat | {"dp.grad_sample_mode": "ghost"})
    RunConfig.from_flat(flat)  # hooks: accepted


def test_a_quantised_base_is_refused_off_a_cuda_gpu_naming_the_setting():
    from fed.config import ConfigError, RunConfig
    from fed.session import client_session

    cfg = RunConfig.from_flat({"task": "causal-lm", "model.name": "tiny-llama", "model.quantize": "4bit"})
    with pytest.raises(ConfigError, match="model.quantize='4bit' needs a CUDA GPU.*trains on cpu"):
        client_session(cfg, 0, device="cpu")


def test_a_quantised_base_without_bitsandbytes_says_how_to_install_it():
    from importlib.util import find_spec

    from fed.config import ConfigError
    from fed.precision import quantize_base

    if find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the refusal cannot be shown")
    with pytest.raises(ConfigError, match=r"model.quantize='8bit' needs bitsandbytes: pip install 'fedlora\[gpu\]'"):
        quantize_base(nn.Linear(2, 2), "8bit", torch.device("cuda"), set())
