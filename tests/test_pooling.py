"""The mean-pooled classification head: what it computes, that it keeps examples independent (DP), that it
reads a trunk cut to its first blocks (``model.layers``) where the full model has that state, and
that it trains and exports like the model's own head."""

from __future__ import annotations

import json

import pytest
import torch

from fed.adapters import build
from fed.config import ConfigError, RunConfig
from fed.models import load_model, task_head_names
from fed.run.export import export_adapter, load_adapter
from tests.helpers import check_per_sample_gradients, randomise, spec


def _pooled(seed: int = 5):
    return load_model("tiny-bert", "classification", num_labels=3, seed=seed, pooling="mean")


def test_logits_are_a_linear_map_of_the_mean_over_real_tokens(batch):
    model = _pooled().eval()
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            real = ids[mask.bool()].unsqueeze(0)  # the example alone, unpadded
            hidden = model.bert(input_ids=real, attention_mask=torch.ones_like(real)).last_hidden_state[0]
            expected = model.classifier.weight @ hidden.mean(0) + model.classifier.bias
            torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)


def test_the_head_starts_at_zero_and_is_the_only_head_trained(batch):
    model = _pooled()
    assert task_head_names(model) == ["classifier.weight", "classifier.bias"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.count_nonzero(logits) == 0
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ["lora", "ffa-lora"])
def test_per_sample_gradients_equal_a_naive_loop(kind, batch):
    check_per_sample_gradients(_pooled(), kind, batch)


def test_export_has_no_peft_files_and_load_adapter_reproduces_outputs(batch, tmp_path):
    model = _pooled()
    adapter = build(model, spec("lora", ("query", "value")), seed=1, head=tuple(task_head_names(model)))
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert", pooling="mean")
    assert json.loads((tmp_path / "fedlora.json").read_text())["pooling"] == "mean"
    assert not (tmp_path / "adapter_config.json").exists()  # PEFT would rebuild the [CLS] head: wrong outputs
    fresh = load_adapter(_pooled(), tmp_path).model.eval()
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(fresh(**args).logits, model.eval()(**args).logits, rtol=1e-5, atol=1e-5)


def test_config_refuses_unknown_pooling_and_mean_pooling_for_causal_lm():
    with pytest.raises(ConfigError, match="model.pooling='max'.*cls, mean"):
        RunConfig.from_flat({"model.pooling": "max"})
    with pytest.raises(ConfigError, match="needs 'cls'"):
        RunConfig.from_flat({"task": "causal-lm", "model.pooling": "mean"})
    with pytest.raises(ValueError, match="task 'causal-lm' has none"):
        load_model("tiny-llama", "causal-lm", pooling="mean")


def test_a_cut_trunk_reads_the_full_models_hidden_state_at_the_cut(batch):
    full = _pooled().eval()
    cut = load_model("tiny-bert", "classification", num_labels=3, seed=5, pooling="mean", layers=1).eval()
    assert len(cut.bert.encoder.layer) == 1 and cut.config.num_hidden_layers == 1
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = full.bert(**args, output_hidden_states=True).hidden_states[1]  # after block 1 of 2
        torch.testing.assert_close(cut.bert(**args).last_hidden_state, expected)


def test_a_cut_trunk_has_adapters_only_below_the_cut_and_exports_without_peft(batch, tmp_path):
    def cut():
        return load_model("tiny-bert", "classification", num_labels=3, seed=5, pooling="mean", layers=1)

    model = cut()
    adapter = build(model, spec("lora", ("query", "value")), seed=1, head=tuple(task_head_names(model)))
    assert {n.split(".layer.")[1].split(".")[0] for n in adapter.names() if ".layer." in n} == {"0"}
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert", pooling="mean", layers=1)
    assert json.loads((tmp_path / "fedlora.json").read_text())["layers"] == 1
    assert not (tmp_path / "adapter_config.json").exists()  # PEFT would rebuild both blocks
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(cut(), tmp_path).model.eval()(**args).logits, model.eval()(**args).logits
        )


def test_layers_out_of_range_are_refused_with_the_accepted_range():
    with pytest.raises(ConfigError, match="model.layers=-1 must be >= 0"):
        RunConfig.from_flat({"model.layers": -1})
    with pytest.raises(ValueError, match=r"model.layers=3 is out of range; accepted: 0 \(all\) or 1..2"):
        load_model("tiny-bert", "classification", num_labels=2, layers=3)
    llama = load_model("tiny-llama", "causal-lm", layers=1)
    assert len(llama.model.layers) == 1 and llama.config.num_hidden_layers == 1
