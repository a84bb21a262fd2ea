"""A canary experiment on what a DP client actually sends: its whole train reply, deltas and metrics.

Two worlds differ in one training example. "In": a canary the (confident) model gets wrong. "Out": the
same text with the label the model already predicts, whose loss and gradient are ~0: the null example
of the zero-out adjacency the guarantee is stated for (n is the same in both worlds). Each run is a
fresh client (its own state directory) answering one train message through the real ClientApp; each
reply is scored by every numeric metric it carries and by how far its update moves along the canary's
gradient. ``fed.privacy.audit.audit`` turns the scores into a lower bound on epsilon.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
from datasets import Dataset
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_app
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.data.datasets import ClientData
from fed.privacy.audit import AuditResult, audit
from fed.privacy.client import POLICY_ENV
from fed.privacy.ledger import DpSgdEvent, epsilon
from fed.privacy.mechanism import DpSettings
from fed.session import ClientSession, adapted_model
from fed.train import train_round
from fed.wire import config_record, from_record, metas, to_record

Reply = tuple[dict[str, float], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Canary:
    examples: int = 40
    batch_size: int = 8
    steps: int = 4
    noise_multiplier: float = 2.0
    delta: float = 1e-3
    lr: float = 1e-3
    model: str = "tiny-bert"
    loss_noise_multiplier: float = 0.0
    """> 0: the client also releases its privatised training loss (inside the same accounted mechanism)."""

    def config(self) -> RunConfig:
        return resolve(
            "quickstart",
            [
                f"model.name={self.model}",
                "data.name=synthetic",
                "adapter.kind=ffa-lora",
                "adapter.rank=4",
                "federation.num_clients=1",
                "federation.rounds=1",
                f"train.local_steps={self.steps}",
                f"train.batch_size={self.batch_size}",
                f"train.lr={self.lr}",
                "dp.enabled=true",
                f"dp.noise_multiplier={self.noise_multiplier}",
                f"dp.delta={self.delta}",
                f"dp.loss_noise_multiplier={self.loss_noise_multiplier}",
            ],
        )

    def claimed_epsilon(self) -> float:
        """What the client's ledger says this one round costs (the guarantee under audit)."""
        rate = self.batch_size / (self.examples + 1)
        return epsilon([DpSgdEvent(1, self.noise_multiplier, rate, self.steps)], self.delta, "rdp")

    def data(self, canary_in: bool) -> Dataset:
        texts = [f"w{i} w{i + 1} w{i + 2}" for i in range(self.examples)] + ["canary text"]
        return Dataset.from_dict({"text": texts, "label": [0] * self.examples + [1 if canary_in else 0]})


class Experiment:
    """The adapted model, a confident global adapter, and the canary's gradient at it."""

    def __init__(self, canary: Canary) -> None:
        self.canary, self.cfg = canary, canary.config()
        self.adapter, self.task = adapted_model(self.cfg)
        self.global_ = self.adapter.sent_state()
        bias = next(n for n in self.global_ if n.endswith("classifier.bias"))
        self.global_[bias] = torch.tensor([8.0, -8.0])  # confident in class 0: the canary (class 1) stands out
        self.adapter.load(self.global_)
        params = dict(self.adapter.model.named_parameters())
        loss = self.task.per_example_loss(self.adapter.model, self.task.encode(canary.data(True)[-1:])).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in self.global_])
        self.canary_grad = dict(zip(self.global_, grads))

    def scores(self, reply: Reply) -> dict[str, float]:
        metrics, delta = reply
        update = -sum(float((delta[n] * self.canary_grad[n]).sum()) for n in delta)
        return {
            "update·(-canary gradient)": update,
            **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        }

    def client_reply(self, data: Dataset) -> Reply:
        """One fresh client (a new state directory) answering a train message through the real ClientApp: a
        simulated node, whose policy is the run's config (as ``fed simulate`` sets it) and whose fresh ledger
        needs no operator's confirmation."""
        with tempfile.TemporaryDirectory() as state, mock.patch.dict(os.environ, {POLICY_ENV: "run-config"}):
            reply = self.ask(data, {"state-dir": state})
        return dict(reply.content.metric_records["metrics"]), from_record(
            reply.content.array_records["arrays"], metas(self.global_)
        )

    def ask(
        self,
        data: Dataset,
        node_config: dict,
        cfg: RunConfig | None = None,
        round_: int = 1,
        known_events: str = "",
        known_pin: str = "",
    ) -> Message:
        """The ClientApp's reply to a train message of ``cfg`` (default: the canary's) for ``round_``, with the
        server's copy of the node's events and pin when given."""
        self.adapter.load(self.global_)
        session = ClientSession(self.adapter, self.task, ClientData(train=data, test=data))
        known = {"known-events": known_events, "known-pin": known_pin}
        extra = {"server-round": round_} | {k: v for k, v in known.items() if v}
        content = RecordDict({"arrays": to_record(self.global_), "config": config_record(cfg or self.cfg, **extra)})
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 1, **node_config},
            state=RecordDict(),
            run_config={},
        )
        identity = {"_run_id": 1, "_node_id": 1, "_task_id": 1}  # what a Flower process would have set
        with (
            mock.patch.multiple(TaskIdentity, **identity),
            mock.patch.object(client_app, "client_session", lambda *_, **__: session),
        ):
            return client_app.train(Message(content, dst_node_id=1, message_type="train"), context)

    def foundation_reply(self, data: Dataset) -> Reply:
        """What the foundation's client sent under DP: the same update plus the raw training loss."""
        self.adapter.load(self.global_)
        c = self.canary
        dp = DpSettings(
            noise_multiplier=c.noise_multiplier,
            max_grad_norm=1.0,
            sample_rate=c.batch_size / len(data),
            num_examples=len(data),
        )
        result = train_round(
            self.adapter,
            self.task,
            data,
            steps=c.steps,
            batch_size=c.batch_size,
            lr=c.lr,
            weight_decay=0.0,
            dp=dp,
            gen=torch.Generator(),
        )
        local = self.adapter.sent_state()
        return {"train_loss": result.loss}, {n: local[n] - self.global_[n] for n in self.global_}

    def run(self, reply: Callable[[Dataset], Reply], runs: int) -> AuditResult:
        """``runs`` replies per world, scored and audited."""
        inside = [self.scores(reply(self.canary.data(True))) for _ in range(runs)]
        outside = [self.scores(reply(self.canary.data(False))) for _ in range(runs)]
        return audit(inside, outside, self.canary.delta)
