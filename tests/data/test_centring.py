"""Centring (``model.center``) and scaling (``model.scale``) the mean-pooled head on public text: the
vectors are the public texts' mean feature and standard deviation (checked one text at a time), the head
stays a linear map (checked against the plain head with both folded into its weight and bias), the vectors
are cached by what they depend on, and they travel with an exported adapter."""

from __future__ import annotations

import json

import pytest
import torch

from fed.adapters import build
from fed.config import ConfigError, RunConfig
from fed.data import centring
from fed.data.datasets import load_task_dataset
from fed.models import load_model, load_tokenizer, task_head_names
from fed.run.export import export_adapter, load_adapter
from fed.session import adapted_model
from tests.helpers import check_per_sample_gradients, randomise, spec


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(centring, "TEXTS", 40)


def _pooled(seed: int = 5):
    return load_model("tiny-bert", "classification", num_labels=2, seed=seed, pooling="mean")


def _args(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_the_public_statistics_are_those_of_each_text_read_alone():
    model, tokenizer = _pooled(), load_tokenizer("tiny-bert", "classification")
    texts = load_task_dataset("sms-spam", "classification")["text"][:40]
    with torch.no_grad():
        features = []
        for text in texts:  # unpadded, one at a time: no batch, no mask
            ids = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
            features.append(model.bert(input_ids=ids).last_hidden_state[0].mean(0))
    stats, features = centring.public_stats(model, tokenizer, "sms-spam", 16), torch.stack(features)
    torch.testing.assert_close(stats["mean"], features.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std"], features.std(0, correction=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [False, True])
def test_a_centred_head_equals_the_plain_head_with_mean_and_scale_folded_in(batch, scale):
    centred, plain = _pooled(), _pooled()
    centring.centre_on(centred, load_tokenizer("tiny-bert", "classification"), "sms-spam", 16, scale=scale)
    assert centred.center.norm() > 0.1
    assert (centred.scale != 1).all() if scale else (centred.scale == 1).all()
    with torch.no_grad():
        for model in (centred, plain):
            torch.manual_seed(0)
            model.classifier.weight.normal_()
            model.classifier.bias.normal_()
        plain.classifier.weight /= centred.scale  # W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)
        plain.classifier.bias -= plain.classifier.weight @ centred.center
        torch.testing.assert_close(
            centred.eval()(**_args(batch)).logits, plain.eval()(**_args(batch)).logits, rtol=1e-5, atol=1e-5
        )


def test_the_statistics_are_computed_once_per_model_texts_and_budget(monkeypatch):
    model, tokenizer = _pooled(), load_tokenizer("tiny-bert", "classification")
    first = centring.public_stats(model, tokenizer, "sms-spam", 16)
    computed = []
    monkeypatch.setattr(centring, "_feature_stats", lambda *a: computed.append(a) or first)
    torch.testing.assert_close(centring.public_stats(model, tokenizer, "sms-spam", 16), first)
    assert computed == []  # read back from the cache
    centring.public_stats(model, tokenizer, "sms-spam", 8)
    centring.public_stats(_pooled(seed=6), tokenizer, "sms-spam", 16)  # other weights
    assert len(computed) == 2


def test_a_barely_moving_public_dimension_is_divided_by_the_floor(monkeypatch):
    model, tokenizer = _pooled(), load_tokenizer("tiny-bert", "classification")
    stats = centring.public_stats(model, tokenizer, "sms-spam", 16)
    stats["std"][3] = 0.0
    monkeypatch.setattr(centring, "public_stats", lambda *a: stats)
    centring.centre_on(model, tokenizer, "sms-spam", 16, scale=True)
    assert float(model.scale[3]) == pytest.approx(centring.SCALE_FLOOR * float(stats["std"].mean()))


def test_per_sample_gradients_of_a_scaled_head_equal_a_naive_loop(batch):
    model = _pooled()
    centring.centre_on(model, load_tokenizer("tiny-bert", "classification"), "sms-spam", 16, scale=True)
    check_per_sample_gradients(model, "ffa-lora", batch)


def test_an_exported_scaled_adapter_reproduces_its_outputs(batch, tmp_path):
    model = _pooled()
    centring.centre_on(model, load_tokenizer("tiny-bert", "classification"), "sms-spam", 16, scale=True)
    adapter = build(model, spec("ffa-lora", ("query", "value")), seed=1, head=tuple(task_head_names(model)))
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert", pooling="mean")
    assert json.loads((tmp_path / "fedlora.json").read_text())["center"] == "center.safetensors"
    fresh = load_adapter(_pooled(), tmp_path).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(**_args(batch)).logits, model.eval()(**_args(batch)).logits, rtol=1e-5, atol=1e-5
        )


def test_the_run_builds_the_scaled_head_from_the_config():
    cfg = RunConfig().with_overrides(
        {
            "model.name": "tiny-bert",
            "model.pooling": "mean",
            "model.max_length": 16,
            "model.center": "sms-spam",
            "model.scale": True,
            "data.name": "synthetic",
        }
    )
    adapter, _ = adapted_model(cfg)
    expected = centring.public_stats(
        _pooled(seed=cfg.seed), load_tokenizer("tiny-bert", "classification"), "sms-spam", 16
    )
    torch.testing.assert_close(adapter.model.center, expected["mean"])
    torch.testing.assert_close(adapter.model.scale, expected["std"])


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"model.center": "sms-spam", "model.pooling": "cls"}, "model.pooling='mean'"),
        ({"model.center": "sentiment", "model.pooling": "mean", "data.name": "sentiment"}, "its texts are private"),
        ({"model.scale": True, "model.pooling": "mean"}, "needs model.center"),
    ],
)
def test_the_config_refuses_a_centre_it_cannot_use(overrides, named):
    with pytest.raises(ConfigError, match=named):
        RunConfig().with_overrides(overrides)
