"""A family defined here, outside the library, runs through the unmodified core: registry, config, training,
wire, strategy, export. Adding a family touches its own module and, for tests, one matrix row."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load_file
from torch import nn

import clients.app as honest
from fed.adapters import AdapterFamily, AdapterSpec, TensorGroup, kinds, register_family
from fed.adapters.base import Product, replace_linears
from fed.config.sources import resolve
from simulations.run import simulate

pytestmark = pytest.mark.slow


class ScaledLinear(nn.Module):
    """``h = (1 + s) ⊙ (W0 x) + b0``: one trainable scale per output feature (IA³-like), zero at the start."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.toy_scale = nn.Parameter(torch.zeros(base.out_features, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        out = nn.functional.linear(x, self.base_layer.weight)
        return out * (1 + self.toy_scale) + (bias if bias is not None else 0)

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        """The weight update ``diag(s)·W0``: linear in s, so the example-weighted mean is exact."""
        return {"": (get("toy_scale")[:, None] * self.base_layer.weight.detach(), None)}


@register_family
class ToyScale(AdapterFamily):
    kind = "toy-scale"

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = replace_linears(model, spec.targets, lambda path, linear: ScaledLinear(linear))
        return (TensorGroup("toy_scale", tuple(f"{p}.toy_scale" for p in paths), trainable=True, sent=True),)


toy_client = ClientApp()
"""The real ClientApp, its functions defined at this module's top level: a simulated client process unpickles
them by reference, so it imports this module, and with it the family's registration, before its first message."""


@toy_client.train()
def _train(msg: Message, context: Context) -> Message:
    return honest.train(msg, context)


@toy_client.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate_global(msg, context)


def test_a_family_registered_outside_the_library_runs_two_rounds(tmp_path):
    assert "toy-scale" in kinds()
    cfg = resolve(
        "quickstart",
        [
            "model.name=tiny-bert",
            "data.name=synthetic",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=4",
            "train.batch_size=16",
            "train.max_eval_examples=32",
            "adapter.kind=toy-scale",
            "train.lr=0.05",
        ],
    )
    run = simulate(cfg, tmp_path, name="toy", client=toy_client)
    lines = run.metrics()
    assert [line["round"] for line in lines] == [1, 2]
    assert all(line["clients"] == 2 and line["dropped"] == [] for line in lines)
    assert all(line["aggregation_error"] < 1e-6 for line in lines)  # the mean of a linear update is exact
    tensors = load_file(str(run.adapter / "adapter.safetensors"))
    scales = [t for name, t in tensors.items() if name.endswith("toy_scale")]
    assert scales and all(torch.count_nonzero(t) > 0 for t in scales)  # training reached the global adapter
    assert json.loads((run.adapter / "fedlora.json").read_text())["spec"]["kind"] == "toy-scale"
