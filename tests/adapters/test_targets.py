"""Adapter targets: plain leaf names as before, and path patterns that tell BERT's MLP from its attention."""

from __future__ import annotations

from importlib import resources

import pytest
import tomllib
import torch

from fed.adapters import build
from fed.adapters.families.mole import MoleLinear
from tests.helpers import HEAD, spec, tiny_bert

MLP = [f"bert.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("intermediate", "output")]
"""The tiny BERT's MLP projections, listed by hand (the attention output is ``attention.output.dense``)."""


def _wrapped(targets: tuple[str, ...], row: str = "lora") -> list[str]:
    adapter = build(tiny_bert(), spec(row, targets), seed=3, head=HEAD)
    return sorted(p.removesuffix(".lora_A.weight") for p in adapter.names() if p.endswith("lora_A.weight"))


def test_leaf_names_select_every_linear_so_named():
    assert _wrapped(("query", "value")) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{leaf}" for i in range(2) for leaf in ("query", "value")
    )
    dense = [*MLP, *(f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)), "bert.pooler.dense"]
    assert _wrapped(("dense",)) == sorted(dense)


def test_the_mixed_domains_preset_places_mole_experts_on_the_mlp_only(batch):
    preset = tomllib.loads(resources.files("fed.config").joinpath("presets/mixed-domains.toml").read_text())
    targets = tuple(preset["adapter"]["targets"])
    assert _wrapped(targets) == sorted(MLP)
    adapter = build(tiny_bert(), spec("mole", targets), seed=3, head=HEAD)
    layers = sorted(p for p, m in adapter.model.named_modules() if isinstance(m, MoleLinear))
    assert layers == sorted(MLP)
    routers = sorted(n for n in adapter.names(sent=True) if ".router." in n)
    assert routers == [f"bert.encoder.layer.{i}.intermediate.dense.router.gate.weight" for i in range(2)]
    out = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(out).all()


def test_a_pattern_must_match_a_whole_path_and_be_valid():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        _wrapped(("output\\.dense",))  # a suffix, not the whole path
    with pytest.raises(ValueError, match="not a valid regular expression|neither a leaf name"):
        _wrapped(("layer.(",))
