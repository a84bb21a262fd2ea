"""Secure aggregation: each round's train messages run through Flower's own SecAgg+, and the core aggregates
the sum it unmasks instead of the clients' updates (docs/secure-aggregation.md).

Flower 1.42 runs SecAgg+ only on its legacy workflow path (``SecAggPlusWorkflow`` in a ``LegacyContext`` with a
legacy strategy). So the stage swaps the strategy's grid (``Stage.transport``) for ``SecAggGrid``: the round's
train messages, as the core and its stages built them, are handed to the workflow by ``_Handout`` (a legacy
strategy that only hands out those messages and keeps what comes back); the workflow's four stages run on the
real grid; what returns to the core is each surviving client's public metrics, as if each had replied, and the
unmasked weighted mean of their updates, which ``SecureAggregation.bound`` hands to the rules as the round's
only reply. No individual update ever reaches the strategy: SecAgg+ never unmasks one.

``_Guarded`` adds two checks Flower's workflow lacks: it unmasks nothing when fewer than the round's minimum
of survivors sent masked vectors (distributed DP's noise is sized for that many), and it bounds every stage
by the round's timeout (Flower's default waits for ever on a hung client).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fed.privacy.distributed import SecureGrid
from fed.wire import PayloadError, from_ndarrays, legacy_parameters
from strategies.client_dp import ClientLevelDP, round_of
from strategies.kinds import Replies, Tensors
from strategies.pipeline import AdapterModel, Reply, RoundState, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """SecAgg+'s settings for this run (``federation.secure_*``) and the grid both sides derive."""

    grid: SecureGrid
    shares: int = 7
    threshold: float = 0.6
    min_survivors: int = 2
    timeout: float = 3600.0
    summed: bool = False
    """Distributed DP: the rules get the survivors' noised sum, not their mean (``DistributedDP`` divides it)."""

    def workflow(self, sampled: int) -> _Guarded:
        """Flower's workflow for a round of ``sampled`` clients: each shares with ``shares`` of them (all when
        fewer), and ``threshold`` of those rebuild its secrets, never fewer than 2."""
        if sampled <= self.shares:  # a float share count means "this fraction of the round": all of them
            shares: int | float = 1.0
            threshold: int | float = max(self.threshold, min(1.0, 2 / sampled))
        else:
            shares = self.shares | 1  # SecAgg+ wants an odd count
            threshold = min(shares - 1, max(2, math.ceil(self.threshold * shares)))
        return _Guarded(
            shares,
            threshold,
            min_survivors=self.min_survivors,
            max_weight=self.grid.max_weight,
            clipping_range=self.grid.range,
            quantization_range=self.grid.levels,
            timeout=self.timeout,
        )


class _Guarded(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that unmasks only a sum of at least ``min_survivors`` masked vectors."""

    def __init__(self, *args: Any, min_survivors: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_survivors = min_survivors

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if len(state.active_node_ids) < self.min_survivors:
            log.warning(
                "secure aggregation: %d clients sent masked vectors, fewer than the %d the round needs; nothing is "
                "unmasked",
                len(state.active_node_ids),
                self.min_survivors,
            )
            return False
        return super().unmask_stage(grid, context, state)


class _Node(ClientProxy):
    """A node as the legacy workflow addresses it: only its id is ever read."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _Handout(Strategy):
    """The legacy strategy SecAgg+ calls: hands out the round's train messages, keeps what the protocol returns."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures = 0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (
                _Node(node),
                FitIns(
                    legacy_parameters(m.content.array_records["arrays"]), _scalars(m.content.config_records["config"])
                ),
            )
            for node, m in self.messages.items()
        ]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[None, dict[str, Any]]:
        self.results, self.failures = list(results), len(failures)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> None:
        return None

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class _Counted:
    """A grid that counts the bytes of every message SecAgg+ sends and receives through it (its four stages)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.down, self.up = grid, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        self.down += sum(_size(m) for m in sent)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.up += sum(_size(m) for m in replies if not m.has_error())
        return replies


def _size(message: Message) -> int:
    """The bytes a message's records hold (arrays, configs, metrics)."""
    content = message.content
    arrays = sum(record.count_bytes() for record in content.array_records.values())
    configs = sum(_config_bytes(record) for record in content.config_records.values())
    return arrays + configs + sum(record.count_bytes() for record in content.metric_records.values())


def _config_bytes(record: ConfigRecord) -> int:
    """A config record's keys and values as bytes (Flower's ``count_bytes`` refuses the lists SecAgg+ sends)."""

    def size(value: Any) -> int:
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return len(value) if isinstance(value, (str, bytes)) else 1 if isinstance(value, bool) else 8

    return sum(len(key) + size(value) for key, value in record.items())


@dataclass
class RoundSum:
    """What one secure round unmasked: the survivors' weighted mean, how many they were, who did not finish."""

    mean: Tensors | None
    survivors: int
    weight: float
    """Their total weight as SecAgg+ summed it (examples without DP, one each under DP)."""
    sampled: int
    missing: list[int] = field(default_factory=list)
    """Node ids sent a train message that are not among the survivors."""
    bytes_down: int = 0
    bytes_up: int = 0
    """What the protocol's messages carried each way (keys, shares, the global adapter, masked vectors)."""


class SecAggGrid:
    """The strategy's grid, except that a batch of train messages runs through SecAgg+ (``Protocol``)."""

    def __init__(
        self, grid: Grid, protocol: Protocol, model: AdapterModel, deliver: Callable[[int, RoundSum], None]
    ) -> None:
        self.grid, self.protocol, self.model, self.deliver = grid, protocol, model, deliver

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent = list(messages)
        if not sent or sent[0].metadata.message_type != MessageType.TRAIN:
            return list(self.grid.send_and_receive(sent, timeout=timeout))
        run_round = round_of(sent)
        if run_round is None:
            raise ValueError("a train message without its config's server-round")
        handout, counted = _Handout(sent), _Counted(self.grid)
        if len(sent) >= max(2, self.protocol.min_survivors):  # else there is nothing the protocol may unmask
            self.protocol.workflow(len(sent))(counted, self._context(sent, run_round, handout))  # type: ignore[arg-type]
        replies = [
            Message(_public(fitres), reply_to=handout.messages[proxy.node_id]) for proxy, fitres in handout.results
        ]
        summed = self._sum(handout, sent)
        summed.bytes_down, summed.bytes_up = counted.down, counted.up
        self.deliver(run_round, summed)
        return replies

    def _context(self, sent: list[Message], run_round: int, handout: _Handout) -> LegacyContext:
        """The legacy context the workflow reads: this round's number and global adapter, the hand-out strategy."""
        context = LegacyContext(
            Context(sent[0].metadata.run_id, 0, {}, RecordDict(), {}),
            config=ServerConfig(num_rounds=1, round_timeout=self.protocol.timeout),
            strategy=handout,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: run_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = sent[0].content.array_records["arrays"]
        return context

    def _sum(self, handout: _Handout, sent: list[Message]) -> RoundSum:
        """The round's unmasked mean (None when the protocol halted), checked against the adapter's tensors."""
        survivors = {proxy.node_id for proxy, _ in handout.results}
        missing = sorted(m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in survivors)
        if not handout.results:
            return RoundSum(None, 0, 0.0, len(sent), missing)
        parameters = handout.results[0][1].parameters  # every survivor's FitRes carries the one aggregate
        mean = from_ndarrays(parameters, self.model.expected)
        weight = float(sum(fitres.num_examples for _, fitres in handout.results))
        return RoundSum(mean, len(survivors), weight, len(sent), missing)


def _public(fitres: FitRes) -> RecordDict:
    """A survivor's reply as the core reads one: the numbers it sent in the clear (validation reads them), no arrays."""
    numbers: dict[str, MetricRecordValues] = {
        k: v for k, v in fitres.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return RecordDict({"metrics": MetricRecord(numbers)})


def _scalars(config: ConfigRecord) -> dict[str, Scalar]:
    """The run's train config as a legacy FitIns carries it: typed as scalars, but its lists travel as they are
    (``compat.fitins_to_recorddict`` puts the dict back into a ConfigRecord, which holds them)."""
    return cast(dict[str, Scalar], dict(config))


class SecureAggregation(Stage):
    """Runs each round's train messages through SecAgg+ and feeds the rules the sum it unmasks."""

    def __init__(self, protocol: Protocol, model: AdapterModel) -> None:
        self.protocol, self.model = protocol, model
        self._sums: dict[int, RoundSum] = {}
        self._accepted: dict[int, int] = {}

    def transport(self, grid: Grid) -> Grid:
        return SecAggGrid(grid, self.protocol, self.model, self._sums.__setitem__)  # type: ignore[return-value]

    def accepted(self, state: RoundState, reply: Reply) -> None:
        self._accepted[state.number] = self._accepted.get(state.number, 0) + 1

    def received(self, state: RoundState, replies: Any) -> None:
        summed = self._sums.get(state.number)
        if summed is None:
            return
        if summed.mean is None:  # nothing to aggregate: ``bound`` will not run for this round
            del self._sums[state.number]
            self._accepted.pop(state.number, None)
        state.log.bytes_down, state.log.bytes_up = summed.bytes_down, summed.bytes_up
        for node in summed.missing:
            state.log.dropped.append(f"node {node}: did not complete secure aggregation")
        if summed.mean is None and summed.sampled:
            state.log.dropped.append(
                f"secure aggregation unmasked nothing ({summed.sampled} sampled, at least "
                f"{max(2, self.protocol.min_survivors)} must send masked vectors)"
            )

    def bound(self, state: RoundState, batch: Replies) -> Replies:
        """The round's only reply: the survivors' weighted mean at their total weight. A survivor whose public
        metrics were refused is inside the sum all the same, so then the round moves nothing."""
        summed = self._sums.pop(state.number, None)
        accepted = self._accepted.pop(state.number, 0)
        if summed is None or summed.mean is None:
            raise PayloadError("secure aggregation unmasked nothing this round")
        mean = summed.mean
        if accepted != summed.survivors:
            log.warning(
                "round %d: %d of the %d clients in the secure sum were refused; the round moves nothing",
                state.number,
                summed.survivors - accepted,
                summed.survivors,
            )
            mean = {name: torch.zeros_like(t) for name, t in mean.items()}
        ratios = summed.weight / self.protocol.grid.max_weight  # the weights SecAgg+ divides by
        state.log.secagg_error = summed.survivors * self.protocol.grid.step / ratios
        if self.protocol.summed:
            state.log.secagg_error *= summed.weight  # on the sum; ``DistributedDP`` divides it like the sum
            return Replies(
                batch.global_,
                [{n: t * summed.weight for n, t in mean.items()}],
                [1.0],
                seed=batch.seed,
                step=batch.step,
            )
        return Replies(batch.global_, [mean], [summed.weight], seed=batch.seed, step=batch.step)


class DistributedDP(ClientLevelDP):
    """Client-level DP whose noise the clients add inside the secure sum: the server samples (Poisson, as
    ``ClientLevelDP``), books each unmasked round and divides the survivors' noised sum by the fixed ``q N``;
    it clips nothing (the clients did) and adds no noise."""

    def accepted(self, state: RoundState, reply: Reply) -> None:
        reply.weight = 1.0

    def released(self, state: RoundState, merged: Tensors) -> Tensors:
        """``merged`` is the survivors' noised sum (``SecureAggregation`` hands it over whole): booked, then over
        the fixed ``q N`` like the server-noised release."""
        self.account.book(state.number)
        if self.on_privacy is not None:
            self.on_privacy()
        denominator = self.account.mechanism.expected_clients
        if state.log.secagg_error is not None:
            state.log.secagg_error /= denominator
        return {name: t / denominator for name, t in merged.items()}
