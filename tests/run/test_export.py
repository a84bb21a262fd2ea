"""The exported global adapter loads with PEFT and reproduces our adapted model's outputs."""

from __future__ import annotations

import json

import pytest
import torch

from fed.adapters import AdapterSpec, build, make_spec
from fed.models import load_model
from fed.run.export import export_adapter, load_adapter
from tests.helpers import MATRIX, randomise, spec, tiny_llama

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "kind, extra",
    [("lora", {}), ("ffa-lora", {}), ("moslora", {}), ("moslora", {"freeze_a": True})],
    ids=["lora", "ffa-lora", "moslora", "moslora-frozen-a"],
)
def test_peft_loads_classification_adapter_with_head(kind, extra, batch, tmp_path):
    """MoSLoRA exports as LoRA with its mixer folded into B (B·M): PEFT has no mixer, yet outputs match."""
    model = load_model("tiny-bert", "classification", num_labels=2, seed=5)
    adapter = build(
        model,
        make_spec(kind=kind, rank=4, alpha=8.0, targets=("query", "value"), **extra),
        seed=1,
        head=("classifier.weight", "classifier.bias"),
    )
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert")
    assert json.loads((tmp_path / "fedlora.json").read_text())["kind"] == kind
    ids = batch["input_ids"]
    args = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    model.eval()
    base = load_model("tiny-bert", "classification", num_labels=2, seed=5).eval()
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**args).logits, model(**args).logits, rtol=1e-5, atol=1e-5)


def test_peft_loads_causal_lm_adapter(batch, tmp_path):
    model = tiny_llama(seed=2)
    adapter = build(model, AdapterSpec(kind="lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj")), seed=1)
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="causal-lm", base_model="tiny")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=2), str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=batch["input_ids"]).logits,
            model(input_ids=batch["input_ids"]).logits,
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("row", list(MATRIX))
def test_load_adapter_rebuilds_every_family_from_safetensors_and_fedlora_json(row, batch, tmp_path):
    """The native export (no PEFT involved) reproduces the trained model's outputs on a fresh base model."""
    model = load_model("tiny-bert", "classification", num_labels=2, seed=5)
    adapter = build(model, spec(row, ("query", "value")), seed=1, head=("classifier.weight", "classifier.bias"))
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path, task="classification", base_model="tiny-bert")
    assert (tmp_path / "adapter_config.json").exists() == adapter.peft_compatible
    fresh = load_model("tiny-bert", "classification", num_labels=2, seed=5)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.spec == adapter.spec
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**args).logits, model.eval()(**args).logits, rtol=1e-6, atol=1e-6)


def test_load_adapter_refuses_a_file_that_lacks_tensors(tmp_path):
    model = load_model("tiny-bert", "classification", num_labels=2, seed=5)
    export_adapter(build(model, spec("mor", ("query",)), seed=1), tmp_path, task="classification", base_model="t")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".scale_B." not in k}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="lacks adapter tensors .*scale_B"):
        load_adapter(load_model("tiny-bert", "classification", num_labels=2, seed=5), tmp_path)


def test_exported_adapter_names_a_base_model_that_loads_outside_fedlora(batch, tmp_path):
    """AutoPeftModel opens the base by ``base_model_name_or_path`` alone, as any user outside fedlora would."""
    from fed.models import load_tokenizer, loadable_name

    saved = tmp_path / "base"
    load_model("tiny-bert", "classification", num_labels=2, seed=5).save_pretrained(saved)
    load_tokenizer("tiny-bert", "classification").save_pretrained(saved)
    model = load_model(str(saved), "classification", num_labels=2, seed=5)
    adapter = build(
        model,
        AdapterSpec(kind="lora", rank=4, alpha=8.0, targets=("query", "value")),
        seed=1,
        head=("classifier.weight", "classifier.bias"),
    )
    randomise(adapter, 0.2)
    export_adapter(adapter, tmp_path / "adapter", task="classification", base_model=str(saved))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved.resolve())
    assert json.loads((tmp_path / "adapter" / "fedlora.json").read_text())["base_model"] == str(saved)
    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter")).eval()
    args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**args).logits, model.eval()(**args).logits, rtol=1e-5, atol=1e-5)
    assert loadable_name("default", "classification") == "sentence-transformers/all-MiniLM-L6-v2"
    assert loadable_name("SmolLM2-135M-Instruct", "causal-lm") == "HuggingFaceTB/SmolLM2-135M-Instruct"
