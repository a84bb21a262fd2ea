"""Turn a RunConfig into the live objects a party works with: the adapted model, its task, its data.

Server and clients build the adapter through the same function, so both derive identical frozen
factors from the run seed. Builds are cached per process: a simulation worker serves many rounds
(and several clients) with one base model instead of reloading it for every message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from fed.adapters import Adapter, AdapterSpec, build, family_options, make_spec
from fed.config import AdapterConfig, ConfigError, RunConfig
from fed.data.centring import centre_on
from fed.data.datasets import ClientData, client_split, label_names, load_task_dataset
from fed.data.node import align_labels, node_data, run_labels
from fed.device import resolve_device
from fed.models import checkpoint_blocks, default_targets, load_model, load_tokenizer, task_head_names
from fed.precision import quantize_base, storage_dtype, store_frozen
from fed.privacy.client_level import dense_mean_problems
from fed.privacy.ledger import SplitPin
from fed.tasks import Task, make_task


def dataset(cfg: RunConfig):  # -> datasets.Dataset
    """The whole labelled dataset of the run (partitioned later, per client); a file that is missing,
    unreadable or lacks a configured column is a ConfigError naming it."""
    d = cfg.data
    try:
        return load_task_dataset(
            d.name,
            cfg.task,
            text_column=d.text_column,
            label_column=d.label_column,
            max_examples=d.max_examples,
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err  # its message names the file or the dataset


def num_labels(cfg: RunConfig) -> int | None:
    """Classes of a classification run (sizes the head), from the config alone; None for causal LM."""
    names = run_labels(cfg)
    return None if names is None else len(names)


def with_local_labels(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.labels`` read from its data file when only the file can tell: for a local
    simulation, which holds all the data. A deployment sets them in the config instead."""
    try:
        run_labels(cfg)
        return cfg
    except ConfigError:
        return cfg.with_overrides({"data.labels": label_names(dataset(cfg))})


@dataclass(frozen=True)
class ModelKey:
    """Everything that determines the adapted model, and nothing else, so the cache hits across
    rounds and clients of one run."""

    name: str
    task: str
    num_labels: int | None
    adapter: AdapterConfig
    seed: int
    pooling: str = "cls"
    layers: int = 0
    center: str = ""
    scale: bool = False
    max_length: int = 64  # the token budget the public statistics are read with
    device: str = "cpu"  # a resolved torch device (fed.device): the server's model stays on the CPU
    checkpointing: bool = False
    dtype: str = "float32"  # the frozen base's storage dtype (fed.precision.storage_dtype)
    quantize: str = "none"  # model.quantize, applied off the CPU only (a CPU client is refused before)

    @classmethod
    def of(cls, cfg: RunConfig, device: str = "cpu") -> ModelKey:
        m = cfg.model
        return cls(
            m.name,
            cfg.task,
            num_labels(cfg),
            cfg.adapter,
            cfg.seed,
            m.pooling,
            m.layers,
            m.center,
            m.scale,
            m.max_length,
            device,
            cfg.train.gradient_checkpointing,
            str(storage_dtype(cfg.train.precision, torch.device(device).type)).removeprefix("torch."),
            "none" if torch.device(device).type == "cpu" else m.quantize,
        )


def adapter_spec(a: AdapterConfig, model: Any) -> AdapterSpec:
    """The config's adapter section as a spec; empty targets become the model family's defaults."""
    return make_spec(
        a.kind,
        a.rank,
        a.alpha,
        a.targets or tuple(default_targets(model)),
        a.dropout,
        **family_options(a.kind, dataclasses.asdict(a)),
    )


@lru_cache(maxsize=2)
def _build(key: ModelKey) -> tuple[Adapter, Any, dict[str, torch.Tensor]]:
    """The adapted model, its tokenizer and its sent tensors as built (the run's starting point)."""
    model = load_model(
        key.name, key.task, num_labels=key.num_labels, seed=key.seed, pooling=key.pooling, layers=key.layers
    )
    tokenizer = load_tokenizer(key.name, key.task)
    if key.center:
        centre_on(model, tokenizer, key.center, key.max_length, scale=key.scale)  # base trunk, before the adapter
    if key.checkpointing:
        checkpoint_blocks(model)
    model.to(key.device)  # the base, once, before injection; build puts the adapter beside it
    spec = adapter_spec(key.adapter, model)
    adapter = build(model, spec, key.seed, head=tuple(task_head_names(model)))
    own = set(adapter.names())  # the adapter's tensors, frozen ones too: never cast nor quantised
    store_frozen(model, getattr(torch, key.dtype), own)
    if key.quantize != "none":
        quantize_base(model, key.quantize, torch.device(key.device), own)
    return adapter, tokenizer, adapter.sent_state()


def adapted_model(cfg: RunConfig, device: str = "cpu") -> tuple[Adapter, Task]:
    """The base model with the adapter injected, its trained tensors at their initial values, and the task.

    The model is cached per process, and whoever used it last may have left trained values in it (a
    client's local round, the server loading a run's final adapter to export it). So each call resets
    those tensors to their values as built: a second run in the same process (a benchmark grid, a test
    session) must not start from the first run's result. Clients load the global adapter right after.
    ``device`` (a resolved one, ``fed.device``) is where the model lives: the CPU unless a client trains elsewhere.
    """
    adapter, tokenizer, initial = _build(ModelKey.of(cfg, device))
    adapter.load(initial)
    adapter.set_rank(None)
    return adapter, make_task(cfg.task, tokenizer, cfg.model.max_length, cfg.model.template)


@dataclass(frozen=True)
class ClientSession:
    adapter: Adapter
    task: Task
    data: ClientData


def client_session(
    cfg: RunConfig, partition_id: int, data_path: str | None = None, split: SplitPin | None = None, device: str = ""
) -> ClientSession:
    """What a client trains with: its own file at ``data_path`` when the node has one, else share
    ``partition_id`` of ``cfg.federation.num_clients`` of the configured dataset; read as the node's pinned
    ``split`` says (a simulation's share: the seed, held-out fraction and subset of its first contact); the model
    on ``device`` (a node's own setting) or else ``train.device``, resolved on this machine."""
    where = resolve_device(device, "node config device") if device else resolve_device(cfg.train.device)
    if cfg.model.quantize != "none" and where.type != "cuda":
        raise ConfigError(
            f"model.quantize={cfg.model.quantize!r} needs a CUDA GPU (bitsandbytes); this client trains on {where}: "
            "set model.quantize='none' or train on a GPU"
        )
    if data_path:
        data = node_data(cfg, data_path, split)
    elif split is not None:
        pinned = {
            "seed": split.seed,
            "data.test_fraction": split.test_fraction,
            "data.max_examples": split.max_examples,
        }
        data = client_data(cfg.with_overrides(pinned), partition_id)
    else:
        data = client_data(cfg, partition_id)
    adapter, task = adapted_model(cfg, str(where))
    return ClientSession(adapter, task, data)


@lru_cache(maxsize=16)
def client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    d = cfg.data
    names = run_labels(cfg)
    full = dataset(cfg) if names is None else align_labels(dataset(cfg), names, f"data.name={d.name!r}")
    return client_split(
        full,
        num_clients=cfg.federation.num_clients,
        client_id=partition_id,
        partition=d.partition,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
        test_fraction=d.test_fraction,
        seed=cfg.seed,
        partition_by=d.partition_by,
    )


def server_preflight(cfg: RunConfig) -> None:
    """What a server can check with what it has (config and model, never client data): the head size,
    the model and the adapter targets."""
    try:
        adapter, _ = adapted_model(cfg)
    except ConfigError:
        raise
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        raise ConfigError(f"this config cannot run: {err}") from err
    if cfg.dp.client_level and (problems := dense_mean_problems(adapter.structure().kinds)):
        raise ConfigError(f"dp.level={cfg.dp.level!r}: {problems[0]}")
    if cfg.federation.secure_aggregation and (
        problems := dense_mean_problems(adapter.structure().kinds, "federation.secure_aggregation")
    ):
        raise ConfigError(problems[0])


def preflight(cfg: RunConfig) -> list[str]:
    """The server's checks plus every client's split, in this process, before any simulated worker starts.

    Only a local simulation holds all the data, so only there can a data-dependent mistake (more classes
    per client than the dataset has, a Dirichlet draw that leaves a client empty) stop the run at once
    with its own message instead of failing inside every simulated client. Returns warnings (texts the
    model will truncate) for the caller to show.
    """
    server_preflight(cfg)
    try:
        splits = [client_data(cfg, partition_id) for partition_id in range(cfg.federation.num_clients)]
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        raise ConfigError(f"this config cannot run: {err}") from err
    _, task = adapted_model(cfg)
    rows = sum(len(s.train) for s in splits)
    long = sum(task.overlong(s.train[:]) for s in splits)
    if not long:
        return []
    return [
        f"{long} of {rows} training texts are longer than model.max_length={cfg.model.max_length} tokens and "
        "will be truncated; raise model.max_length to keep them whole"
    ]
