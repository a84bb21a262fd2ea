"""One typed, validated run configuration: TOML preset -> ``--set key=value`` -> Flower run-config.

Every knob of a run lives here, in nested frozen dataclasses (where a config comes from, presets and
overrides, is ``fed.config.sources``; what each key accepts, ``fed.config.checks``). A run is described by a *flat* mapping
of dotted keys (``adapter.rank = 8``) because that is what Flower's run-config and the command line
carry; :meth:`RunConfig.from_flat` is the single door through which such a mapping becomes a typed
object, and it reports every bad key or value at once, naming what is accepted, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import tomli_w

from fed.config.checks import (  # noqa: F401  (the accepted values are re-exported: callers import them from here)
    ACCOUNTANTS, AGGREGATIONS, CLIPS, GRAD_SAMPLE_MODES, LR_SCHEDULES, OPTIMIZERS, PARTITIONS,
    POOLINGS, PRECISIONS, ROBUST_RULES, TASKS, WEIGHTINGS, WIRE_DTYPES, problems,
)


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    """HF id, local path, or an embedded alias; ``default`` is the shipped model for the task."""
    max_length: int = 64
    """Token budget per example; batches are padded to their longest text, not to this."""
    pooling: str = "cls"
    """Classification head: ``cls`` is the model's own (BERT: pooler over [CLS]); ``mean`` a zero-initialised
    linear head over the mean of the real tokens, how sentence-embedding models such as MiniLM are read."""
    layers: int = 0
    """Transformer blocks of the trunk kept, counted from the input (0 = all): the head then reads the top kept
    block. A sentence-embedding model's last blocks are tuned for similarity, and its middle blocks can hold more
    of a task's signal (MiniLM's block 4 of 6 for sentiment); the dropped blocks also cost nothing to run."""
    center: str = ""
    """A public built-in dataset (``sms-spam``, ``trec``, ...) whose texts' mean pooled feature the mean-pooled head
    subtracts before its linear layer (``fed.data.centring``), "" for none. It removes the direction every feature shares,
    which a linear head otherwise learns as a fast second bias; it reads no client data, so it costs no privacy."""
    scale: bool = False
    """With ``center``: also divide each centred dimension by its standard deviation over the same public texts, so
    the head's few clipped steps learn its narrow directions as fast as its wide ones (``fed.data.centring``)."""


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    """Leaf names of the ``nn.Linear`` modules to adapt; empty means the model family's default."""
    freeze_a: bool = False
    """moslora: A stays at its seeded init and never travels; aggregation is then exact."""
    experts: int = 4
    """mole: LoRA experts per layer (top-1 routed); mor: rank experts per layer (soft routed)."""
    balance: float = 0.01
    """mole: weight of the per-example load-balancing loss (0 = off)."""
    keep_ratio: float = 0.1
    """roselora: share of each row of A / column of B kept once the cubic sparsity schedule ends."""


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 4
    rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    eval_every: int = 1
    """Evaluate the global adapter every this many rounds, and always after the last (0 = after the last only):
    a round without evaluation sends no evaluate message at all."""
    server_lr: float = 1.0
    """Step size of the server update ``global += server_lr * weighted_mean(deltas)``."""
    min_replies: int = 1
    """Fewest valid training replies a round needs to update the global adapter (else it stays as it was)."""
    min_available: int = 0
    """Connected nodes a round waits for before sampling (0 = num_clients). Lower it so that rounds go on
    while a crashed node is away."""
    round_timeout: float = 3600.0
    """Seconds a round waits for replies; a straggler past it is dropped from that round."""
    client_ranks: tuple[str, ...] = ()
    """Heterogeneous ranks (lora, ffa-lora): one rank per client, or ``linear`` or ``node`` (fed/ranks.py);
    empty: every client trains ``adapter.rank``."""


@dataclass(frozen=True)
class StrategyConfig:
    """How far one reply can move the global adapter (bounded influence) and how replies are combined."""

    rule: str = "mean"
    """``mean`` (weighted), or the robust ``median`` / ``trimmed-mean`` (coordinate-wise, unweighted)."""
    aggregation: str = "mean"
    """lora: ``mean`` averages A and B separately; ``product`` averages the clients' B·A per layer and
    re-factorises it to adapter.rank by truncated SVD (docs/architecture.md)."""
    trim_fraction: float = 0.2
    """Share of replies cut at each end of every coordinate by ``trimmed-mean``."""
    weighting: str = "capped"
    """``capped``: example counts capped at ``max_weight_ratio`` x their median (counts are self-reported);
    ``examples``: as reported; ``uniform``: every reply alike."""
    max_weight_ratio: float = 3.0
    clip: str = "adaptive"
    """Norm bound on each reply's delta: ``adaptive`` (``clip_multiplier`` x the round's median norm, never
    above ``auto``), ``auto`` (the largest step an honest AdamW client can take: lr x steps x sqrt(params)),
    ``fixed`` (``max_delta_norm``) or ``off``."""
    clip_multiplier: float = 2.0
    max_delta_norm: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    name: str = "sentiment"
    partition: str = "iid"
    alpha: float = 0.5
    """Dirichlet concentration over labels (smaller = more skewed)."""
    classes_per_client: int = 2
    """Labels each client holds under the pathological partition."""
    partition_by: str = "domain"
    """Column whose values name the clients under the natural partition (one client per value)."""
    test_fraction: float = 0.2
    max_examples: int = 0
    """Keep a seeded subset of this many examples (0 = all): for quick runs."""
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    """Class names of a classification run, index i naming label i. They size the head without reading any
    data (a deployed server has none); empty = a built-in dataset's names, or ``num_labels``."""
    num_labels: int = 0
    """Class count when the labels are the integers 0..num_labels-1 (0 = from ``labels`` or the dataset)."""


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 5e-3
    lr_schedule: str = "constant"
    """``constant``, or ``cosine``: round r of R trains at ``lr * (1 + cos(pi * (r - 1) / R)) / 2``, so the last
    rounds take small steps and the final adapter carries less of the late rounds' DP noise. A function of the
    round number alone: it rescales the update after the noise, so the privacy accounting does not change."""
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (with ``momentum``); the optimiser state starts fresh every round."""
    momentum: float = 0.9
    micro_batch: int = 8
    """Examples per forward pass: a larger batch is sorted by length and run in chunks of at most this many
    (one optimiser step per batch, the same gradient), so it pads less and holds less in memory (0 = whole)."""
    precision: str = "auto"
    """Autocast dtype of the frozen base model: ``float32``, ``bfloat16``, or ``auto`` (bfloat16 only on a CPU
    with native bfloat16 arithmetic). Trained tensors and all DP arithmetic stay float32 either way."""
    eval_batch_size: int = 64
    max_eval_examples: int = 256
    """Cap on each client's held-out examples scored per round before the last (0 = all); the last round always
    scores every held-out row, so the run's final accuracy is exact and the curve stays cheap."""


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = False
    target_epsilon: float = 0.0
    """Calibrate the noise so the whole planned schedule spends at most this (0 = use noise_multiplier)."""
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    head_clip_share: float = 0.0
    """0: flat clipping, one bound over every trained tensor. In (0, 1): per-layer clipping, the task head's
    tensors sharing this fraction of max_grad_norm² and the adapter's the rest (equal parts per tensor). The
    squares sum to max_grad_norm², so an example's sensitivity and the accounting do not change. Hooks only."""
    loss_noise_multiplier: float = 0.0
    """> 0: each DP step also releases its clipped loss sum with this noise, so a DP run has a training-loss
    curve; accounted jointly with the gradient (the gradient's own noise rises to keep the total)."""
    loss_clip: float = 4.0
    """Per-example losses are clipped to [0, loss_clip] before the loss release."""


@dataclass(frozen=True)
class WireConfig:
    dtype: str = "float32"
    """Transport dtype of the deltas clients send: ``float32``, or ``bfloat16`` (half the bytes up; every
    value rounded to 8 significant bits, after any DP noise). The global adapter always travels in float32."""


@dataclass(frozen=True)
class SimulationConfig:
    """How ``fed simulate`` lays its clients over this machine's cores (a deployment ignores it)."""

    actors: int = 0
    """Ray actors running clients side by side (0 = one per ``threads`` CPU cores). Each holds its own model."""
    threads: int = 1
    """Torch threads per actor (Ray reserves that many cores for it)."""


@dataclass(frozen=True)
class RunConfig:
    task: str = "classification"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from dotted keys (``{"adapter.rank": 8}``) on top of the defaults; validate all."""
        problems: list[str] = []
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        fields = _field_types()
        for key, raw in flat.items():
            if key not in fields:
                problems.append(f"unknown key {key!r}; accepted keys: {', '.join(sorted(fields))}")
                continue
            try:
                value = _coerce(raw, fields[key])
            except (TypeError, ValueError) as err:
                problems.append(f"{key}={raw!r}: {err}")
                continue
            section, _, name = key.rpartition(".")
            (sections.setdefault(section, {}) if section else top)[name] = value
        if problems:
            raise ConfigError(_bullets(problems))
        kwargs: dict[str, Any] = dict(top)
        for section, values in sections.items():
            kwargs[section] = _SECTIONS[section](**values)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys -> plain values (lists for tuples): what Flower's records and TOML carry."""
        flat: dict[str, Any] = {}
        for key in _field_types():
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part)
            flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    def to_toml(self) -> str:
        """The resolved config as nested TOML, written next to every run."""
        nested: dict[str, Any] = {}
        for key, value in self.to_flat().items():
            section, _, name = key.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[name] = value
        return tomli_w.dumps(nested)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with some dotted keys replaced (validated like a fresh config)."""
        return RunConfig.from_flat({**self.to_flat(), **overrides})

    def validate(self) -> None:
        """Check every value against what is accepted; raise one ConfigError listing all problems."""
        found = problems(self)
        if found:
            raise ConfigError(_bullets(found))


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "federation": FederationConfig,
    "strategy": StrategyConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "dp": DPConfig,
    "wire": WireConfig,
    "simulation": SimulationConfig,
}


def _field_types() -> dict[str, type]:
    """Every accepted dotted key and the Python type of its default."""
    types: dict[str, type] = {"task": str, "seed": int}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            types[f"{section}.{f.name}"] = type(default)
    return types


def _coerce(raw: Any, kind: type) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or say why not."""
    if kind is tuple:
        if isinstance(raw, str):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if isinstance(raw, (list, tuple)) and all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in raw):
            return tuple(str(s) for s in raw)
        raise TypeError("expected a list of names (or integers) or a comma-separated string")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise TypeError("expected true or false")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise TypeError("expected an integer")
        return int(raw)
    if kind is float:
        if isinstance(raw, bool):
            raise TypeError("expected a number")
        return float(raw)
    if not isinstance(raw, str):
        raise TypeError("expected a string")
    return raw


def _bullets(problems: list[str]) -> str:
    return "invalid run configuration:\n  - " + "\n  - ".join(problems)
