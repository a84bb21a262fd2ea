"""``train.device``: what the config accepts, how it resolves on a machine with or without a GPU (the GPU's
presence mocked: the resolution logic, never a faked CUDA), and where the model is placed relative to injection."""

from __future__ import annotations

import pytest
import torch

import fed.device
import fed.session
from fed.adapters import build
from fed.config import ConfigError, RunConfig
from fed.device import resolve_device
from fed.precision import model_device
from fed.session import ModelKey, _build, client_session
from tests.helpers import spec, tiny_llama


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_the_config_accepts_every_device_form(value):
    assert RunConfig.from_flat({"train.device": value}).train.device == value


@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:N", "cuda:-1", "tpu", "mps:0", ""])
def test_a_bad_device_is_refused_naming_what_is_accepted(value):
    with pytest.raises(ConfigError, match=r"train.device=.* accepted: auto, cpu, cuda, cuda:N, mps"):
        RunConfig.from_flat({"train.device": value})


def _gpus(monkeypatch, count: int, mps: bool = False) -> None:
    monkeypatch.setattr(fed.device, "_cuda_count", lambda: count)
    monkeypatch.setattr(fed.device, "_mps_available", lambda: mps)


def test_cpu_and_auto_without_a_gpu_resolve_to_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0, mps=True)  # auto takes CUDA only: an Apple GPU is used when named
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_takes_the_first_visible_gpu(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_the_real_machine_resolves_auto_to_what_it_has():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


def test_a_gpu_this_machine_lacks_is_refused_with_the_way_out(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible.*simulation.gpus_per_client"):
        resolve_device("cuda")
    _gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"'cuda:2' but this process sees 2 CUDA GPU\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="no usable Apple GPU"):
        resolve_device("mps")


def test_a_nodes_own_device_is_checked_and_named(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="node config device='gpu'"):
        client_session(RunConfig(), 0, None, device="gpu")
    with pytest.raises(ConfigError, match="node config device='cuda'"):
        client_session(RunConfig(), 0, None, device="cuda")


def test_the_simulation_gives_each_actor_its_gpu_share():
    from simulations.run import backend_config

    assert backend_config(RunConfig().simulation, verbose=False)["client_resources"]["num_gpus"] == 0.0
    shared = RunConfig.from_flat({"simulation.gpus_per_client": 0.25}).simulation
    assert backend_config(shared, verbose=False)["client_resources"]["num_gpus"] == 0.25
    for bad in (-0.5, 1.5):
        with pytest.raises(ConfigError, match="simulation.gpus_per_client"):
            RunConfig.from_flat({"simulation.gpus_per_client": bad})


def test_a_simulation_stops_before_any_worker_when_its_clients_cannot_get_the_gpu(monkeypatch):
    from simulations.run import _check_devices

    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="simulation.gpus_per_client=0.5 but this machine has no CUDA GPU"):
        _check_devices(RunConfig.from_flat({"simulation.gpus_per_client": 0.5}))
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="train.device='cuda' needs simulation.gpus_per_client > 0"):
        _check_devices(RunConfig.from_flat({"train.device": "cuda"}))
    _check_devices(RunConfig.from_flat({"train.device": "cuda", "simulation.gpus_per_client": 0.25}))
    _check_devices(RunConfig())  # auto, no share: the clients train on the CPU


class _Injected(Exception):
    """Stops ``_build`` at injection, where the spy has seen what it needs."""


def test_the_base_is_on_its_device_before_the_adapter_is_injected(monkeypatch):
    """``meta`` stands in for a GPU: a real device other than the CPU, where nothing can be computed."""
    seen: list[torch.device] = []

    def spy(model, *_, **__):
        seen.append(model_device(model))
        raise _Injected

    monkeypatch.setattr(fed.session, "build", spy)
    cfg = RunConfig.from_flat({"task": "causal-lm", "model.name": "tiny-llama"})
    with pytest.raises(_Injected):
        _build(ModelKey.of(cfg, "meta"))
    assert seen == [torch.device("meta")]


def test_injected_tensors_join_the_base_on_its_device():
    """Families draw on the CPU (the same values on every party); build moves them beside the base at once."""
    model = tiny_llama().to("meta")
    adapter = build(model, spec("lora", ("q_proj", "v_proj")), seed=3)
    assert {p.device for p in adapter.model.parameters()} == {torch.device("meta")}


def test_what_leaves_the_model_is_a_cpu_copy():
    adapter = build(tiny_llama(), spec("roselora", ("q_proj", "v_proj")), seed=3)
    sent = adapter.sent_state()
    assert {t.device for t in sent.values()} == {torch.device("cpu")}
    named = dict(adapter.model.named_parameters())
    assert all(sent[n].data_ptr() != named[n].data_ptr() for n in sent)  # copies, never views of the live model
    assert {m.device for m in adapter.masks().values()} <= {torch.device("cpu")}
