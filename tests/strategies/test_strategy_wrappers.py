"""The strategy composes piecewise: the core alone aggregates, each stage does its one job, the builder stacks them."""

from __future__ import annotations

import pytest
import torch

from fed.adapters import Aggregation, Structure
from fed.config import DPConfig, RunConfig
from fed.privacy.book import LedgerBook
from fed.wire import from_record, metas
from strategies.build import build_strategy
from strategies.core import AdapterStrategy, ServerUpdate
from strategies.influence import CappedWeights, NormClip
from strategies.pipeline import AdapterModel, Reply, RoundState, Stage
from strategies.privacy import PrivacyBookkeeping
from strategies.validation import OneReplyPerNode, ReplyValidation
from tests.helpers import reply_from

GLOBAL = {"l.lora_B.weight": torch.zeros(3, 2), "head.bias": torch.ones(2)}
MODEL = AdapterModel(metas(GLOBAL), Structure({n: Aggregation.MEAN for n in GLOBAL}))

pytestmark = pytest.mark.usefixtures("flower_identity")


class Decode(Stage):
    """The least intake the core needs: each reply's delta and weight, taken as sent."""

    def arrive(self, state: RoundState, reply: Reply) -> None:
        reply.delta = from_record(reply.message.content.array_records["arrays"], MODEL.expected)
        reply.weight = float(reply.metrics["num-examples"])


def _core(*stages: Stage) -> AdapterStrategy:
    strategy = AdapterStrategy(model=MODEL, stages=[*stages, Decode()], update=ServerUpdate(server_lr=0.5))
    strategy._global = {n: t.clone() for n, t in GLOBAL.items()}
    return strategy


def _delta(value: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(value * 10))
    return {n: value + torch.randn(t.shape, generator=g) for n, t in GLOBAL.items()}


def test_the_core_alone_takes_the_example_weighted_mean_and_steps_at_server_lr():
    deltas = [_delta(1.0), _delta(-2.0)]
    replies = [reply_from(node, d, {"num-examples": n}) for node, d, n in zip((1, 2), deltas, (10, 30))]
    arrays, summary = _core().aggregate_train(1, replies)
    out = from_record(arrays, MODEL.expected)
    for name, start in GLOBAL.items():
        torch.testing.assert_close(out[name], start + 0.5 * (10 * deltas[0][name] + 30 * deltas[1][name]) / 40)
    assert summary["clients"] == 2 and summary["dropped"] == 0


def test_one_reply_per_node_drops_the_second_with_its_reason():
    strategy = _core(OneReplyPerNode())
    first, again = (reply_from(7, _delta(v), {"num-examples": 10}) for v in (1.0, 5.0))
    arrays, _ = strategy.aggregate_train(1, [first, again])
    assert strategy.rounds[1].dropped == ["node 7: a second reply from the same node in this round"]
    kept = from_record(arrays, MODEL.expected)["head.bias"]
    torch.testing.assert_close(kept, GLOBAL["head.bias"] + 0.5 * _delta(1.0)["head.bias"])  # the first counts
    strategy.aggregate_train(2, [first])  # a new round: the node may answer again
    assert strategy.rounds[2].dropped == []


@pytest.mark.parametrize(
    "clip, stack",
    [
        ("adaptive", [OneReplyPerNode, PrivacyBookkeeping, ReplyValidation, CappedWeights, NormClip]),
        ("off", [OneReplyPerNode, PrivacyBookkeeping, ReplyValidation, CappedWeights]),
    ],
)
def test_the_builder_stacks_a_norm_clip_unless_clipping_is_off(clip, stack):
    from tests.helpers import make

    cfg = RunConfig.from_flat({"strategy.clip": clip})
    strategy = build_strategy(cfg, make("lora"), LedgerBook(DPConfig()), round_offset=2)
    assert [type(stage) for stage in strategy.stages] == stack
    assert strategy.round_offset == 2 and strategy.plan.rounds == cfg.federation.rounds
