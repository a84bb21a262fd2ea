"""One typed, validated run configuration: TOML preset -> ``--set key=value`` -> Flower run-config.

Every knob of a run lives here, in nested frozen dataclasses, and each field carries all there is to
know about its key: its type (a ``Literal`` names the accepted values of a choice), its default, its
docstring, and, in its section's ``problems()``, the checks of its range. Where a config comes from
(presets and overrides) is ``fed.config.sources``; the reference page, ``fed config --list`` and
pyproject's run-config declarations are generated from these classes by ``fed.config.reference``.

A run is described by a *flat* mapping of dotted keys (``adapter.rank = 8``) because that is what
Flower's run-config and the command line carry; :meth:`RunConfig.from_flat` is the single door through
which such a mapping becomes a typed object, and it reports every bad key or value at once, naming
what is accepted, before any work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Literal, cast, get_args, get_origin, get_type_hints

import tomli_w

from fed import ranks
from fed.adapters import family_options, registry
from fed.tasks import template_problems

TaskName = Literal["classification", "causal-lm"]
Pooling = Literal["cls", "mean"]
Partition = Literal["iid", "dirichlet", "pathological", "natural"]
Accountant = Literal["rdp", "prv"]
DpLevel = Literal["example", "client", "both"]
ClientClipping = Literal["fixed", "adaptive"]
OptimizerName = Literal["adamw", "sgd"]
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
Quantize = Literal["none", "8bit", "4bit"]
GradSampleMode = Literal["hooks", "ghost"]
NoiseSource = Literal["stream", "os"]
RobustRule = Literal["mean", "median", "trimmed-mean"]
Weighting = Literal["capped", "examples", "uniform"]
ClipMode = Literal["adaptive", "auto", "fixed", "off"]
Aggregation = Literal["mean", "product"]
WireDtype = Literal["float32", "bfloat16"]
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What ``train.device`` accepts (``N`` a GPU index); ``fed.device`` turns it into a torch device."""


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message lists every problem found."""


def _at_least(name: str, value: float, low: float) -> list[str]:
    """The problem of a value below its floor, as a sentence naming key and floor (none: [])."""
    return [] if value >= low else [f"{name}={value!r} must be >= {low}"]


def device_problems(name: str, value: str) -> list[str]:
    """The problem of a device setting outside ``DEVICES`` (syntax only: whether that device exists is known
    only on the machine that trains, ``fed.device.resolve_device``)."""
    head, colon, index = value.partition(":")
    if (value in DEVICES and value != "cuda:N") or (head == "cuda" and colon and index.isdigit()):
        return []
    return [f"{name}={value!r} is not a device; accepted: {', '.join(DEVICES)} (N a GPU index, e.g. cuda:1)"]


def _in_range(name: str, value: float, low: float, high: float, *, closed: bool = False) -> list[str]:
    """``low < value <= high`` (``low <= value`` when ``closed``), else a message naming both bounds."""
    if (low <= value if closed else low < value) and value <= high:
        return []
    return [f"{name}={value!r} must be in {'[' if closed else '('}{low}, {high}]"]


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model and the classification head read from it."""

    name: str = "default"
    """HF id, local path, or an embedded alias (``all-MiniLM-L6-v2``, ``SmolLM2-135M-Instruct``, ``tiny-bert``,
    ``tiny-llama``); ``default`` is the shipped model for the task. Nothing is downloaded: a hub id must already be
    in the local HF cache."""
    max_length: int = 64
    """Token budget per example; batches are padded to their longest text, not to this. Raise it for long texts
    (cost grows with it), lower it to speed up runs on short ones."""
    pooling: Pooling = "cls"
    """Classification head: ``cls`` is the model's own (BERT: pooler over [CLS]; exportable as a PEFT adapter);
    ``mean`` a zero-initialised linear head over the mean of the real tokens, how sentence-embedding models such
    as MiniLM are read."""
    layers: int = 0
    """Transformer blocks of the trunk kept, counted from the input (0 = all): the head then reads the top kept
    block. A sentence-embedding model's last blocks are tuned for similarity, and its middle blocks can hold more
    of a task's signal; the dropped blocks also cost nothing to run (the model is then not PEFT-exportable)."""
    center: str = ""
    """A public built-in dataset (``sms-spam``, ``trec``, ...) whose texts' mean pooled feature the mean-pooled head
    subtracts before its linear layer (``fed.data.centring``), "" for none. It removes the direction every feature
    shares,
    which a linear head otherwise learns as a fast second bias; it reads no client data, so it costs no privacy."""
    scale: bool = False
    """With ``center``: also divide each centred dimension by its standard deviation over the same public texts, so
    the head's few clipped steps learn its narrow directions as fast as its wide ones (``fed.data.centring``)."""
    quantize: Quantize = "none"
    """``8bit`` or ``4bit``: the frozen base's linear layers stored quantised by bitsandbytes (the ``gpu`` extra),
    on a client's CUDA GPU only (a client elsewhere stops with a message; the server's copy, which only aggregates,
    stays as it is); the adapter and the DP arithmetic stay float32. ``none``: stored as ``train.precision`` says."""
    template: str = "auto"
    """How a causal LM's instruction rows become its input: ``chat`` (the tokenizer's chat template, the prompt as
    one user turn), a format string with one ``{prompt}`` field (e.g. ``"Q: {prompt}\nA: "``), or ``auto``
    (``chat`` when the tokenizer has a chat template, else ``"### Instruction:\n{prompt}\n### Response:\n"``)."""

    def problems(self) -> list[str]:
        """This section's values out of range or inconsistent with each other (its choices: ``RunConfig``)."""
        return (
            _at_least("model.max_length", self.max_length, 4)
            + _at_least("model.layers", self.layers, 0)
            + template_problems(self.template)
            + (
                []
                if not self.center or self.pooling == "mean"
                else [
                    f"model.center={self.center!r} centres the mean-pooled head's features; it needs "
                    f"model.pooling='mean' (got {self.pooling!r})"
                ]
            )
            + (
                []
                if not self.scale or self.center
                else [
                    "model.scale=true divides by the public texts' standard deviation; it needs model.center to name "
                    "them (e.g. 'sms-spam')"
                ]
            )
        )


@dataclass(frozen=True)
class AdapterConfig:
    """The trained adapter injected into the frozen model: its family and size."""

    kind: Annotated[str, registry.kinds, registry.shipped_kinds] = "lora"
    """Adapter family (docs/architecture.md): ``lora``, ``ffa-lora`` (A frozen and never sent: exact aggregation,
    half the bytes, a natural fit for DP), and the other registered families. The accepted names come from the
    adapter registry, so a newly registered family is accepted without touching the config."""
    rank: int = 8
    """Rank of each adapted layer's low-rank update: more capacity and more bytes per round as it grows."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is scaled by ``alpha / rank``, so raising it acts like a larger step."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 = off); a regulariser for small client datasets."""
    targets: tuple[str, ...] = ()
    """The ``nn.Linear`` modules to adapt, each a leaf name (e.g. ``query,value``: every Linear so named) or a
    regular expression matched against the whole module path (any target that is not an identifier, e.g.
    ``.*\\.intermediate\\.dense`` for BERT's MLP input, whose leaf ``dense`` the attention output shares;
    no commas on the command line); empty means the model family's default. More targets: more capacity,
    more bytes per round."""
    # The families' own options (each family's ``Options`` dataclass declares and checks them; a test keeps
    # these keys equal to theirs): the run config and Flower's run-config carry them flat.
    freeze_a: bool = False
    """moslora: A stays at its seeded init and never travels; aggregation is then exact."""
    experts: int = 4
    """mole: LoRA experts per layer (top-1 routed); mor: rank experts per layer (soft routed)."""
    balance: float = 0.01
    """mole: weight of the load-balancing loss (batch-level; per example under DP; 0 = off)."""
    keep_ratio: float = 0.1
    """roselora: share of each row of A / column of B kept once the cubic sparsity schedule ends."""

    def problems(self) -> list[str]:
        """This section's values out of range, the chosen family's options by the family's own checks (its kind
        is checked against the registry by ``RunConfig``)."""
        return (
            _at_least("adapter.rank", self.rank, 1)
            + _at_least("adapter.alpha", self.alpha, 1e-12)
            + _at_least("adapter.dropout", self.dropout, 0.0)
            + self._option_problems()
        )

    def _option_problems(self) -> list[str]:
        if self.kind not in registry.kinds():
            return []
        try:
            registry.family(self.kind).Options(**family_options(self.kind, dataclasses.asdict(self)))
        except ValueError as err:
            return [str(err)]
        return []


@dataclass(frozen=True)
class FederationConfig:
    """Who takes part in a round, how many rounds run, and how the server applies their mean update."""

    num_clients: int = 4
    """Clients (partitions of the data in a simulation, nodes in a deployment) the run is planned for."""
    rounds: int = 3
    """Federated rounds: each samples clients, trains locally, aggregates. Under DP the budget is spread over
    all of them, so more rounds mean more noise per round at the same epsilon."""
    fraction_train: float = 1.0
    """Share of clients sampled to train each round; below 1 it lowers each round's cost and, under DP, the
    chance a client takes part."""
    fraction_evaluate: float = 1.0
    """Share of clients sampled to evaluate the global adapter each round (0 = none)."""
    eval_every: int = 1
    """Evaluate the global adapter every this many rounds, and always after the last (0 = after the last only):
    a round without evaluation sends no evaluate message at all."""
    server_lr: float = 1.0
    """Step size of the server update ``global += server_lr * weighted_mean(deltas)``. Below 1 it damps rounds
    whose clients pull in different directions (skewed data). Product-aggregated adapters (moslora, lora with
    ``strategy.aggregation=product``) step their dense update instead: ``P + server_lr·(mean_k P_k − P)``."""
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
    secure_aggregation: bool = False
    """Aggregate each round's updates with Flower's SecAgg+ (docs/secure-aggregation.md): the server learns only
    the sum of the clients' masked updates, never one client's. With ``dp.level = "client"`` each client clips its
    update and adds its share of the noise (distributed DP), so the server never holds an un-noised value."""
    secure_shares: int = 7
    """SecAgg+: each client's secrets are shared with this many of the round's clients (itself included; all of
    them when fewer are sampled). Fewer shares cost less server time; each must stay reachable to unmask."""
    secure_threshold: float = 0.6
    """SecAgg+: the share of a client's shares needed to rebuild its secrets (at least 2). Below 1, a round
    survives clients that drop out mid-round."""
    secure_min_survivors: int = 0
    """Fewest clients whose masked updates a secure round may unmask (0 = three quarters of the expected sample,
    at least 2). Under distributed DP each client adds 1/this of the noise, so the sum carries all of it as long
    as this many survive; a round with fewer is not unmasked at all."""
    secure_range: float = 0.0
    """Without DP: the largest absolute value of one (weighted) update coordinate SecAgg+ can carry (0 = four
    times ``train.lr`` x ``train.local_steps``, rounded up to a power of two). A client whose update exceeds it
    refuses the round instead of being clipped silently. Under DP the range follows from the clip and the noise."""
    secure_max_weight: int = 10000
    """Without DP: the largest example count one client's weight may carry in SecAgg+ (a client with more
    refuses the round). Under DP every client weighs 1."""

    def problems(self) -> list[str]:
        """This section's values out of range, or waits that could never end."""
        found = (
            _at_least("federation.num_clients", self.num_clients, 1)
            + _at_least("federation.rounds", self.rounds, 1)
            + _in_range("federation.fraction_train", self.fraction_train, 0.0, 1.0)
            + _in_range("federation.fraction_evaluate", self.fraction_evaluate, 0.0, 1.0, closed=True)
            + _at_least("federation.eval_every", self.eval_every, 0)
            + _at_least("federation.server_lr", self.server_lr, 1e-12)
            + _at_least("federation.min_replies", self.min_replies, 1)
            + _at_least("federation.min_available", self.min_available, 0)
            + _at_least("federation.round_timeout", self.round_timeout, 1e-3)
            + _at_least("federation.secure_shares", self.secure_shares, 3)
            + _in_range("federation.secure_threshold", self.secure_threshold, 0.0, 1.0)
            + _at_least("federation.secure_min_survivors", self.secure_min_survivors, 0)
            + _at_least("federation.secure_range", self.secure_range, 0.0)
            + _at_least("federation.secure_max_weight", self.secure_max_weight, 1)
        )
        for name in ("min_replies", "min_available"):
            if getattr(self, name) > self.num_clients:
                found.append(
                    f"federation.{name}={getattr(self, name)} exceeds federation.num_clients="
                    f"{self.num_clients}: the run would wait forever"
                )
        return found


@dataclass(frozen=True)
class StrategyConfig:
    """How far one reply can move the global adapter (bounded influence) and how replies are combined."""

    rule: RobustRule = "mean"
    """``mean`` (weighted), or the robust ``median`` / ``trimmed-mean`` (coordinate-wise, unweighted): pick a
    robust rule when some clients may send hostile updates (docs/robustness.md)."""
    aggregation: Aggregation = "mean"
    """lora: ``mean`` averages A and B separately; ``product`` averages the clients' B·A per layer and
    re-factorises it to adapter.rank by truncated SVD (docs/architecture.md)."""
    trim_fraction: float = 0.2
    """Share of replies cut at each end of every coordinate by ``trimmed-mean``."""
    weighting: Weighting = "capped"
    """``capped``: example counts capped at ``max_weight_ratio`` x their median (counts are self-reported);
    ``examples``: as reported; ``uniform``: every reply alike."""
    max_weight_ratio: float = 3.0
    """Under ``capped`` weighting: no reply weighs more than this many times the round's median example count,
    so a client cannot buy influence by over-reporting its data."""
    clip: ClipMode = "adaptive"
    """Norm bound on each reply's delta: ``adaptive`` (``clip_multiplier`` x the round's median norm, never
    above ``auto``), ``auto`` (the largest step an honest AdamW client can take: lr x steps x sqrt(params)),
    ``fixed`` (``max_delta_norm``) or ``off``."""
    clip_multiplier: float = 2.0
    """Under ``adaptive`` clipping: the bound as a multiple of the round's median delta norm; lower it to cut
    outliers harder, at the cost of shrinking honest but large steps."""
    max_delta_norm: float = 0.0
    """Under ``fixed`` clipping: the L2 bound on each reply's delta (must then be > 0; ignored otherwise)."""

    def problems(self) -> list[str]:
        """This section's values out of range, or a fixed clip without its bound."""
        return (
            _in_range("strategy.trim_fraction", self.trim_fraction, 0.0, 0.49, closed=True)
            + _at_least("strategy.max_weight_ratio", self.max_weight_ratio, 1.0)
            + _at_least("strategy.clip_multiplier", self.clip_multiplier, 1.0)
            + _at_least("strategy.max_delta_norm", self.max_delta_norm, 0.0)
            + (
                []
                if self.clip != "fixed" or self.max_delta_norm > 0
                else ["strategy.clip='fixed' needs strategy.max_delta_norm > 0"]
            )
        )


@dataclass(frozen=True)
class DataConfig:
    """The dataset, how it is split over the clients, and the classes of a classification run."""

    name: str = "sentiment"
    """A built-in dataset (``sentiment``, ``sms-spam``, ``trec``, ``rotten-tomatoes``, ``chatterbot``,
    ``synthetic``) or a .csv/.json/.jsonl/.parquet path; a deployed node reads its own file instead."""
    partition: Partition = "iid"
    """How the data is split over the clients: ``iid``, ``dirichlet`` (label skew, ``alpha``), ``pathological``
    (``classes_per_client`` labels each) or ``natural`` (one client per value of ``partition_by``). Skewed splits
    show how a method behaves when clients disagree."""
    alpha: float = 0.5
    """Dirichlet concentration over labels (smaller = more skewed)."""
    classes_per_client: int = 2
    """Labels each client holds under the pathological partition."""
    partition_by: str = "domain"
    """Column whose values name the clients under the natural partition (one client per value)."""
    test_fraction: float = 0.2
    """Share of each client's examples held out to evaluate the global adapter."""
    max_examples: int = 0
    """Keep a seeded subset of this many examples (0 = all): for quick runs."""
    text_column: str = "text"
    """Column holding the input text in a local file."""
    label_column: str = "label"
    """Column holding the label (classification) in a local file."""
    labels: tuple[str, ...] = ()
    """Class names of a classification run, index i naming label i. They size the head without reading any
    data (a deployed server has none); empty = a built-in dataset's names, or ``num_labels``."""
    num_labels: int = 0
    """Class count when the labels are the integers 0..num_labels-1 (0 = from ``labels`` or the dataset)."""

    def problems(self) -> list[str]:
        """This section's values out of range, and class lists that cannot size a head."""
        found = (
            _at_least("data.alpha", self.alpha, 1e-12)
            + _at_least("data.classes_per_client", self.classes_per_client, 1)
            + _in_range("data.test_fraction", self.test_fraction, 0.0, 0.9)
            + _at_least("data.max_examples", self.max_examples, 0)
            + _at_least("data.num_labels", self.num_labels, 0)
        )
        if len(set(self.labels)) != len(self.labels):
            found.append(f"data.labels={list(self.labels)} repeats a name; give each class once")
        if self.labels and self.num_labels and self.num_labels != len(self.labels):
            found.append(
                f"data.num_labels={self.num_labels} but data.labels names {len(self.labels)} classes; give one"
            )
        if 0 < len(self.labels) < 2 or self.num_labels == 1:
            found.append("a classification run needs at least 2 classes in data.labels / data.num_labels")
        return found


@dataclass(frozen=True)
class TrainConfig:
    """Each client's local round: optimiser, steps, batches, and how it evaluates."""

    local_steps: int = 10
    """Optimiser steps each sampled client takes per round; more steps move the adapter further per round
    (and, under DP, spend more budget per round)."""
    batch_size: int = 32
    """Examples per optimiser step (under DP the expected size of each Poisson-sampled batch); larger batches
    average the DP noise over more examples."""
    lr: float = 5e-3
    """Local learning rate of the optimiser."""
    lr_schedule: LrSchedule = "constant"
    """``constant``, or ``cosine``: round r of R trains at ``lr * (1 + cos(pi * (r - 1) / R)) / 2``, so the last
    rounds take small steps and the final adapter carries less of the late rounds' DP noise. A function of the
    round number alone: it rescales the update after the noise, so the privacy accounting does not change."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW (L2 penalty for SGD) on the trained tensors (0 = off)."""
    optimizer: OptimizerName = "adamw"
    """``adamw`` or ``sgd`` (with ``momentum``); the optimiser state starts fresh every round."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    micro_batch: int = 8
    """Examples per forward pass: a larger batch is sorted by length and run in chunks of at most this many
    (one optimiser step per batch, the same gradient), so it pads less and holds less in memory (0 = whole).
    Raise it where memory and parallel compute are plentiful (a GPU)."""
    precision: Precision = "auto"
    """Dtype the frozen base model computes in: ``float32``, ``bfloat16``, ``float16`` (a static loss scale keeps
    its small gradients; hooks only under DP), or ``auto`` (on a GPU bfloat16 where supported, else float16; on a
    CPU bfloat16 only with native bfloat16 arithmetic). On a GPU, or when named, the base is also stored in it
    (half the weight memory). Trained tensors and all DP arithmetic stay float32 either way."""
    eval_batch_size: int = 64
    """Examples per forward pass when scoring held-out data (no gradients, so it can be larger than training's)."""
    max_eval_examples: int = 256
    """Cap on each client's held-out examples scored per round before the last (0 = all); the last round always
    scores every held-out row, so the run's final accuracy is exact and the curve stays cheap."""
    device: str = "auto"
    """Where a client trains: ``auto`` (the first CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. A named device that is not there stops the client with a message. The global adapter,
    what is sent and the exports stay on the CPU. In ``fed simulate`` a GPU needs ``simulation.gpus_per_client``;
    a deployed node may choose its own with node config ``device``."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them: much less
    activation memory for long sequences, about one more forward pass of compute. Works under DP-SGD (the
    per-sample gradients are the same)."""

    def problems(self) -> list[str]:
        """This section's values out of range."""
        return (
            _at_least("train.local_steps", self.local_steps, 1)
            + _at_least("train.batch_size", self.batch_size, 1)
            + _at_least("train.lr", self.lr, 1e-12)
            + _in_range("train.momentum", self.momentum, 0.0, 1.0)
            + _at_least("train.micro_batch", self.micro_batch, 0)
            + _at_least("train.eval_batch_size", self.eval_batch_size, 1)
            + _at_least("train.max_eval_examples", self.max_eval_examples, 0)
            + device_problems("train.device", self.device)
        )


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy at the example level (DP-SGD on every client), the client level (DP-FedAvg on the
    server), or both, and their accounting (docs/privacy.md)."""

    enabled: bool = False
    """Differential privacy at ``level``. Example level: DP-SGD on every client (per-example clipping, Gaussian
    noise, Poisson sampling, a privacy ledger; needs ``target_epsilon`` or ``noise_multiplier``)."""
    level: DpLevel = "example"
    """Whose presence the guarantee hides: ``example`` (DP-SGD on every client: one training example in or out),
    ``client`` (DP-FedAvg on the server: one whole client in or out, all it holds, every round it joins;
    clients train without DP-SGD) or ``both`` (each mechanism on, each accounted and reported apart)."""
    target_epsilon: float = 0.0
    """Calibrate the noise so the whole planned schedule spends at most this (0 = use noise_multiplier)."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) guarantee; keep it well below 1 / (a client's example count)."""
    max_grad_norm: float = 1.0
    """L2 bound each example's gradient is clipped to: the sensitivity the noise is scaled to."""
    noise_multiplier: float = 0.0
    """Fixed noise std as a multiple of max_grad_norm (0 = calibrate from target_epsilon); epsilon then follows."""
    accountant: Accountant = "rdp"
    """Opacus accountant that turns the schedule into epsilon: ``rdp`` (Rényi DP) or ``prv`` (privacy random
    variables, usually tighter); the report cross-checks with the other."""
    grad_sample_mode: GradSampleMode = "hooks"
    """How Opacus gets per-example gradients: ``hooks`` (per-sample gradients materialised; needed for per-layer
    clipping) or ``ghost`` (ghost clipping: norms without materialising them, less memory)."""
    head_clip_share: float = 0.0
    """0: flat clipping, one bound over every trained tensor. In (0, 1): per-layer clipping, the task head's
    tensors sharing this fraction of max_grad_norm² and the adapter's the rest (equal parts per tensor). The
    squares sum to max_grad_norm², so an example's sensitivity and the accounting do not change. Hooks only."""
    loss_noise_multiplier: float = 0.0
    """> 0: each DP step also releases its clipped loss sum with this noise, so a DP run has a training-loss
    curve; accounted jointly with the gradient (the gradient's own noise rises to keep the total)."""
    loss_clip: float = 4.0
    """Per-example losses are clipped to [0, loss_clip] before the loss release."""
    client_noise_multiplier: float = 1.0
    """Client level: std of the Gaussian noise the server adds to each round's sum of clipped client updates,
    in units of the clip bound (with adaptive clipping, of the update and the clip count released together:
    the accounted multiplier; the update's own noise rises to keep it). Accounted with ``accountant`` and
    ``delta`` at sample rate ``federation.fraction_train``, one step per round."""
    client_clip: float = 0.1
    """Client level: the L2 bound C on a client's round update, all its sent tensors together (the starting
    bound under adaptive clipping)."""
    client_clipping: ClientClipping = "fixed"
    """Client level: ``fixed`` keeps C at client_clip; ``adaptive`` (Andrew et al. 2021) moves it after every
    round, ``C <- C exp(-client_clip_lr (b - client_target_quantile))``, b the noised fraction of the sampled
    clients whose update was within C (a release accounted with the update)."""
    client_target_quantile: float = 0.5
    """Adaptive clipping: the fraction of client updates C should leave unclipped."""
    client_clip_lr: float = 0.2
    """Adaptive clipping: the geometric step of C per round."""
    client_count_noise_multiplier: float = 0.0
    """Adaptive clipping: std of the noise on the count of clients within C, in units of the centred count's
    sensitivity (1/2). Must exceed client_noise_multiplier (0 = 10 x client_noise_multiplier: the update's
    noise rises by half a percent)."""
    client_target_epsilon: float = 0.0
    """Client level: the run stops training before a round whose release would take the client-level epsilon
    past this (0 = no cap)."""

    noise_source: NoiseSource = "stream"
    """Where the Gaussian noise's random bits come from: ``stream``, a ChaCha20 keystream (``cryptography``) under
    a key drawn fresh from the OS for every draw, in bulk; or ``os``, the OS CSPRNG itself. Both are
    cryptographic and unrepeatable; ``stream`` draws its bytes faster (``bench/llm_steps.py`` measures both)."""

    @property
    def example_level(self) -> bool:
        """DP-SGD on every client (``level`` example or both)."""
        return self.enabled and self.level != "client"

    @property
    def client_level(self) -> bool:
        """DP-FedAvg on the server (``level`` client or both)."""
        return self.enabled and self.level != "example"

    @property
    def count_noise_multiplier(self) -> float:
        """The adaptive clip count's noise multiplier, its default filled in (0 with fixed clipping)."""
        if self.client_clipping == "fixed":
            return 0.0
        return self.client_count_noise_multiplier or 10 * self.client_noise_multiplier

    def problems(self) -> list[str]:
        """This section's values out of range, and settings that contradict each other."""
        found = _in_range("dp.delta", self.delta, 0.0, 0.1) + _at_least("dp.max_grad_norm", self.max_grad_norm, 1e-12)
        found += self._client_problems()
        found += _at_least("dp.target_epsilon", self.target_epsilon, 0.0)
        found += _at_least("dp.noise_multiplier", self.noise_multiplier, 0.0)
        found += _at_least("dp.loss_noise_multiplier", self.loss_noise_multiplier, 0.0)
        found += _at_least("dp.loss_clip", self.loss_clip, 1e-12)
        if not 0 <= self.head_clip_share < 1:
            found.append(
                f"dp.head_clip_share={self.head_clip_share!r} must be in [0, 1) (0: flat clipping; "
                "1 would leave the adapter no clipping budget)"
            )
        if self.head_clip_share > 0 and self.grad_sample_mode != "hooks":
            found.append(
                f"dp.head_clip_share={self.head_clip_share} (per-layer clipping) needs "
                f"dp.grad_sample_mode='hooks' (got {self.grad_sample_mode!r}: Opacus's ghost clipping is flat only)"
            )
        if self.enabled and 0 < self.loss_noise_multiplier <= self.noise_multiplier:
            found.append(
                f"dp.loss_noise_multiplier={self.loss_noise_multiplier} must exceed "
                f"dp.noise_multiplier={self.noise_multiplier} (the loss release shares its budget)"
            )
        if self.enabled and self.target_epsilon > 0 and self.noise_multiplier > 0:
            found.append(
                f"dp.target_epsilon={self.target_epsilon} and dp.noise_multiplier={self.noise_multiplier} are both "
                "set; "
                "give one (the other stays 0)"
            )
        if self.example_level and self.target_epsilon == 0 and self.noise_multiplier == 0:
            found.append(
                f"dp.enabled=true at dp.level={self.level!r} needs dp.target_epsilon > 0 or dp.noise_multiplier > 0"
            )
        return found

    def _client_problems(self) -> list[str]:
        """The client-level settings out of range, and a clip count that would take the whole budget."""
        found = _at_least("dp.client_noise_multiplier", self.client_noise_multiplier, 0.1)
        found += _at_least("dp.client_clip", self.client_clip, 1e-12)
        found += _in_range("dp.client_target_quantile", self.client_target_quantile, 0.0, 1.0)
        found += _at_least("dp.client_clip_lr", self.client_clip_lr, 0.0)
        found += _at_least("dp.client_count_noise_multiplier", self.client_count_noise_multiplier, 0.0)
        found += _at_least("dp.client_target_epsilon", self.client_target_epsilon, 0.0)
        if 0 < self.count_noise_multiplier <= self.client_noise_multiplier:
            found.append(
                f"dp.client_count_noise_multiplier={self.count_noise_multiplier:g} must exceed "
                f"dp.client_noise_multiplier={self.client_noise_multiplier:g} (the clip count shares its budget)"
            )
        return found


@dataclass(frozen=True)
class WireConfig:
    """How the adapter tensors travel between clients and server."""

    dtype: WireDtype = "float32"
    """Transport dtype of the deltas clients send: ``float32``, or ``bfloat16`` (half the bytes up; every
    value rounded to 8 significant bits, after any DP noise). The global adapter always travels in float32."""

    def problems(self) -> list[str]:
        """Nothing to check beyond the dtype's choice (``RunConfig``)."""
        return []


@dataclass(frozen=True)
class SimulationConfig:
    """How ``fed simulate`` lays its clients over this machine's cores (a deployment ignores it)."""

    actors: int = 0
    """Ray actors running clients side by side (0 = one per ``threads`` CPU cores). Each holds its own model."""
    threads: int = 1
    """Torch threads per actor (Ray reserves that many cores for it)."""
    gpus_per_client: float = 0.0
    """Share of a GPU Ray gives each actor (0 = none: the actors see no GPU and ``train.device = auto`` is the
    CPU). 0.25 runs four clients side by side on each GPU; each holds its own copy of the model there."""

    def problems(self) -> list[str]:
        """This section's values out of range."""
        return (
            _at_least("simulation.actors", self.actors, 0)
            + _at_least("simulation.threads", self.threads, 1)
            + _in_range("simulation.gpus_per_client", self.gpus_per_client, 0.0, 1.0, closed=True)
        )


@dataclass(frozen=True)
class RunConfig:
    """A whole run: two top-level keys and one section per concern."""

    task: TaskName = "classification"
    """What the model learns: ``classification`` (a head over the text) or ``causal-lm`` (next-token loss on
    instruction/response text)."""
    seed: int = 0
    """Run seed: partitions, adapter init, FFA-LoRA's shared A, sampling. Change it to measure the spread of
    a result over seeds."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model and the classification head read from it."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The trained adapter: its family and size."""
    federation: FederationConfig = field(default_factory=FederationConfig)
    """Clients, rounds, sampling and the server step."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """How the server bounds and combines the replies (docs/robustness.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset, its split over the clients, and the classes."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Each client's local round and evaluation."""
    dp: DPConfig = field(default_factory=DPConfig)
    """Differential privacy at the example level (DP-SGD on every client), the client level (DP-FedAvg on the
    server) or both (docs/privacy.md)."""
    wire: WireConfig = field(default_factory=WireConfig)
    """How tensors travel."""
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    """How ``fed simulate`` uses this machine (a deployment ignores it)."""

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from dotted keys (``{"adapter.rank": 8}``) on top of the defaults; validate all."""
        problems: list[str] = []
        by_section: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        known = keys()
        for name, raw in flat.items():
            if name not in known:
                problems.append(f"unknown key {name!r}; accepted keys: {', '.join(sorted(known))}")
                continue
            try:
                value = _coerce(raw, known[name].kind)
            except (TypeError, ValueError) as err:
                problems.append(f"{name}={raw!r}: {err}")
                continue
            section, _, leaf = name.rpartition(".")
            (by_section.setdefault(section, {}) if section else top)[leaf] = value
        if problems:
            raise ConfigError(_bullets(problems))
        kwargs: dict[str, Any] = dict(top)
        for section, values in by_section.items():
            kwargs[section] = sections()[section](**values)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys -> plain values (lists for tuples): what Flower's records and TOML carry."""
        flat: dict[str, Any] = {}
        for name in keys():
            value: Any = self
            for part in name.split("."):
                value = getattr(value, part)
            flat[name] = list(value) if isinstance(value, tuple) else value
        return flat

    def to_toml(self) -> str:
        """The resolved config as nested TOML, written next to every run."""
        nested: dict[str, Any] = {}
        for name, value in self.to_flat().items():
            section, _, leaf = name.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[leaf] = value
        return tomli_w.dumps(nested)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with some dotted keys replaced (validated like a fresh config)."""
        return RunConfig.from_flat({**self.to_flat(), **overrides})

    def problems(self) -> list[str]:
        """Every value that is not accepted, each named with what is: choices (from the field types), each
        section's own checks, then the checks that read several sections."""
        flat = self.to_flat()
        return (
            [problem for name, key in keys().items() for problem in key.choice_problems(flat[name])]
            + [problem for section in sections() for problem in getattr(self, section).problems()]
            + self._cross_section_problems()
        )

    def validate(self) -> None:
        """Check every value against what is accepted; raise one ConfigError listing all problems."""
        found = self.problems()
        if found:
            raise ConfigError(_bullets(found))

    def _cross_section_problems(self) -> list[str]:
        """Values accepted on their own that another section's value rules out."""
        model, adapter, federation = self.model, self.adapter, self.federation
        return (
            (
                []
                if model.pooling == "cls" or self.task == "classification"
                else [f"model.pooling={model.pooling!r} builds a classification head; task {self.task!r} needs 'cls'"]
            )
            + (
                []
                if model.center != self.data.name
                else [
                    f"model.center={model.center!r} is the clients' own dataset (data.name): its texts are private; "
                    "name public text the clients do not hold, e.g. 'sms-spam'"
                ]
            )
            + ranks.problems(federation.client_ranks, federation.num_clients, adapter.rank, adapter.kind)
            + self._family_problems()
            + self._checkpointing_problems()
            + self._client_level_problems()
            + self._secure_problems()
            + self._precision_problems()
        )

    def _precision_problems(self) -> list[str]:
        """float16's loss scale is undone on the per-sample gradients before clipping; ghost clipping clips
        inside the backward pass, on the scaled gradients, so it cannot run under it."""
        if self.train.precision == "float16" and self.dp.enabled and self.dp.grad_sample_mode == "ghost":
            return [
                "train.precision='float16' needs dp.grad_sample_mode='hooks' (ghost clipping would clip the "
                "loss-scaled gradients); use 'bfloat16' or hooks"
            ]
        return []

    def _client_level_problems(self) -> list[str]:
        """Client-level DP bounds a client's share of a *mean*: a robust statistic or product-space averaging
        is not a sum of clipped updates, so its sensitivity is not the clip bound."""
        if not self.dp.client_level:
            return []
        found = []
        if self.strategy.rule != "mean":
            found.append(
                f"dp.level={self.dp.level!r} (client level) needs strategy.rule='mean' (got {self.strategy.rule!r}: "
                "a median or trimmed mean is not a sum of clipped updates, so the noise is not scaled to one client)"
            )
        if self.strategy.aggregation != "mean":
            found.append(
                f"dp.level={self.dp.level!r} (client level) needs strategy.aggregation='mean' (got "
                f"{self.strategy.aggregation!r}: product-space averaging re-factorises, not a weighted mean)"
            )
        return found

    def _secure_problems(self) -> list[str]:
        """SecAgg+ returns one weighted mean of dense vectors: whatever must read a single client's update (a
        robust rule, product averaging, per-reply rank checks, DP-SGD events beside a sum, the adaptive clip's
        per-client count) cannot run behind it."""
        fed, dp = self.federation, self.dp
        if not fed.secure_aggregation:
            return []
        found = []
        if self.strategy.rule != "mean" or self.strategy.aggregation != "mean":
            found.append(
                f"federation.secure_aggregation needs strategy.rule='mean' and strategy.aggregation='mean' (got "
                f"{self.strategy.rule!r}, {self.strategy.aggregation!r}): SecAgg+ yields only the weighted mean"
            )
        if dp.enabled and dp.level != "client":
            found.append(
                f"federation.secure_aggregation supports dp.level='client' (distributed DP) or dp.enabled=false "
                f"(got dp.level={dp.level!r}): example-level DP events would travel beside the sum unaccounted"
            )
        if dp.client_level and dp.client_clipping != "fixed":
            found.append(
                "federation.secure_aggregation needs dp.client_clipping='fixed': the adaptive clip reads each "
                "client's own clipped-or-not bit, which the secure sum hides"
            )
        if fed.client_ranks:
            found.append(
                "federation.secure_aggregation cannot check each client's rank padding: leave client_ranks empty"
            )
        if fed.secure_min_survivors > fed.num_clients:
            found.append(
                f"federation.secure_min_survivors={fed.secure_min_survivors} exceeds federation.num_clients="
                f"{fed.num_clients}: no round could be unmasked"
            )
        return found

    def _checkpointing_problems(self) -> list[str]:
        """A router's balance loss under gradient checkpointing: the loss is read from the gates of the first
        forward pass, which checkpointing runs without autograd, so it would silently train nothing."""
        kind = self.adapter.kind
        if not self.train.gradient_checkpointing or kind not in registry.kinds():
            return []
        options = family_options(kind, dataclasses.asdict(self.adapter))
        if options.get("balance", 0) > 0:
            return [
                f"train.gradient_checkpointing=true cannot train adapter.kind={kind!r}'s balance loss "
                f"(adapter.balance={self.adapter.balance}): set adapter.balance=0 or turn checkpointing off"
            ]
        return []

    def _family_problems(self) -> list[str]:
        """What the chosen family refuses in this run (its own checks), and product aggregation where the family
        declares no ``(B, A)`` pairs to average."""
        kind = self.adapter.kind
        if kind not in registry.kinds():
            return []  # named by the choice check
        family = registry.family(kind)
        problems = family.config_problems(self.to_flat())
        if self.strategy.aggregation == "product" and not family.product_pairs:
            accepted = [k for k in registry.kinds() if registry.family(k).product_pairs]
            problems.append(
                f"strategy.aggregation='product' applies to adapter.kind in {accepted} only (got "
                f"{kind!r}: its factors have no single B·A pair to average, or are exact already)"
            )
        return problems


@dataclass(frozen=True)
class Key:
    """One dotted config key as the dataclasses declare it: its type, default and accepted values."""

    name: str
    hint: Any
    """The field's resolved annotation (``Literal[...]``, ``Annotated[str, accepted[, documented]]``,
    ``tuple[str, ...]``,
    ``int``...)."""
    default: Any

    @property
    def kind(self) -> type:
        """The runtime type a value is coerced to: a choice is a ``str``, a ``tuple[str, ...]`` a ``tuple``."""
        if get_origin(self.hint) is Literal:
            return type(get_args(self.hint)[0])
        if get_origin(self.hint) is Annotated:
            return get_args(self.hint)[0]
        return get_origin(self.hint) or self.hint

    @property
    def choices(self) -> tuple[str, ...]:
        """Accepted values of a choice key (a ``Literal``'s, or those an ``Annotated`` source returns); () if free."""
        if get_origin(self.hint) is Literal:
            return get_args(self.hint)
        if get_origin(self.hint) is Annotated:
            return tuple(get_args(self.hint)[1]())
        return ()

    @property
    def documented(self) -> tuple[str, ...]:
        """The choices the reference lists: an ``Annotated`` key's second source when it has one (the shipped
        families, where plug-ins may add kinds at run time), else its choices."""
        if get_origin(self.hint) is Annotated and len(get_args(self.hint)) > 2:
            return tuple(get_args(self.hint)[2]())
        return self.choices

    def choice_problems(self, value: Any) -> list[str]:
        """The problem of a value outside this key's choices, naming them all (none: [])."""
        choices = self.choices
        if not choices or value in choices:
            return []
        return [f"{self.name}={value!r} is not one of: {', '.join(choices)}"]


@functools.cache
def sections() -> Mapping[str, type]:
    """Section name -> its dataclass, read off ``RunConfig``'s fields (those built by a default factory)."""
    # every section is declared ``field(default_factory=TheSectionClass)``, so the factory is the class itself
    return MappingProxyType(
        {
            f.name: cast(type, f.default_factory)
            for f in dataclasses.fields(RunConfig)
            if f.default_factory is not dataclasses.MISSING
        }
    )


def _class_keys(cls: type, prefix: str) -> dict[str, Key]:
    """The keys of one dataclass's plain fields, named ``prefix + field``."""
    hints = get_type_hints(cls, include_extras=True)
    return {
        f"{prefix}{f.name}": Key(f"{prefix}{f.name}", hints[f.name], f.default)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
    }


@functools.cache
def keys() -> Mapping[str, Key]:
    """Every accepted dotted key in declaration order: the top-level ones, then each section's (read-only:
    it is computed once and shared)."""
    found = _class_keys(RunConfig, "")
    for section, cls in sections().items():
        found.update(_class_keys(cls, f"{section}."))
    return MappingProxyType(found)


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
    """Problems as one message, one per line, so a user fixes them all in one go."""
    return "invalid run configuration:\n  - " + "\n  - ".join(problems)
