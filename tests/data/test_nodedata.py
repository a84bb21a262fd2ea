"""A server sizes the head from the config alone; each node reads its own file onto the run's label order."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import fed.data.datasets
import fed.session
from fed.config import ConfigError
from fed.config.sources import resolve
from fed.data.node import NodeDataError, node_data, run_labels
from fed.session import adapted_model, server_preflight

LABELS = ("pos", "neg", "meh")  # deliberately not sorted: a node must not re-encode by its own order
ROWS = [{"body": f"row number {i}", "tag": LABELS[i % 3]} for i in range(12)]


def _cfg(*extra: str):
    return resolve(
        "quickstart",
        [
            "model.name=tiny-bert",
            "data.text_column=body",
            "data.label_column=tag",
            f"data.labels={','.join(LABELS)}",
            "data.test_fraction=0.25",
            *extra,
        ],
    )


def _write(path, rows, fmt: str) -> str:
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return str(path)


def test_server_builds_the_head_without_any_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the server read client data")

    monkeypatch.setattr(fed.session, "load_task_dataset", no_data)
    monkeypatch.setattr(fed.data.datasets, "load_task_dataset", no_data)
    cfg = _cfg("data.name=/nowhere/on/the/server.csv")
    server_preflight(cfg)
    adapter, _ = adapted_model(cfg)
    assert adapter.model.classifier.out_features == len(LABELS)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["data.name=sentiment"], ("negative", "positive")),
        (["data.name=x.csv", "data.num_labels=4"], ("0", "1", "2", "3")),
        (["task=causal-lm", "data.name=x.csv"], None),
    ],
)
def test_run_labels_come_from_the_config(extra, expected):
    cfg = resolve("quickstart", extra)
    assert run_labels(cfg) == expected


def test_a_data_file_without_labels_in_the_config_is_refused():
    with pytest.raises(ConfigError, match=r"data\.labels"):
        server_preflight(resolve("quickstart", ["model.name=tiny-bert", "data.name=/nowhere/mine.csv"]))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["data.labels=a,a"], "repeats"),
        (["data.labels=a,b", "data.num_labels=3"], "num_labels=3"),
        (["data.num_labels=1"], "at least 2"),
        (["federation.num_clients=2", "federation.min_replies=3"], "min_replies=3 exceeds"),
        (["federation.num_clients=2", "federation.min_available=5"], "min_available=5 exceeds"),
    ],
)
def test_bad_label_settings_are_named(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve("quickstart", overrides)


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_node_file_maps_labels_onto_the_run_order(tmp_path, fmt):
    path = _write(tmp_path / f"mine.{fmt}", ROWS, fmt)
    data = node_data(_cfg(), path)
    assert len(data.train) == 9 and len(data.test) == 3
    expected = {r["body"]: LABELS.index(r["tag"]) for r in ROWS}
    for split in (data.train, data.test):
        assert {t: y for t, y in zip(split["text"], split["label"])} == {t: expected[t] for t in split["text"]}


def test_integer_labels_are_indices(tmp_path):
    path = _write(tmp_path / "ints.csv", [{"body": f"t{i}", "tag": 2} for i in range(4)], "csv")
    data = node_data(_cfg(), path)
    assert set(data.train["label"]) | set(data.test["label"]) == {2}


@pytest.mark.parametrize(
    "content, suffix, pattern",
    [
        (None, ".csv", "is not a file"),
        ("body,tag\nhello,pos\n", ".txt", "unsupported file type '.txt'"),
        ("", ".csv", "could not be read"),
        ("body,tag\n", ".csv", "could not be read"),
        ("body,tag\nhello,pos\n", ".csv", "1 usable row"),
        ('{"body": "a", "tag": ', ".json", "could not be read"),
        ("body,tag\nhello,pos\nbye,angry\nyo,sad\n", ".csv", r"\['angry', 'sad'\] are outside.*'pos', 'neg', 'meh'"),
        ("text,tag\nhello,pos\nbye,neg\n", ".csv", r"column\(s\) \['body'\] not found"),
    ],
)
def test_bad_node_files_say_what_is_wrong(tmp_path, content, suffix, pattern):
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(NodeDataError, match=pattern) as err:
        node_data(_cfg(), str(path))
    assert "data-path=" in str(err.value)  # for the node's log; the server reads NODE_CANNOT_ANSWER only


def test_a_bad_node_replies_with_the_public_reason_only(tmp_path, flower_identity):
    """What Flower sends back is the exception's text: it must name the kind of problem, not the data."""
    from flwr.app import Context, Message, RecordDict

    from clients.app import NODE_CANNOT_ANSWER, train
    from fed.wire import config_record

    path = _write(tmp_path / "mine.csv", [{"body": "secret words", "tag": "angry"}] * 3, "csv")
    cfg = _cfg("federation.num_clients=1")
    msg = Message(
        RecordDict({"config": config_record(cfg, **{"server-round": 1})}), dst_node_id=1, message_type="train"
    )
    context = Context(
        run_id=1, node_id=1, node_config={"data-path": path, "partition-id": 0}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ValueError) as err:
        train(msg, context)
    assert str(err.value) == NODE_CANNOT_ANSWER  # one generic refusal: which problem it was stays in the log
    assert "angry" not in str(err.value) and "secret" not in str(err.value) and path not in str(err.value)
