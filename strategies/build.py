"""The one place a run's config becomes a strategy: configs stop here, the classes get flat settings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from fed.adapters import Adapter
from fed.config import FederationConfig, RunConfig, StrategyConfig
from fed.privacy.book import LedgerBook
from fed.privacy.client_level import dense_mean_problems
from fed.privacy.distributed import LEVELS, max_clients, min_survivors, secure_grid
from fed.ranks import planned_ranks
from fed.wire import TensorMeta, metas
from strategies.client_dp import ClientLevelDP
from strategies.core import AdapterStrategy, MergeRule, RoundPlan, ServerUpdate
from strategies.influence import CappedWeights, NormClip, honest_step_bound
from strategies.pipeline import AdapterModel, Stage
from strategies.privacy import PrivacyBookkeeping
from strategies.secure import DistributedDP, Protocol, SecureAggregation
from strategies.validation import OneReplyPerNode, ReplyRules, ReplyValidation


def build_strategy(
    cfg: RunConfig,
    adapter: Adapter,
    book: LedgerBook,
    on_privacy: Callable[[LedgerBook], None] | None = None,
    round_offset: int = 0,
) -> AdapterStrategy:
    """The strategy for ``cfg``'s run of ``adapter``, booking DP events in ``book`` (persisted by
    ``on_privacy``) and numbering rounds after ``round_offset`` (a resumed run's last round)."""
    fed, limits = cfg.federation, cfg.strategy
    model = AdapterModel(metas(adapter.sent_state()), adapter.structure(), adapter.products)
    stages = reply_stages(model, _reply_rules(cfg, adapter), book, on_privacy)
    if fed.secure_aggregation:
        stages += secure_stages(cfg, model, book, on_privacy)
    elif cfg.dp.client_level:
        stages.append(client_level_stage(model, book, on_privacy))
    else:
        stages += influence_stages(limits, honest_ceiling(model.expected, cfg.train.lr, cfg.train.local_steps))
    return AdapterStrategy(
        model=model,
        stages=stages,
        merge=MergeRule(rule=limits.rule, trim=limits.trim_fraction, aggregation=limits.aggregation),
        update=ServerUpdate(
            server_lr=fed.server_lr,
            server_step=adapter.after_aggregate,
            budgets=partial(adapter.round_budgets, rounds=fed.rounds),
        ),
        plan=RoundPlan(
            rounds=fed.rounds,
            offset=round_offset,
            eval_every=fed.eval_every,
            min_replies=fed.min_replies,
            seed=cfg.seed,
            loss_metric="dp-train-loss" if cfg.dp.example_level else "train_loss",
        ),
        **_sampling(fed, poisson=cfg.dp.client_level),
    )


def reply_stages(
    model: AdapterModel, rules: ReplyRules, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None
) -> list[Stage]:
    """How each reply is read, in order: a node's second reply goes before its DP event could be booked
    twice; every other reply is booked before validation may drop it (it spent budget all the same)."""
    return [OneReplyPerNode(), PrivacyBookkeeping(book, on_privacy), ReplyValidation(model, rules)]


def client_level_stage(
    model: AdapterModel, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None
) -> Stage:
    """Client-level DP (``strategies.client_dp``) in place of the influence stages: its clip bounds every reply
    and its weights are uniform, and a bound that read the round's other replies (the adaptive norm clip's
    median) would let one client move another's clip, past the sensitivity the noise is scaled to."""
    if problems := dense_mean_problems(model.structure.kinds):
        raise ValueError(problems[0])
    return ClientLevelDP.for_book(book, on_privacy)


def secure_stages(
    cfg: RunConfig, model: AdapterModel, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None
) -> list[Stage]:
    """SecAgg+ in place of the influence stages (it hands over one sum: no reply can be clipped or weighed by
    the server), and under ``dp.level = "client"`` the distributed-DP release: the clients clipped and noised."""
    if problems := dense_mean_problems(model.structure.kinds, "secure aggregation"):
        raise ValueError(problems[0])
    fed = cfg.federation
    if fed.num_clients > max_clients():
        raise ValueError(
            f"federation.num_clients={fed.num_clients}: SecAgg+'s {LEVELS}-level grid sums at most {max_clients()} "
            "clients below its 2^32 modulus"
        )
    grid, share = secure_grid(cfg, sum(math.prod(meta.shape) for meta in model.expected.values()))
    protocol = Protocol(
        grid, fed.secure_shares, fed.secure_threshold, min_survivors(fed), fed.round_timeout, summed=share is not None
    )
    stages: list[Stage] = [SecureAggregation(protocol, model)]
    if share is not None:
        stages.append(DistributedDP.for_book(book, on_privacy))
    return stages


def influence_stages(limits: StrategyConfig, ceiling: float) -> list[Stage]:
    """Bounded influence as ``strategy.*`` asks: counts capped unless trusted (``weighting=examples``),
    deltas clipped unless ``clip=off``; ``ceiling`` is the largest honest step (``honest_ceiling``)."""
    stages: list[Stage] = []
    if limits.weighting != "examples":
        stages.append(CappedWeights(limits.weighting, limits.max_weight_ratio))
    if limits.clip != "off":
        stages.append(NormClip(limits.clip, limits.max_delta_norm, limits.clip_multiplier, ceiling))
    return stages


def honest_ceiling(expected: Mapping[str, TensorMeta], lr: float, local_steps: int) -> float:
    """The largest update an honest client can make to these tensors: ``auto``'s bound and ``adaptive``'s
    ceiling (unbounded when the learning rate or step count is not known)."""
    if not (lr and local_steps):
        return math.inf
    return honest_step_bound(lr, local_steps, sum(math.prod(meta.shape) for meta in expected.values()))


def _reply_rules(cfg: RunConfig, adapter: Adapter) -> ReplyRules:
    """What a train reply of this run must satisfy (``strategies.validation``)."""
    fed = cfg.federation
    return ReplyRules(
        fingerprint=adapter.fingerprint(),
        local_steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        rounds=fed.rounds,
        dp=cfg.dp,
        max_rank=cfg.adapter.rank if fed.client_ranks else 0,
        ranks=planned_ranks(fed.client_ranks, fed.num_clients, cfg.adapter.rank) or (),
        wire=cfg.wire.dtype,
        secure=fed.secure_aggregation,
    )


def _sampling(fed: FederationConfig, poisson: bool = False) -> dict[str, Any]:
    """Flower FedAvg's sampling. The strategy waits for ``min_available_nodes`` itself before FedAvg sizes
    its sample (``AdapterStrategy._await_nodes``), so FedAvg's own minimums stay at one node. Under client-level
    DP FedAvg addresses every node and the stage samples each at ``fraction_train`` (Poisson, not FedAvg's
    fixed-size draw the accountant cannot amplify)."""
    return {
        "fraction_train": 1.0 if poisson else fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if fed.fraction_evaluate > 0 else 0,
        "min_available_nodes": fed.min_available or fed.num_clients,
    }
