"""A run's label set from its config alone, and a node's own data file aligned to it.

In deployment the server holds no data and every node brings its own file, so nothing may depend on
reading rows: the head is sized from ``data.labels`` / ``data.num_labels`` (or a built-in dataset's
known names), and each node maps its file's labels onto that one index order. Two nodes that each
encoded their own label strings would otherwise disagree on what class 0 means, silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, Features

from fed.config import ConfigError, RunConfig
from fed.data.datasets import BUILTIN_LABELS, FILE_FORMATS, ClientData, hold_out, label_names, load_task_dataset
from fed.privacy.ledger import SplitPin


class NodeDataError(ValueError):
    """A node's data file that cannot be used. ``str()`` is the full detail for the node's own log (it may
    quote the file: column names, label values, parser output); none of it leaves the node: whatever the
    problem, the server reads one generic refusal (``clients.app``), since even the kind of problem (a
    label outside the run's set) tells it something about the file."""


def run_labels(cfg: RunConfig) -> tuple[str, ...] | None:
    """Class names of a classification run, index i naming class i, without touching any data; None for
    causal LM. Raises ConfigError when only a data file could tell (set ``data.labels`` then)."""
    if cfg.task != "classification":
        return None
    d = cfg.data
    if d.labels:
        return d.labels
    if d.num_labels:
        return tuple(str(i) for i in range(d.num_labels))
    if d.name in BUILTIN_LABELS:
        return BUILTIN_LABELS[d.name]
    raise ConfigError(
        f"data.name={d.name!r} is not a built-in dataset, so the run's classes are unknown without "
        'reading client data; set data.labels (class names, e.g. data.labels="neg,pos") or '
        "data.num_labels (labels 0..K-1)"
    )


def align_labels(ds: Dataset, names: Sequence[str], source: str) -> Dataset:
    """``ds`` with its ClassLabel re-indexed to ``names``. A label that is one of ``names`` keeps its name;
    an integer label 0..K-1 that is not a name is read as an index; anything else is refused by name."""
    names = list(names)
    own = label_names(ds)
    if own == names:
        return ds
    mapping, outside = [], []
    for label in own:
        if label in names:
            mapping.append(names.index(label))
        elif label.isdigit() and int(label) < len(names):
            mapping.append(int(label))
        else:
            outside.append(label)
    if outside:
        raise NodeDataError(
            f"{source}: label(s) {outside} are outside the run's label set {names} (data.labels); "
            f"accepted: those names or their indices 0..{len(names) - 1}"
        )
    features = Features({**ds.features, "label": ClassLabel(names=names)})
    return ds.map(
        lambda batch: {"label": [mapping[y] for y in batch["label"]]},
        batched=True,
        features=features,
        keep_in_memory=True,
    )


def node_data(cfg: RunConfig, path: str, split: SplitPin | None = None) -> ClientData:
    """A node's own file (``--node-config data-path=...``), shaped for the run and split into its train and
    held-out rows: by the node's pinned ``split`` (its secret seed, the fraction and subset of its first
    contact) when it has one, else by the config. Raises NodeDataError naming the file and what is wrong
    with it; the client's reply then carries one generic refusal and the round goes on without this node."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NodeDataError(f"data-path={path!r} is not a file on this node")
    if file.suffix.lower() not in FILE_FORMATS:
        raise NodeDataError(
            f"data-path={path!r}: unsupported file type {file.suffix!r}; accepted: {', '.join(FILE_FORMATS)}"
        )
    d = cfg.data
    try:
        ds = load_task_dataset(
            str(file),
            cfg.task,
            text_column=d.text_column,
            label_column=d.label_column,
            max_examples=split.max_examples if split else d.max_examples,
            seed=split.seed if split else cfg.seed,
        )
    except Exception as err:  # pyarrow, pandas and datasets each raise their own types for a malformed file
        raise NodeDataError(
            f"data-path={path!r} could not be read as {FILE_FORMATS[file.suffix.lower()]}: {type(err).__name__}: {err}"
        ) from err
    if len(ds) < 2:
        raise NodeDataError(
            f"data-path={path!r} holds {len(ds)} usable row(s); a node needs at least 2 (one to train on, one held out)"
        )
    names = run_labels(cfg)
    if names is not None:
        ds = align_labels(ds, names, f"data-path={path!r}")
    if split is not None:
        return hold_out(ds, split.test_fraction, split.secret)
    return hold_out(ds, d.test_fraction, cfg.seed)  # train_test_split shuffles with the seed
