"""A client's privacy around one training round: ledger, policy, plan, booking, and what may be released.

The client owns its privacy: its policy comes from its own node config, never from the server; its
ledger is a file in its state directory (node config ``state-dir``, else ``$FEDLORA_STATE_DIR``, else
``~/.local/state/fedlora``), written atomically once per DP round, with that round's event, before
training; merged with the events the server returns, and never silently replaced: a ledger that cannot
be read stops the client.

The ClientApp opens a ``PrivateRound`` once it knows its data, trains ``plan.steps`` steps under
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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed.atomic import write_atomic
from fed.config import RunConfig
from fed.privacy.ledger import DpSgdEvent, Ledger, events_from_json
from fed.privacy.planner import RoundPlan, new_ledger, plan_round
from fed.privacy.policy import Policy
from fed.privacy.release import public_metrics

log = logging.getLogger("flwr")  # Flower's logger by name (no import): what the SuperNode's operator sees
KNOWN_EVENTS = "known-events"
"""Config key under which the server returns the DP events it holds for the receiving client."""
STATE_DIR_ENV = "FEDLORA_STATE_DIR"
"""Where simulated clients keep their state (a simulation gives no per-node config): set by ``fed simulate``."""

Metrics = dict[str, int | float]


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
        """Load and merge the ledger, plan the round under the node's own policy, and book it.

        Raises RuntimeError when the ledger file is unreadable, PolicyError when the node's policy is.
        """
        path = state_dir(node_config) / f"ledger-{partition_id}.json"
        ledger = load_ledger(path, new_ledger(cfg.dp), server_events)
        plan = plan_round(
            cfg.dp,
            ledger,
            num_examples=num_examples,
            batch_size=cfg.train.batch_size,
            local_steps=cfg.train.local_steps,
            rounds=cfg.federation.rounds,
            round_=round_,
            policy=Policy.from_node_config(node_config),
            run=run,
        )
        private = cls(plan, ledger, dp=cfg.dp.enabled or bool(ledger.events))
        private._book(path, round_, run)
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
