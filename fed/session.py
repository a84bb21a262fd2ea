"""Turn a RunConfig into the live objects a party works with: the adapted model, its task, its data.

Server and clients build the adapter through the same function, so both derive identical frozen
factors from the run seed. Builds are cached per process: a simulation worker serves many rounds
(and several clients) with one base model instead of reloading it for every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fed.adapters import Adapter, AdapterSpec, build
from fed.config import AdapterConfig, ConfigError, RunConfig
from fed.data import ClientData, client_split, label_names, load_task_dataset
from fed.models import default_targets, load_model, load_tokenizer, task_head_names
from fed.tasks import Task, make_task


def dataset(cfg: RunConfig):  # -> datasets.Dataset
    """The whole labelled dataset of the run (partitioned later, per client)."""
    d = cfg.data
    return load_task_dataset(d.name, cfg.task, text_column=d.text_column, label_column=d.label_column,
                             max_examples=d.max_examples, seed=cfg.seed)


def num_labels(cfg: RunConfig) -> int | None:
    """Classes of a classification run (sizes the head); None for causal LM."""
    return len(label_names(dataset(cfg))) if cfg.task == "classification" else None


@dataclass(frozen=True)
class ModelKey:
    """Everything that determines the adapted model, and nothing else, so the cache hits across
    rounds and clients of one run."""

    name: str
    task: str
    num_labels: int | None
    adapter: AdapterConfig
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig) -> ModelKey:
        return cls(cfg.model.name, cfg.task, num_labels(cfg), cfg.adapter, cfg.seed)


def adapter_spec(a: AdapterConfig, model: Any) -> AdapterSpec:
    """The config's adapter section as a spec; empty targets become the model family's defaults."""
    return AdapterSpec(kind=a.kind, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                       targets=a.targets or tuple(default_targets(model)), freeze_a=a.freeze_a,
                       experts=a.experts, balance=a.balance)


@lru_cache(maxsize=2)
def _build(key: ModelKey) -> tuple[Adapter, Any]:
    model = load_model(key.name, key.task, num_labels=key.num_labels, seed=key.seed)
    spec = adapter_spec(key.adapter, model)
    adapter = build(model, spec, key.seed, head=tuple(task_head_names(model)))
    return adapter, load_tokenizer(key.name, key.task)


def adapted_model(cfg: RunConfig) -> tuple[Adapter, Task]:
    """The base model with the adapter injected (cached per process) and the task that feeds it."""
    adapter, tokenizer = _build(ModelKey.of(cfg))
    return adapter, make_task(cfg.task, tokenizer, cfg.model.max_length)


@dataclass(frozen=True)
class ClientSession:
    adapter: Adapter
    task: Task
    data: ClientData


def client_session(cfg: RunConfig, partition_id: int) -> ClientSession:
    """What client ``partition_id`` of ``cfg.federation.num_clients`` trains with."""
    adapter, task = adapted_model(cfg)
    return ClientSession(adapter, task, client_data(cfg, partition_id))


@lru_cache(maxsize=16)
def client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    d = cfg.data
    return client_split(dataset(cfg), num_clients=cfg.federation.num_clients, client_id=partition_id,
                        partition=d.partition, alpha=d.alpha, classes_per_client=d.classes_per_client,
                        test_fraction=d.test_fraction, seed=cfg.seed, partition_by=d.partition_by)


def preflight(cfg: RunConfig) -> None:
    """Build the model and every client's split once, in this process, before any worker starts.

    In a local simulation all the data is here, so a data-dependent mistake (more classes per client
    than the dataset has, a Dirichlet draw that leaves a client empty, a target that matches no layer)
    stops the run at once with its own message instead of failing inside every simulated client.
    """
    try:
        adapted_model(cfg)
        for partition_id in range(cfg.federation.num_clients):
            client_data(cfg, partition_id)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        raise ConfigError(f"this config cannot run: {err}") from err
