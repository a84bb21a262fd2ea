"""A client's privacy around one training round: ledger, policy, plan, booking, and what may be released.

The client owns its privacy: its policy comes from its own node config, never from the server; its
ledger is a file in its state directory (node config ``state-dir``, else ``$FEDLORA_STATE_DIR``, else
``~/.local/state/fedlora``), written atomically once per DP round, with that round's event, before
training; merged with the events the server returns, and never silently replaced: a ledger that cannot
be read stops the client.

The node's state (``NodeState``: ledger, pinned split, policy) is loaded before its data, because the
data split is the node's own: fixed at first contact from a node-local secret seed and kept in the
ledger file, never re-derived from what a later message says. The ClientApp opens a ``PrivateRound``
once it knows its data, trains ``plan.steps`` steps under
``plan.dp`` (or replies with ``verdict()`` when the round must not train), and passes every reply's
metrics through ``release``. Why an object the app calls rather than a Flower client mod wrapping
``train``: the round can only be planned once the node's data is loaded (``num_examples`` sets the
sample rate and the delta check), which happens inside the app, and the plan (a step count and
``DpSettings``) must reach ``train_round``; a mod would have to load the data itself or smuggle the
plan through ``Context.state`` as serialised records. Called directly, the layer stays plain Python
(no Flower import here) and is tested without a message.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fed.atomic import write_atomic
from fed.config import DPConfig, RunConfig
from fed.privacy.ledger import DpSgdEvent, Ledger, NodePin, SplitPin, events_from_json
from fed.privacy.planner import RoundPlan, history_pin, new_ledger, plan_round
from fed.privacy.policy import OPT_OUT, STRICT, Policy
from fed.privacy.release import public_metrics

log = logging.getLogger("flwr")  # Flower's logger by name (no import): what the SuperNode's operator sees
KNOWN_EVENTS = "known-events"
"""Config key under which the server returns the DP events it holds for the receiving client."""
KNOWN_PIN = "known-pin"
"""Config key under which the server returns the pin it holds for the receiving client (``NodePin`` JSON)."""
BIND = "bind"
"""Config key the server sets on a train message to a node it has not bound to a partition id: the reply then
carries the node's continuity token (its only trip over the wire while the node stays bound)."""
NODE_RECORD = "node"
"""The reply's config record: the node's ``pin`` (under DP) and, when the server asks, its ``continuity-token``."""
TOKEN_BYTES = 32
STATE_DIR_ENV = "FEDLORA_STATE_DIR"
"""Where simulated clients keep their state (a simulation gives no per-node config): set by ``fed simulate``."""

POLICY_ENV = "FEDLORA_POLICY"
"""``run-config`` where the run config is also the node's policy: set by ``fed simulate`` for its workers."""
NOT_CONFIRMED = (
    "this node has no privacy state (no ledger file, no history from the server): its operator must "
    "confirm a fresh start (node config fresh-start=true) before it spends budget"
)

Metrics = dict[str, int | float]


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    return str(node_config.get(key, "false")).lower() == "true"


def requires_secure_aggregation(node_config: Mapping[str, Any]) -> bool:
    """Whether the node's operator set ``require-secure-aggregation``: it trains only for a round that runs through
    SecAgg+, so a server cannot switch secure aggregation off to read this node's update."""
    return _flag(node_config, "require-secure-aggregation")


def node_policy(node_config: Mapping[str, Any], dp: DPConfig) -> Policy:
    """The node's own policy: ``STRICT`` unless its operator opted out of DP (``dp-opt-out=true``, logged)
    or this is a simulation (the run config is the policy), then its ``policy-file``, then its keys."""
    if os.environ.get(POLICY_ENV) == "run-config":
        base = Policy.of_run(dp)
    elif _flag(node_config, "dp-opt-out"):
        log.warning("dp-opt-out=true: this node accepts rounds without DP and any DP settings the server asks for")
        base = OPT_OUT
    else:
        base = STRICT
    if node_config.get("policy-file"):
        base = Policy.from_file(str(node_config["policy-file"]), base)
    return Policy.from_node_config(node_config, base)


@dataclass
class NodeState:
    """What a node keeps between messages: its ledger file (events, DP pin, split pin) and its policy."""

    path: Path
    ledger: Ledger
    policy: Policy
    confirmed: bool
    """Whether the node may spend budget: it has a ledger file or history from the server, its operator
    confirmed a fresh start, or this is a simulation (whose state directory is new with every run)."""

    @classmethod
    def load(
        cls,
        cfg: RunConfig,
        node_config: Mapping[str, Any],
        partition_id: int,
        server_events: str = "",
        server_pin: str = "",
    ) -> NodeState:
        """The node's state for a message of ``cfg``, the server's copy of its events and pin merged in. Raises
        RuntimeError when the ledger file is unreadable, PolicyError when the node's policy is."""
        path = state_dir(node_config) / f"ledger-{partition_id}.json"
        existed = path.is_file()
        ledger = load_ledger(path, new_ledger(cfg.dp), server_events)
        restore_pin(ledger, server_pin)
        confirmed = (
            existed
            or bool(ledger.events)
            or _flag(node_config, "fresh-start")
            or os.environ.get(POLICY_ENV) == "run-config"
        )
        return cls(path, ledger, node_policy(node_config, cfg.dp), confirmed)

    def dp_bound(self, dp: DPConfig) -> bool:
        """Whether this message is held to DP: the server asks for it, the policy requires it, or the node
        already spent budget or pinned DP settings."""
        return dp.example_level or self.policy.dp_required or bool(self.ledger.events) or self.ledger.policy is not None

    @property
    def effective(self) -> Policy:
        """The node's policy tightened by its ledger's pin."""
        return self.policy.strictest(history_pin(self.ledger))

    def split(self, cfg: RunConfig, labels: tuple[str, ...] | None) -> SplitPin | None:
        """The node's pinned data split (None: not DP-bound and never pinned, the config's split applies).

        Created at first contact with a secret seed and written at once (when the node may keep state), so
        every later message, whatever seed or fractions it carries, reads the same train and held-out rows.
        ``labels`` are the run's class names as this message states them (pinned with the split).
        """
        if self.ledger.split is None and self.dp_bound(cfg.dp):
            d = cfg.data
            if self.ledger.events:  # history without a split: the rows trained on before are not known
                _no_evaluation(self.ledger)
            self.ledger.split = SplitPin.first(d.test_fraction, cfg.seed, d.max_examples, labels)
            if self.confirmed:
                write_atomic(self.path, self.ledger.to_json())
        return self.ledger.split

    def evaluation_refusal(self, dp: DPConfig, held_out: int) -> str:
        """Why this node must not answer an evaluate message (empty: it may, on all its held-out rows)."""
        if not self.dp_bound(dp):
            return ""
        if not self.effective.evaluate:
            return "this node's policy releases no evaluation scores under DP (node config evaluate=false)"
        if not self.confirmed:
            return NOT_CONFIRMED
        if held_out < self.effective.min_eval_rows:
            return f"fewer held-out rows than this node's minimum for evaluation ({self.effective.min_eval_rows})"
        return ""

    def hold_reply(self, dp: DPConfig, requested_at: float) -> None:
        """Under DP, release the reply on the node's grid of ``reply-delay`` = D seconds: hold it until the first
        multiple of D after the request was created (Flower's ``created_at``) that the round's work allows, so
        the reply's ``created_at`` and ``ttl`` show only ceil(processing / D), never the processing time."""
        grid = self.policy.reply_delay  # the operator's current setting: never pinned, never the server's
        if not (grid > 0 and self.dp_bound(dp)):
            return
        elapsed = time.time() - requested_at
        time.sleep(max(1, math.ceil(elapsed / grid)) * grid - elapsed)

    def reply_record(self, request: Mapping[str, Any]) -> dict[str, str]:
        """What a train reply tells the server about the node itself: its pin, less the secret seed (under DP,
        so the server's copy restores it), and its continuity token when the server asks to bind (``BIND``)."""
        record = {}
        if self.ledger.policy is not None:  # pinned by a DP round
            split = self.ledger.split.public() if self.ledger.split else None
            record["pin"] = NodePin(self.ledger.policy, split, self.policy.reply_delay).to_json()
        if request.get(BIND) is True:  # DP or not: any node may restart under a new node id
            record["continuity-token"] = self.continuity_token()
        return record

    def continuity_token(self) -> str:
        """The node's random continuity token (hex), created once beside its ledger (owner-only): the server
        keeps its hash and lets a partition id move to a new node id only for the node that holds it."""
        path = self.path.with_name(self.path.name.replace("ledger-", "continuity-", 1).removesuffix(".json"))
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_bytes(TOKEN_BYTES).hex())
        return path.read_text().strip()


def restore_pin(ledger: Ledger, server_pin: str) -> None:
    """Merge the server's copy of this node's pin into ``ledger``: the strictest of both (a copy can only
    tighten), and, when the node lost its split, the split's data settings with a fresh secret and evaluation
    off for good (the node no longer knows which rows it trained on). A malformed copy is ignored and logged."""
    if not server_pin:
        return
    try:
        pin = NodePin.from_json(server_pin)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the server's malformed copy of this node's pin: %s", err)
        return
    ledger.policy = pin.policy if ledger.policy is None else ledger.policy.strictest(pin.policy)
    if ledger.split is None and pin.split is not None:
        ledger.split = SplitPin.redrawn(pin.split)
        _no_evaluation(ledger)


def _no_evaluation(ledger: Ledger) -> None:
    """Pin evaluation off: a node whose held-out draw is new may score rows it trained on under its old one."""
    ledger.policy = replace(history_pin(ledger), evaluate=False)


def state_dir(node_config: Mapping[str, Any]) -> Path:
    """This node's state directory: chosen by whoever runs the node, never by the server."""
    explicit = node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(str(explicit))
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "fedlora"


def load_ledger(path: Path, fresh: Ledger, server_events: str) -> Ledger:
    """The client's ledger file (else ``fresh``), with the server's copy of its events merged in.

    A file that exists but cannot be read raises: starting from zero would spend the budget again.
    """
    ledger = fresh
    if path.is_file():
        try:
            ledger = Ledger.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(
                f"privacy ledger {path} is unreadable ({err}); refusing to train rather than "
                "start a fresh budget. Repair or restore the file."
            ) from err
    if server_events:
        try:
            ledger.merge(events_from_json(server_events))
        except (ValueError, KeyError, TypeError) as err:  # only ever adds events: ignoring it is safe
            log.warning("ignoring the server's malformed copy of this client's events: %s", err)
    return ledger


@dataclass(frozen=True)
class PrivateRound:
    """One round's privacy decisions, taken (and booked on disk) before any training step."""

    plan: RoundPlan
    """What this round may do: ``plan.dp`` and ``plan.steps`` go to ``train_round``."""
    ledger: Ledger
    dp: bool
    """Whether replies are filtered to ``PUBLIC_UNDER_DP``: DP is on, or this client ever spent budget."""

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        node_config: Mapping[str, Any],
        *,
        partition_id: int,
        round_: int,
        run: int,
        num_examples: int,
        server_events: str = "",
    ) -> PrivateRound:
        """``start`` on the node's state as ``NodeState.load`` reads it."""
        state = NodeState.load(cfg, node_config, partition_id, server_events)
        return cls.start(state, cfg, round_=round_, run=run, num_examples=num_examples)

    @classmethod
    def start(cls, state: NodeState, cfg: RunConfig, *, round_: int, run: int, num_examples: int) -> PrivateRound:
        """Plan the round under the node's own policy, and book it (a node whose fresh start its operator
        has not confirmed refuses DP work)."""
        ledger = state.ledger
        if cfg.dp.example_level and not state.confirmed:
            return cls(RoundPlan(None, 0, refused=NOT_CONFIRMED), ledger, dp=True)
        plan = plan_round(
            cfg.dp,
            ledger,
            num_examples=num_examples,
            batch_size=cfg.train.batch_size,
            local_steps=cfg.train.local_steps,
            rounds=cfg.federation.rounds,
            round_=round_,
            policy=state.policy,
            run=run,
        )
        private = cls(plan, ledger, dp=state.dp_bound(cfg.dp))
        private._book(state.path, round_, run)
        return private

    def _book(self, path: Path, round_: int, run: int) -> None:
        """Record this round's event and write the ledger before the first noisy step: a crash can only
        over-count. Written once per DP round (the pin, merged events, the event) even if it trains nothing."""
        if self.plan.dp is not None and self.plan.steps > 0:
            self.ledger.record(
                DpSgdEvent(round_, self.plan.dp.noise_multiplier, self.plan.dp.sample_rate, self.plan.steps, run)
            )
        if self.dp:
            write_atomic(path, self.ledger.to_json())

    def verdict(self) -> Metrics | None:
        """The flag (``refused`` by the node's policy, its reason in ``plan.refused``, or ``declined``: no
        budget left) and the epsilon spent, for a round that must not train; None when it trains."""
        if self.plan.refused:
            return {"refused": 1, "epsilon": self.ledger.epsilon()}
        if self.plan.steps == 0:
            return {"declined": 1, "epsilon": self.ledger.epsilon()}
        return None

    def trained(self, private: Metrics, released_loss: float | None) -> Metrics:
        """What a trained round reports: its ``private`` statistics (loss, timing, usage) outside DP-SGD;
        under DP-SGD the event, the epsilon it composes to and the privatised loss, if any, instead."""
        if self.plan.dp is None:
            return dict(private)
        metrics: Metrics = {
            "epsilon": self.ledger.epsilon(),
            "dp-noise-multiplier": self.plan.dp.noise_multiplier,
            "dp-sample-rate": self.plan.dp.sample_rate,
            "dp-steps": self.plan.steps,
            "secure-rng": 1,
        }  # noise and sampling came from fed.privacy.secure_rng
        if released_loss is not None:  # privatised and inside the accounted mechanism
            metrics["dp-train-loss"] = released_loss
        return metrics

    def release(self, metrics: Mapping[str, int | float]) -> Metrics:
        """The reply's metrics that may leave the node (only the public allowlist under DP)."""
        return public_metrics(metrics, self.dp)
