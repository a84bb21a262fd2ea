"""Checks that need a CUDA GPU (skipped without one): the model placed by ``train.device``, a noiseless DP step
on the GPU equal to the same step on the CPU (a model moved after wrapping would diverge: opacus#820), and what
leaves the model on the CPU. Run on a GPU machine: ``python -m pytest -o addopts="" -q tests/test_device_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from fed.config.sources import resolve
from fed.precision import model_device
from fed.session import adapted_model
from fed.tasks import CausalLM
from tests.helpers import randomise
from tests.test_architectures import _task_batch, assert_same_update, dp_step_update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _session(device: str, kind: str = "lora"):
    cfg = resolve("instruct", ["model.name=tiny-llama", f"adapter.kind={kind}", "train.precision=float32"])
    adapter, task = adapted_model(cfg, device)
    randomise(adapter, 0.3)
    return adapter, task


@pytest.mark.parametrize("kind", ["lora", "ffa-lora", "roselora"])
def test_a_gpu_client_places_everything_once_and_sends_cpu_tensors(kind):
    adapter, _ = _session("cuda:0", kind)
    assert {p.device.type for p in adapter.model.parameters()} == {"cuda"}
    assert {t.device.type for t in adapter.sent_state().values()} == {"cpu"}
    assert {m.device.type for m in adapter.masks().values()} <= {"cpu"}
    assert adapter.fingerprint() == _session("cpu", kind)[0].fingerprint()  # the same frozen factors as a CPU server


@pytest.mark.parametrize("kind", ["lora", "ffa-lora"])
def test_a_noiseless_dp_step_on_the_gpu_equals_the_cpus(kind, batch):
    batch = _task_batch("llama", batch)
    updates = []
    for device in ("cpu", "cuda:0"):
        adapter, task = _session(device, kind)
        assert isinstance(task, CausalLM) and model_device(adapter.model).type == device[:4].rstrip(":")
        on_device = {k: v.to(device) for k, v in batch.items()}
        updates.append({n: u.cpu() for n, u in dp_step_update(adapter, task, on_device).items()})
    assert_same_update(updates[1], updates[0])


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_on_a_gpu_the_base_is_stored_low_and_the_adapter_and_noise_stay_float32(precision):
    cfg = resolve("instruct", ["model.name=tiny-llama", f"train.precision={precision}"])
    adapter, _ = adapted_model(cfg, "cuda:0")
    own = set(adapter.names())
    dtypes = {n: p.dtype for n, p in adapter.model.named_parameters()}
    assert {dtypes[n] for n in own} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in own} == {getattr(torch, precision)}
    from fed.privacy import secure_rng

    noise = secure_rng.normal((1000,), 1.0, torch.float32, torch.device("cuda:0"), "stream")
    assert noise.device.type == "cuda" and noise.dtype == torch.float32 and 0.8 < float(noise.std()) < 1.2


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_a_quantised_base_trains_a_dp_round_on_the_gpu(bits):
    pytest.importorskip("bitsandbytes")
    from fed.session import client_session
    from fed.train import train_round

    cfg = resolve("instruct", ["model.name=tiny-llama", f"model.quantize={bits}", "train.device=cuda"])
    session = client_session(cfg, 0)
    from fed.privacy.mechanism import DpSettings

    result = train_round(
        session.adapter, session.task, session.data.train, steps=2, batch_size=4, lr=1e-3, weight_decay=0.0,
        dp=DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, num_examples=len(session.data.train)),
        gen=torch.Generator(), precision=torch.bfloat16,
    )  # fmt: skip
    assert result.steps == 2
    assert all(p.dtype == torch.float32 for p in session.adapter.trainable_parameters())
