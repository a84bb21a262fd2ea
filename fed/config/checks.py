"""What a run configuration accepts: the allowed values of every choice key, and the checks that
``RunConfig.validate`` runs (each returns its problems as sentences naming the key, the bad value and
what is accepted, so that one error can list them all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from fed import ranks
from fed.adapters import registry

if TYPE_CHECKING:
    from fed.config import RunConfig

TASKS = ("classification", "causal-lm")
POOLINGS = ("cls", "mean")
PARTITIONS = ("iid", "dirichlet", "pathological", "natural")
ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "bfloat16")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
ROBUST_RULES = ("mean", "median", "trimmed-mean")
WEIGHTINGS = ("capped", "examples", "uniform")
CLIPS = ("adaptive", "auto", "fixed", "off")
AGGREGATIONS = ("mean", "product")
WIRE_DTYPES = ("float32", "bfloat16")


def _choice(name: str, value: str, accepted: Sequence[str]) -> list[str]:
    return [] if value in accepted else [f"{name}={value!r} is not one of: {', '.join(accepted)}"]


def _at_least(name: str, value: float, low: float) -> list[str]:
    return [] if value >= low else [f"{name}={value!r} must be >= {low}"]


def _in_range(name: str, value: float, low: float, high: float, *, closed: bool = False) -> list[str]:
    """``low < value <= high`` (``low <= value`` when ``closed``), else a message naming both bounds."""
    if (low <= value if closed else low < value) and value <= high:
        return []
    return [f"{name}={value!r} must be in {'[' if closed else '('}{low}, {high}]"]


def _check_choices(c: RunConfig) -> list[str]:
    return (
        _choice("task", c.task, TASKS)
        + _choice("adapter.kind", c.adapter.kind, registry.kinds())
        + _choice("data.partition", c.data.partition, PARTITIONS)
        + _choice("dp.accountant", c.dp.accountant, ACCOUNTANTS)
        + _choice("model.pooling", c.model.pooling, POOLINGS)
        + _choice("train.optimizer", c.train.optimizer, OPTIMIZERS)
        + _choice("train.lr_schedule", c.train.lr_schedule, LR_SCHEDULES)
        + _choice("train.precision", c.train.precision, PRECISIONS)
        + ([] if c.model.pooling == "cls" or c.task == "classification"
           else [f"model.pooling={c.model.pooling!r} builds a classification head; task {c.task!r} needs 'cls'"])
        + ([] if not c.model.center or c.model.pooling == "mean"
           else [f"model.center={c.model.center!r} centres the mean-pooled head's features; it needs "
                 f"model.pooling='mean' (got {c.model.pooling!r})"])
        + ([] if not c.model.scale or c.model.center
           else ["model.scale=true divides by the public texts' standard deviation; it needs model.center to name "
                 "them (e.g. 'sms-spam')"])
        + ([] if c.model.center != c.data.name
           else [f"model.center={c.model.center!r} is the clients' own dataset (data.name): its texts are private; "
                 "name public text the clients do not hold, e.g. 'sms-spam'"])
        + _choice("dp.grad_sample_mode", c.dp.grad_sample_mode, GRAD_SAMPLE_MODES)
        + _choice("strategy.rule", c.strategy.rule, ROBUST_RULES)
        + _choice("strategy.weighting", c.strategy.weighting, WEIGHTINGS)
        + _choice("strategy.clip", c.strategy.clip, CLIPS)
        + _choice("strategy.aggregation", c.strategy.aggregation, AGGREGATIONS)
        + _choice("wire.dtype", c.wire.dtype, WIRE_DTYPES)
    )


def _check_ranges(c: RunConfig) -> list[str]:
    return (
        _at_least("adapter.rank", c.adapter.rank, 1)
        + _at_least("adapter.experts", c.adapter.experts, 1)
        + _at_least("adapter.balance", c.adapter.balance, 0.0)
        + _in_range("adapter.keep_ratio", c.adapter.keep_ratio, 0.0, 1.0)
        + _at_least("adapter.alpha", c.adapter.alpha, 1e-12)
        + _at_least("adapter.dropout", c.adapter.dropout, 0.0)
        + _at_least("federation.num_clients", c.federation.num_clients, 1)
        + _at_least("federation.rounds", c.federation.rounds, 1)
        + _in_range("federation.fraction_train", c.federation.fraction_train, 0.0, 1.0)
        + _in_range("federation.fraction_evaluate", c.federation.fraction_evaluate, 0.0, 1.0, closed=True)
        + _at_least("federation.eval_every", c.federation.eval_every, 0)
        + _at_least("federation.server_lr", c.federation.server_lr, 1e-12)
        + _in_range("strategy.trim_fraction", c.strategy.trim_fraction, 0.0, 0.49, closed=True)
        + _at_least("strategy.max_weight_ratio", c.strategy.max_weight_ratio, 1.0)
        + _at_least("strategy.clip_multiplier", c.strategy.clip_multiplier, 1.0)
        + _at_least("strategy.max_delta_norm", c.strategy.max_delta_norm, 0.0)
        + ([] if c.strategy.clip != "fixed" or c.strategy.max_delta_norm > 0
           else ["strategy.clip='fixed' needs strategy.max_delta_norm > 0"])
        + _at_least("federation.min_replies", c.federation.min_replies, 1)
        + _at_least("federation.min_available", c.federation.min_available, 0)
        + _at_least("federation.round_timeout", c.federation.round_timeout, 1e-3)
        + _at_least("data.alpha", c.data.alpha, 1e-12)
        + _at_least("data.classes_per_client", c.data.classes_per_client, 1)
        + _in_range("data.test_fraction", c.data.test_fraction, 0.0, 0.9)
        + _at_least("data.max_examples", c.data.max_examples, 0)
        + _at_least("model.max_length", c.model.max_length, 4)
        + _at_least("model.layers", c.model.layers, 0)
        + _at_least("train.local_steps", c.train.local_steps, 1)
        + _at_least("train.batch_size", c.train.batch_size, 1)
        + _at_least("train.lr", c.train.lr, 1e-12)
        + _in_range("train.momentum", c.train.momentum, 0.0, 1.0)
        + _at_least("train.micro_batch", c.train.micro_batch, 0)
        + _at_least("train.eval_batch_size", c.train.eval_batch_size, 1)
        + _at_least("train.max_eval_examples", c.train.max_eval_examples, 0)
        + _at_least("simulation.actors", c.simulation.actors, 0)
        + _at_least("simulation.threads", c.simulation.threads, 1)
    )


def _check_dp(c: RunConfig) -> list[str]:
    dp = c.dp
    problems = _in_range("dp.delta", dp.delta, 0.0, 0.1) + _at_least("dp.max_grad_norm", dp.max_grad_norm, 1e-12)
    problems += _at_least("dp.target_epsilon", dp.target_epsilon, 0.0)
    problems += _at_least("dp.noise_multiplier", dp.noise_multiplier, 0.0)
    problems += _at_least("dp.loss_noise_multiplier", dp.loss_noise_multiplier, 0.0)
    problems += _at_least("dp.loss_clip", dp.loss_clip, 1e-12)
    if not 0 <= dp.head_clip_share < 1:
        problems.append(f"dp.head_clip_share={dp.head_clip_share!r} must be in [0, 1) (0: flat clipping; "
                        "1 would leave the adapter no clipping budget)")
    if dp.head_clip_share > 0 and dp.grad_sample_mode != "hooks":
        problems.append(f"dp.head_clip_share={dp.head_clip_share} (per-layer clipping) needs "
                        f"dp.grad_sample_mode='hooks' (got {dp.grad_sample_mode!r}: Opacus's ghost clipping is flat only)")
    if dp.enabled and 0 < dp.loss_noise_multiplier <= dp.noise_multiplier:
        problems.append(f"dp.loss_noise_multiplier={dp.loss_noise_multiplier} must exceed "
                        f"dp.noise_multiplier={dp.noise_multiplier} (the loss release shares its budget)")
    if dp.enabled and dp.target_epsilon > 0 and dp.noise_multiplier > 0:
        problems.append(
            f"dp.target_epsilon={dp.target_epsilon} and dp.noise_multiplier={dp.noise_multiplier} are both set; "
            "give one (the other stays 0)"
        )
    if dp.enabled and dp.target_epsilon == 0 and dp.noise_multiplier == 0:
        problems.append("dp.enabled=true needs dp.target_epsilon > 0 or dp.noise_multiplier > 0")
    return problems


def _check_labels(c: RunConfig) -> list[str]:
    d, problems = c.data, _at_least("data.num_labels", c.data.num_labels, 0)
    if len(set(d.labels)) != len(d.labels):
        problems.append(f"data.labels={list(d.labels)} repeats a name; give each class once")
    if d.labels and d.num_labels and d.num_labels != len(d.labels):
        problems.append(f"data.num_labels={d.num_labels} but data.labels names {len(d.labels)} classes; give one")
    if 0 < len(d.labels) < 2 or d.num_labels == 1:
        problems.append("a classification run needs at least 2 classes in data.labels / data.num_labels")
    return problems


def _check_federation(c: RunConfig) -> list[str]:
    f = c.federation
    problems = ranks.problems(f.client_ranks, f.num_clients, c.adapter.rank, c.adapter.kind)
    for name in ("min_replies", "min_available"):
        if getattr(f, name) > f.num_clients:
            problems.append(f"federation.{name}={getattr(f, name)} exceeds federation.num_clients={f.num_clients}: "
                            "the run would wait forever")
    return problems


def _check_family(c: RunConfig) -> list[str]:
    """What the chosen family refuses (its own checks), and product aggregation where it declares no (B, A) pairs."""
    if c.adapter.kind not in registry.kinds():
        return []  # reported by _check_choices
    fam = registry.family(c.adapter.kind)
    problems = fam.config_problems(c.to_flat())
    if c.strategy.aggregation == "product" and not fam.product_pairs:
        accepted = [k for k in registry.kinds() if registry.family(k).product_pairs]
        problems.append(f"strategy.aggregation='product' applies to adapter.kind in {accepted} only (got "
                        f"{c.adapter.kind!r}: its factors have no single B·A pair to average, or are exact already)")
    return problems


_CHECKS = (_check_choices, _check_ranges, _check_dp, _check_labels, _check_federation, _check_family)


def problems(c: RunConfig) -> list[str]:
    """Every value of ``c`` that is not accepted, each named with what is."""
    return [p for check in _CHECKS for p in check(c)]
