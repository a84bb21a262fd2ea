"""End to end: a real Flower simulation (Ray) of 3 clients x 2 rounds on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fed.config.sources import resolve
from fed.session import client_data
from simulations.run import simulate

pytestmark = pytest.mark.slow

TINY = [
    "model.name=tiny-bert",
    "data.name=synthetic",
    "data.max_examples=0",
    "federation.num_clients=3",
    "federation.rounds=2",
    "train.local_steps=4",
    "train.batch_size=16",
    "train.max_eval_examples=64",
]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    # Client ranks 3, 6, 8 (``linear``): replies state their rank, pass the padding check, stay exact under DP.
    cfg = resolve(
        "quickstart",
        [
            *TINY,
            "adapter.kind=ffa-lora",
            "dp.enabled=true",
            "dp.target_epsilon=4",
            "federation.client_ranks=linear",
            "train.max_eval_examples=16",
        ],
    )
    return cfg, simulate(cfg, tmp_path_factory.mktemp("runs"), name="ffa-dp")


def test_run_directory_is_complete(dp_run):
    cfg, run = dp_run
    assert (run.path / "config.toml").is_file()
    lines = run.metrics()
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        for key in ("eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "wall_s"):
            assert line[key] is not None, key
        assert line["train_loss"] is None  # a raw training loss is private under DP: never sent
        assert line["clients"] == 3 and line["dropped"] == []
        assert line["bytes_up"] > 0 and line["bytes_down"] > 0
        assert 0 <= line["aggregation_error"] < 1e-5  # FFA-LoRA aggregates exactly, DP noise or not
    held_out = sum(len(client_data(cfg, c).test) for c in range(3))
    assert held_out > 3 * 16
    # a DP node scores its whole pinned held-out set every round: the server cannot pick a subset of its rows
    assert [line["eval_examples"] for line in lines] == [held_out, held_out]


def test_privacy_ledger_is_per_client_and_within_target(dp_run):
    _cfg, run = dp_run
    privacy = json.loads((run.path / "privacy.json").read_text())
    assert set(privacy["clients"]) == {"0", "1", "2"}
    for entry in privacy["clients"].values():
        assert 0 < entry["epsilon"] <= 4.0
        assert entry["steps"] == 2 * 4 and len(entry["events"]) == 2
        assert entry["noise_multiplier"] > 0 and 0 < entry["sample_rate"] < 1
        assert entry["client_reported_epsilon"] == pytest.approx(entry["epsilon"])
        assert entry["flags"] == [] and entry["secure_rng"] is True
    for cid in ("0", "1", "2"):  # each simulated client's own ledger, kept where a resumed run finds it
        own = json.loads((run.path / "clients" / f"ledger-{cid}.json").read_text())
        assert [e["round"] for e in own["events"]] == [1, 2]
        assert own["epsilon"] == pytest.approx(privacy["clients"][cid]["epsilon"])
        assert own["policy"]["dp_required"] is True


def test_exported_adapter_has_b_trained_and_a_frozen(dp_run):
    _, run = dp_run
    tensors = load_file(str(run.adapter / "adapter_model.safetensors"))
    b = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert b and all(torch.count_nonzero(t) > 0 for t in b)  # B left zero: training reached the server
    assert json.loads((run.adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_causal_lm_run_learns_and_exports(tmp_path):
    cfg = resolve(
        "instruct",
        [
            "model.name=tiny-llama",
            "data.name=synthetic",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=8",
            "train.lr=1e-2",
            "model.max_length=32",
        ],
    )
    run = simulate(cfg, tmp_path, name="lm")
    lines = run.metrics()
    assert [line["round"] for line in lines] == [1, 2]
    assert lines[-1]["eval_loss"] < lines[0]["eval_loss"]
    assert all(line["eval_accuracy"] is None for line in lines)  # no accuracy for a causal LM
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == ["q_proj", "v_proj"]
    assert (run.path / "curves.png").is_file()
    assert all(line["epsilon_max"] is None for line in lines)  # no DP: no epsilon, never a 0 that reads as private
    assert "no privacy guarantee" in (run.path / "report.html").read_text()


def test_data_dependent_mistake_stops_before_any_worker(tmp_path):
    from fed.config import ConfigError

    cfg = resolve("quickstart", [*TINY, "data.partition=pathological", "data.classes_per_client=3"])
    with pytest.raises(ConfigError, match="classes_per_client=3"):
        simulate(cfg, tmp_path, name="bad")
    assert not (tmp_path / "bad").exists()


def test_mole_run_sends_expert_counts_and_exports_a_loadable_adapter(tmp_path):
    """Without DP, MoLE clients send routed-token counts through Flower's MetricRecord; the server accepts
    them, logs an aggregation error, and the non-PEFT export reloads into a fresh base model."""
    from fed.models import load_model
    from fed.run.export import load_adapter

    cfg = resolve(
        "mixed-domains",
        [
            "model.name=tiny-bert",
            "data.max_examples=400",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=8",
            "train.max_eval_examples=32",
        ],
    )
    run = simulate(cfg, tmp_path, name="mole")
    lines = run.metrics()
    assert [line["clients"] for line in lines] == [4, 4] and all(line["dropped"] == [] for line in lines)
    assert all(0 < line["aggregation_error"] < 1 for line in lines)
    assert not (run.adapter / "adapter_config.json").exists()  # MoLE has no PEFT form
    model = load_model("tiny-bert", "classification", num_labels=2, seed=cfg.seed)
    adapter = load_adapter(model, run.adapter)
    assert adapter.spec.kind == "mole" and adapter.spec.options.experts == 4


def test_a_cut_mean_pooled_trunk_runs_and_exports_what_its_own_build_reloads(tmp_path):
    """``model.layers`` travels to every client and to the server's export: the run trains a 1-block trunk
    under a cosine schedule, and ``fedlora.json`` records the cut, so the adapter reloads into that build."""
    from fed.models import load_model
    from fed.run.export import load_adapter

    cfg = resolve("quickstart", [*TINY, "model.layers=1", "model.pooling=mean", "train.lr_schedule=cosine"])
    run = simulate(cfg, tmp_path, name="cut")
    assert [line["round"] for line in run.metrics()] == [1, 2]
    description = json.loads((run.adapter / "fedlora.json").read_text())
    assert description["layers"] == 1 and description["pooling"] == "mean"
    assert not (run.adapter / "adapter_config.json").exists()
    model = load_model("tiny-bert", "classification", num_labels=2, seed=cfg.seed, pooling="mean", layers=1)
    adapter = load_adapter(model, run.adapter)
    assert all(".layer.0." in name for name in adapter.names() if ".layer." in name)
    assert torch.count_nonzero(adapter.state(["classifier.weight"])["classifier.weight"]) > 0  # trained
