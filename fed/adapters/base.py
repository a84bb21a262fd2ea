"""The one adapter protocol every family implements, and the object a built adapter hands back.

A family wraps target ``nn.Linear`` modules and declares its tensors as *groups*, each with a role
(trained or frozen-but-shared), whether it travels, and the aggregation kind a strategy must use.
Everything downstream (training, the wire, strategies, export) reads these groups and never looks
for adapter tensors by substring.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn


class Aggregation(str, Enum):
    """How the server merges one tensor group; strategies hold one rule per kind."""

    MEAN = "mean"  # example-weighted mean of deltas
    USAGE = "usage"  # experts: weighted by the tokens each client routed to them
    MASKED = "masked"  # sparse: mean over the clients whose mask covers the entry
    PRODUCT = "product"  # exact mean of B·A in product space, re-factorised
    ALLOCATION = "allocation"  # server-owned (Dynamic LoRA's rank masks): clients' deltas ignored


@dataclass(frozen=True)
class AdapterSpec:
    """What to build: family, rank, scaling and which ``nn.Linear`` leaves to adapt."""

    kind: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    options: Any = None
    """The family's own options (an instance of its ``Options`` dataclass; ``fed.adapters.make_spec`` builds it)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter rank={self.rank} must be >= 1")
        if not self.targets:
            raise ValueError("adapter targets are empty; name at least one nn.Linear leaf (e.g. 'query')")
        for target in self.targets:
            target_pattern(target)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class NoOptions:
    """The options of a family that has none beyond the common rank, alpha, dropout and targets."""


@dataclass(frozen=True)
class MixtureOptions:
    """The options of a mixture family (MoLE, MoR): how many experts each adapted layer holds."""

    experts: int = 4
    """Experts per layer: LoRA experts routed top-1 (MoLE), or rank experts mixed by a soft router (MoR)."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"adapter.experts={self.experts} must be >= 1")


@dataclass(frozen=True)
class UsageParams:
    """``usage`` groups: which expert slot weights each param. A param is either one expert's tensor
    (``slots``: its slot, aligned with the group's params) or a table whose rows are experts (``rows``: per
    param, the slot of each row)."""

    slots: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class ProductParams:
    """``product`` groups: per layer the factors ``(outer, mixer[, inner])`` whose product is aggregated."""

    chains: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class MaskedParams:
    """``masked`` groups: the axis along which each line keeps its top-k entries (1: rows of A, 0: columns of B)."""

    axis: int


@dataclass(frozen=True)
class PairParams:
    """A ``mean`` group that may also be aggregated by product (``strategy.aggregation = "product"``): per layer
    the factors ``(B, A)`` whose product is averaged instead."""

    pairs: tuple[tuple[str, str], ...]


GroupParams = UsageParams | ProductParams | MaskedParams | PairParams
"""The one typed value a group carries for its aggregation kind's rule."""


@dataclass(frozen=True)
class TensorGroup:
    """Named model parameters that share a role and an aggregation kind."""

    name: str
    params: tuple[str, ...]
    trainable: bool
    sent: bool
    aggregation: Aggregation = Aggregation.MEAN
    rule: GroupParams | None = None
    """What the aggregation kind's rule needs to know of this group (None: nothing, e.g. ``mean``)."""
    rank_axis: int | None = None
    """The axis of every param along which the rank components lie (B: 1, A: 0), for client ranks."""


P = TypeVar("P", UsageParams, ProductParams, MaskedParams, PairParams)


@dataclass(frozen=True)
class Structure:
    """What a strategy needs to know of an adapter besides tensor shapes: pure data, read off the sent groups."""

    kinds: dict[str, Aggregation]
    rules: tuple[tuple[tuple[str, ...], GroupParams], ...] = ()
    """Each sent group's params and its rule parameters."""
    rank_axes: dict[str, int] = field(default_factory=dict)
    """Sent tensors with a rank axis: what a client of lower rank leaves at zero beyond its rank."""

    def of(self, kind: type[P]) -> list[tuple[tuple[str, ...], P]]:
        """``(params, rule parameters)`` of every group whose rule parameters are of type ``kind``."""
        return [(names, rule) for names, rule in self.rules if isinstance(rule, kind)]

    @property
    def lines(self) -> dict[str, int]:
        """Line-sparse tensors and the axis their lines run along: what the wire encodes sparsely."""
        return {name: rule.axis for names, rule in self.of(MaskedParams) for name in names}

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Every expert slot, in a stable order: the usage counts a client may report."""
        slots = {slot for _, rule in self.of(UsageParams) for slot in (*rule.slots, *(s for r in rule.rows for s in r))}
        return tuple(sorted(slots))


def restrict_rank(tensors: Mapping[str, torch.Tensor], axes: Mapping[str, int], rank: int) -> dict[str, torch.Tensor]:
    """``tensors`` with every rank component from ``rank`` on set to zero (tensors without a rank axis as they are).

    A client of rank r_k trains only the first r_k components; under DP the optimiser still adds noise to
    the others, and this is what keeps that noise (and any weight decay) out of the reply.
    """
    out = dict(tensors)
    for name, axis in axes.items():
        if name in out:
            kept = out[name].clone()
            kept.narrow(axis, rank, kept.shape[axis] - rank).zero_()
            out[name] = kept
    return out


Product = tuple[torch.Tensor, "str | None"]
"""One dense weight update a layer computes from its tensors, and the expert slot weighting it (None: examples)."""
Products = Callable[[Mapping[str, torch.Tensor]], dict[str, Product]]


@runtime_checkable
class AdapterLayer(Protocol):
    """A wrapped ``nn.Linear`` that can say what weight update given values of its tensors amount to."""

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        """``{suffix: (dense update, slot)}``; ``get(local_name)`` returns this layer's tensor by local name."""
        ...


@dataclass(frozen=True)
class Clock:
    """Where a client's local round sits on the run's shared clock, measured in rounds.

    Step s of a client's ``steps`` in round ``round_`` is at ``round_ - 1 + s/steps``: every client
    reaches ``round_`` at its last step whatever its step count (a DP planner may shorten a round), so
    a schedule over this clock gives every client and the server the same budget at a round's end.
    """

    round_: int
    rounds: int
    steps: int

    def at(self, step: int) -> float:
        return self.round_ - 1 + min(step, self.steps) / max(self.steps, 1)


@runtime_checkable
class StepHook(Protocol):
    """A layer that reads each step's gradient and edits its own tensors after the step (RoseLoRA's pruning).

    ``before_step`` runs as the optimizer's pre-step hook, so it sees the gradient the optimizer applies:
    under DP-SGD the clipped, noised one (an output of the mechanism), never a per-sample or pre-noise
    gradient, so whatever it derives is post-processing, like what ``after_step`` derives from parameters.
    """

    def begin_round(self, clock: Clock) -> None:
        """Forget the previous round's state (a cached model serves several clients) and set the clock."""
        ...

    def before_step(self) -> None:
        """Read the gradients the optimizer is about to apply (``p.grad``) and the parameters they belong to."""
        ...

    def after_step(self) -> None: ...

    def masks(self) -> dict[str, torch.Tensor]:
        """``{local name: bool mask of the kept entries}`` after the last step."""
        ...


@runtime_checkable
class TokenRouter(Protocol):
    """A hard router (MoLE): reports, for the batch it last routed, a balance loss, and its weight."""

    balance: float
    """Weight of the router's balance loss in the training loss (0: off)."""

    def balance_loss(self, mask: torch.Tensor, per_example: bool) -> torch.Tensor:
        """Load-balancing loss ``[batch]``; ``mask`` ``[batch, seq]`` marks real tokens. ``per_example``: each
        example's from its own tokens (DP-SGD's bound); else the batch's loss, repeated for every example."""
        ...


@runtime_checkable
class UsageReporter(Protocol):
    """A router that can say how much the batch it last routed used each of its expert slots."""

    def counts(self, mask: torch.Tensor) -> dict[str, float]:
        """Per expert slot, the real tokens routed to it (MoLE) or their summed router probability (MoR)."""
        ...


@runtime_checkable
class RankMasked(Protocol):
    """A LoRA layer that can run (and train) only its first ``rank`` components."""

    def set_rank(self, rank: int | None) -> None:
        """Use the first ``rank`` components (None: all of them)."""
        ...


class AdapterFamily:
    """A family: wraps the targets of ``model`` in place, declares its tensor groups, and owns what only it
    knows: its export form and its server-side steps, each a no-op here unless the family overrides it.

    Its wrapped layers implement ``AdapterLayer``; a routed family's routers implement ``UsageReporter``
    (and ``TokenRouter`` with a balance loss); a ``ranked`` family's layers implement ``RankMasked``.
    Subclass it and decorate with ``fed.adapters.registry.register_family``.
    """

    kind: ClassVar[str]
    peft_compatible: ClassVar[bool] = False
    """Whether ``as_lora`` gives the adapter in PEFT's LoRA layout (used by ``fed.run.export``)."""
    ranked: ClassVar[bool] = False
    """Whether clients may train fewer rank components than the global adapter (``federation.client_ranks``)."""
    product_pairs: ClassVar[bool] = False
    """Whether its groups declare ``(B, A)`` pairs that ``strategy.aggregation = "product"`` can average."""
    Options: ClassVar[type] = NoOptions
    """The family's options: a frozen dataclass whose fields are ``adapter.<name>`` keys of the run config and
    whose ``__post_init__`` refuses a bad value by name."""

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        raise NotImplementedError(f"family {self.kind!r} must implement inject")

    def as_lora(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's tensors in PEFT's LoRA layout (only for ``peft_compatible`` families)."""
        raise NotImplementedError(f"family {self.kind!r} has no PEFT LoRA form")

    def config_problems(self, settings: Mapping[str, Any]) -> list[str]:
        """What the family cannot run with in a run's flat settings (``adapter.rank`` → value): each a sentence."""
        return []

    def round_budgets(self, adapter: Adapter, round_: int, rounds: int) -> dict[str, int]:
        """Per line-sparse tensor, the entries each line keeps at the end of ``round_`` (none by default)."""
        return {}

    def after_aggregate(
        self, adapter: Adapter, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The server's step on the new global state after aggregation (none by default)."""
        return dict(after)


HEAD = "head"
"""Name of the tensor group that holds a task head (a classifier) beside the family's own groups."""


@dataclass
class Adapter:
    """A model with an adapter injected: the handle training, the wire and export work through."""

    spec: AdapterSpec
    model: nn.Module
    groups: tuple[TensorGroup, ...]
    family: AdapterFamily

    @property
    def peft_compatible(self) -> bool:
        return self.family.peft_compatible

    _roles: dict[type, list[tuple[str, Any]]] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Modules found per role protocol (``_having``): the module tree is fixed once built."""

    def _named(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def names(self, *, trainable: bool | None = None, sent: bool | None = None) -> list[str]:
        """Parameter names of the groups matching the filters, in a stable order."""
        return [
            p
            for g in self.groups
            if (trainable is None or g.trainable == trainable) and (sent is None or g.sent == sent)
            for p in g.params
        ]

    def head_names(self) -> list[str]:
        """The task head's parameters (the ``HEAD`` group ``build`` adds), trained and sent with the adapter."""
        return [p for g in self.groups if g.name == HEAD for p in g.params]

    def trainable_parameters(self) -> list[nn.Parameter]:
        named = self._named()
        return [named[n] for n in self.names(trainable=True)]

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the named tensors (safe to keep while training goes on, on any device):
        what is sent, aggregated and exported lives on the CPU wherever the model trains."""
        named = self._named()
        return {n: named[n].detach().to("cpu", copy=True) for n in names}

    def sent_state(self) -> dict[str, torch.Tensor]:
        return self.state(self.names(sent=True))

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite adapter tensors in place; names must belong to the adapter's groups."""
        named = self._named()
        known = set(self.names())
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise KeyError(f"not adapter tensors: {unknown[:5]}; known: {sorted(known)[:5]}...")
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)

    def aggregation_of(self) -> dict[str, Aggregation]:
        """Aggregation kind of every sent tensor: what the strategy needs to know."""
        return {p: g.aggregation for g in self.groups if g.sent for p in g.params}

    def structure(self) -> Structure:
        """Kinds, rule parameters and rank axes of the sent tensors, for the strategy and the wire."""
        sent = [g for g in self.groups if g.sent]
        return Structure(
            kinds=self.aggregation_of(),
            rules=tuple((g.params, g.rule) for g in sent if g.rule is not None),
            rank_axes={p: g.rank_axis for g in sent if g.rank_axis is not None for p in g.params},
        )

    def group(self, name: str) -> TensorGroup:
        """The group called ``name`` (a family reads its own groups back in its server-side steps)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no tensor group {name!r}; groups: {[g.name for g in self.groups]}")

    def round_budgets(self, round_: int, rounds: int) -> dict[str, int]:
        """Per line-sparse tensor, the entries each line keeps at the end of ``round_`` (the family's schedule)."""
        return self.family.round_budgets(self, round_, rounds)

    def after_aggregate(
        self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The family's server-side step on the new global state (a gauge fixed, ranks reallocated, or none)."""
        return self.family.after_aggregate(self, before, after)

    def _having(self, role: type) -> list[tuple[str, Any]]:
        """``(path, module)`` of the modules implementing ``role`` (a protocol), found once per adapter: the
        module tree is fixed once built, and a runtime-checkable ``isinstance`` costs tens of microseconds,
        which every step and chunk would otherwise pay for every module of the model."""
        if role not in self._roles:
            self._roles[role] = [(path, m) for path, m in self.model.named_modules() if isinstance(m, role)]
        return self._roles[role]

    def _hooks(self) -> list[tuple[str, StepHook]]:
        return self._having(StepHook)

    def begin_round(self, clock: Clock) -> None:
        """Start a local round at ``clock`` (a no-op for families without step hooks)."""
        for _, hook in self._hooks():
            hook.begin_round(clock)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Run the step hooks' ``before_step`` as ``optimizer``'s pre-step hook (nothing without step hooks).

        Register it on the inner optimizer: Opacus's DP optimizer privatises ``p.grad`` and then calls the
        inner one's ``step``, so the hook sees the privatised gradient (empty Poisson batches included).
        """
        if self._hooks():
            optimizer.register_step_pre_hook(lambda _optimizer, _args, _kwargs: self._before_step())

    def _before_step(self) -> None:
        for _, hook in self._hooks():
            hook.before_step()

    def after_step(self) -> None:
        """Run the step hooks after an optimizer step (DP or not; empty Poisson batches included)."""
        for _, hook in self._hooks():
            hook.after_step()

    def masks(self) -> dict[str, torch.Tensor]:
        """The kept entries of every line-sparse tensor by parameter name (empty for dense families), on the CPU."""
        return {f"{path}.{local}": mask.cpu() for path, hook in self._hooks() for local, mask in hook.masks().items()}

    def auxiliary_loss(self, mask: torch.Tensor, per_example: bool = True) -> torch.Tensor | None:
        """The routers' mean weighted balance loss for the last forward, ``[batch]`` (None: no weighted router).

        ``per_example`` (required under DP): each example's from its own tokens, so adding it to the
        per-example task loss keeps DP-SGD's per-sample bound; else the batch-level loss, repeated, whose
        mean over the batch is that loss.
        """
        routers = [m for _, m in self._having(TokenRouter)]
        if not routers or not any(r.balance > 0 for r in routers):
            return None
        return sum(r.balance * r.balance_loss(mask, per_example) for r in routers) / len(routers)

    def usage(self, mask: torch.Tensor) -> dict[str, float]:
        """How much the last forward used each expert slot (empty without routers): see ``UsageReporter``."""
        return {slot: n for _, m in self._having(UsageReporter) for slot, n in m.counts(mask).items()}

    def set_rank(self, rank: int | None) -> None:
        """Run and train only the first ``rank`` components of every LoRA layer (None: the full rank).

        Shapes stay at the adapter's rank (the cached model serves clients of every rank, and the wire
        validates one shape); the layers mask the rest, so their gradients, per-sample ones included, are 0.
        """
        if rank is not None and not 1 <= rank <= self.spec.rank:
            raise ValueError(f"client rank {rank} must be in [1, adapter.rank={self.spec.rank}]")
        if rank is not None and rank < self.spec.rank and not self.structure().rank_axes:
            raise ValueError(f"adapter kind {self.spec.kind!r} has no rank axis; client ranks need lora or ffa-lora")
        for module in self.model.modules():
            if isinstance(module, RankMasked):
                module.set_rank(rank)

    def products(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Product]:
        """The dense weight update of every adapted layer (or expert) given adapter tensors by name.

        Tensors missing from ``tensors`` (frozen-but-shared factors) are read from the model. This is
        what ``aggregation_error`` compares, for every family, so each layer type defines it once.
        """
        named = self._named()
        out: dict[str, Product] = {}
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):

                def get(local: str, prefix: str = path) -> torch.Tensor:
                    key = f"{prefix}.{local}"
                    return tensors[key] if key in tensors else named[key].detach()

                out.update({f"{path}{suffix}": p for suffix, p in module.products(get).items()})
        return out

    def fingerprint(self) -> int:
        """Hash of the frozen-but-shared tensors (FFA-LoRA's A); equal fingerprints mean equal factors.

        60 bits, so it fits a Flower MetricRecord integer.
        """
        digest = hashlib.sha256()
        named = self._named()
        for name in sorted(self.names(trainable=False, sent=False)):
            tensor = named[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return int(digest.hexdigest()[:15], 16)


def top_lines(scores: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest ``scores`` of every line along ``axis``: how a ``masked`` group's lines
    keep their entries, on the client (pruning) and on the server (re-projection) alike."""
    chosen = scores.topk(k, dim=axis).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(axis, chosen, True)


def target_pattern(target: str) -> re.Pattern[str] | None:
    """A target's path pattern, or None for a plain leaf name (an identifier such as ``query``).

    Anything else is a regular expression matched against the whole module path (``re.fullmatch``), e.g.
    ``.*\\.layer\\.\\d+\\.output\\.dense`` for BERT's MLP output, whose leaf name ``dense`` it shares
    with the attention output (``...attention.output.dense``).
    """
    if target.isidentifier():
        return None
    try:
        return re.compile(target)
    except re.error as err:
        raise ValueError(
            f"adapter target {target!r} is neither a leaf name (an identifier) nor a valid regular expression "
            f"over module paths: {err}"
        ) from err


def _selects(target: str, path: str) -> bool:
    pattern = target_pattern(target)
    return path.rsplit(".", 1)[-1] == target if pattern is None else pattern.fullmatch(path) is not None


def replace_linears(model: nn.Module, targets: tuple[str, ...], wrap) -> list[str]:
    """Swap every ``nn.Linear`` that a target selects (``target_pattern``: a leaf name, or a regular
    expression over the whole module path) for ``wrap(path, linear)``.

    Returns the wrapped paths. Raises if a target matches nothing, listing the Linear leaves that exist,
    because a typo here would otherwise train only the head and look like a working run.
    """
    found = [(path, mod) for path, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    chosen = [(path, mod) for path, mod in found if any(_selects(t, path) for t in targets)]
    missing = [t for t in targets if not any(_selects(t, path) for path, _ in chosen)]
    if missing:
        leaves = sorted({path.rsplit(".", 1)[-1] for path, _ in found})
        raise ValueError(
            f"adapter targets {missing} match no nn.Linear in the model; Linear leaves: {leaves} "
            f"(a pattern must match a whole path, e.g. {found[0][0] if found else 'encoder.layer.0.output.dense'!r})"
        )
    for path, linear in chosen:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, wrap(path, linear))
    return [path for path, _ in chosen]
