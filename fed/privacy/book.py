"""The server's copy of every client's ledger, rebuilt from the DP events clients report each round.

Events are hyper-parameters (noise, sample rate, steps), not data, so the server can recompose them
with its own accountant and cross-check each client's own epsilon. The book is conservative: each
client's epsilon in ``privacy.json`` is the larger of the server's recomputation and the client's own
report, and every disagreement or gap is flagged. The book also hands each client's events back to it
with the next round's message, so a client that lost its ledger file cannot spend its budget again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

from fed.config import Accountant, DPConfig
from fed.privacy import secure_rng
from fed.privacy.client_level import ClientAccount
from fed.privacy.ledger import DpSgdEvent, Ledger, NodePin, epsilon, event_problems
from fed.privacy.planner import new_ledger
from fed.privacy.release import GUARANTEE, NOT_COVERED, RELEASED_IN_CLEAR, timing

log = logging.getLogger(__name__)
TOLERANCE = 1e-6
"""Relative difference between the client's and the server's epsilon that counts as a mismatch."""


def _event(round_: int, run: int, metrics: Mapping[str, Any]) -> tuple[int, DpSgdEvent, float]:
    """Client id, DP event and self-reported epsilon of a reply, or ValueError naming the bad field."""
    cid, steps = metrics["partition-id"], metrics["dp-steps"]
    sigma, rate, eps = (float(metrics[k]) for k in ("dp-noise-multiplier", "dp-sample-rate", "epsilon"))
    if not (isinstance(cid, int) and cid >= 0 and isinstance(steps, int) and steps >= 0):
        raise ValueError(f"partition-id={cid!r} and dp-steps={steps!r} must be non-negative integers")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon={eps} must be finite and >= 0")
    event = DpSgdEvent(round_, sigma, rate, steps, run)
    if problems := event_problems(event):
        raise ValueError(f"DP event out of bounds: {problems[0]}")
    return cid, event, eps


@dataclass
class LedgerBook:
    dp: DPConfig
    ledgers: dict[int, Ledger] = field(default_factory=dict)
    reported_epsilon: dict[int, float] = field(default_factory=dict)
    secure_rng: dict[int, bool] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    """Each client's n (public under the zero-out adjacency the guarantee is stated for)."""
    flags: list[str] = field(default_factory=list)
    pins: dict[int, str] = field(default_factory=dict)
    """Each client's pin (``NodePin`` JSON, checked), returned with its events so a node that lost its state
    dir restores its whole pin."""
    tokens: dict[int, str] = field(default_factory=dict)
    """SHA-256 of each client's continuity token: its partition id moves to a new node id only with the token."""
    client: ClientAccount | None = None
    """The client-level guarantee's account (dp.level client or both): the server's own mechanism."""
    _memo: dict[tuple[int, str], tuple[int, float]] = field(default_factory=dict, repr=False, compare=False)
    """(client, accountant) -> (events seen, epsilon): a client's figure is recomputed only when it has new
    events (they only ever grow), so a write with 1,000 clients re-accounts just the round's participants."""

    def observe(self, round_: int, metrics: Mapping[str, Any], run: int = 0) -> int | None:
        """Record the DP event in one client's reply (a reply without DP metrics spent nothing).

        Called once the reply passed validation, under the client id bound to the node that sent it
        (``strategies.privacy``). The values come from the network, so they are bounded again before they
        enter a ledger (``event_problems``: nothing reaches an accountant that it cannot compose); a
        malformed event is flagged and left out rather than allowed to stop the run. Each booked reply is
        one event: a replayed identical event counts again. Returns the client id the reply names.
        """
        cid = metrics.get("partition-id")
        cid = cid if isinstance(cid, int) and cid >= 0 else None
        if "dp-steps" not in metrics:
            return cid
        try:
            cid, event, reported = _event(round_, run, metrics)
        except (KeyError, TypeError, ValueError) as err:
            self.flag(f"round {round_}: malformed DP event ignored: {err}")
            return cid
        self.ledgers.setdefault(cid, new_ledger(self.dp)).record(event)
        self.reported_epsilon[cid] = reported
        self.secure_rng[cid] = metrics.get("secure-rng") == 1
        if isinstance(metrics.get("num-examples"), int):
            self.examples[cid] = metrics["num-examples"]
        return cid

    def claim(self, cid: int, value: Any) -> None:
        """A client's own statement of its epsilon (a declined round's reply), if it is a number."""
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            self.reported_epsilon[cid] = float(value)

    def keep_pin(self, cid: int, text: str) -> None:
        """The pin a client's accepted reply stated (a node's pin only tightens, so the latest is kept); a
        malformed one is flagged and left out."""
        try:
            self.pins[cid] = NodePin.from_json(text).to_json()
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            self.flag(f"client {cid}: malformed pin ignored: {err}")

    def keep_token(self, cid: int, token: str) -> None:
        """Bind the client's continuity token (its first one: a bound id's token never changes)."""
        self.tokens.setdefault(cid, _digest(token))

    def token_matches(self, cid: int, token: str) -> bool:
        """Whether ``token`` is the one the client bound with (False when it bound with none)."""
        kept = self.tokens.get(cid)
        return kept is not None and bool(token) and hmac.compare_digest(kept, _digest(token))

    def flag(self, text: str) -> None:
        log.warning("privacy: %s", text)
        self.flags.append(text)

    def events(self, cid: int) -> list[DpSgdEvent]:
        """What the server knows this client spent: sent back to it with every train message."""
        return list(self.ledgers[cid].events) if cid in self.ledgers else []

    def server_epsilon(self, cid: int, accountant: str | None = None) -> float:
        accountant = accountant or self.dp.accountant
        events = self.ledgers[cid].events if cid in self.ledgers else []
        seen, value = self._memo.get((cid, accountant), (-1, 0.0))
        if seen != len(events):
            value = epsilon(events, self.dp.delta, accountant)
            self._memo[(cid, accountant)] = (len(events), value)
        return value

    def epsilon(self, cid: int) -> float:
        """The conservative figure: the larger of the server's recomputation and the client's report."""
        return max(self.server_epsilon(cid), self.reported_epsilon.get(cid, 0.0))

    def max_epsilon(self) -> float:
        return max((self.epsilon(cid) for cid in self.ledgers.keys() | self.reported_epsilon.keys()), default=0.0)

    def cross_epsilon(self, cid: int, accountant: str) -> float | None:
        """The other accountant's figure for the report; None (and a flag) when it cannot be computed."""
        try:
            return self.server_epsilon(cid, accountant)
        except (MemoryError, ValueError, OverflowError, RuntimeError) as err:
            self.flag(f"client {cid}: the {accountant} cross-check failed ({type(err).__name__}: {err})")
            return None

    def client_flags(self, cid: int) -> list[str]:
        """Disagreements between the client's report and the server's events, in words."""
        server, reported = self.server_epsilon(cid), self.reported_epsilon.get(cid)
        if reported is None or abs(reported - server) <= TOLERANCE * max(1.0, server):
            return []
        if reported > server:
            return [
                f"client reports epsilon {reported:.4g} > {server:.4g} from the events the server saw "
                "(events the server never received: an earlier run on the same data, or a lost reply); "
                "the larger figure is reported"
            ]
        return [
            f"client reports epsilon {reported:.4g} < {server:.4g} recomputed from its own events: "
            "it under-reports; the server's figure is reported"
        ]

    def report(self, cross_check: bool = False) -> dict[str, Any]:
        """``privacy.json``: per client the conservative epsilon, the parameters behind it, and flags.

        Mid-run only the run's accountant is kept current (``epsilon_rdp`` / ``epsilon_prv`` of the other is
        None): PRV costs about a second per client and history. ``cross_check`` fills both, as the end of
        a run and ``fed report`` do.
        """
        clients = {}
        for cid in sorted(self.ledgers.keys() | self.reported_epsilon.keys()):
            ledger = self.ledgers.get(cid, new_ledger(self.dp))
            entry = ledger.to_dict(epsilon=self.server_epsilon(cid))
            entry.pop("policy", None)  # the client's pin lives in its own ledger, not in the server's copy
            entry.pop("split", None)
            entry.pop("run", None)
            entry.update(
                {
                    "epsilon": self.epsilon(cid),
                    "server_epsilon": self.server_epsilon(cid),
                    "client_reported_epsilon": self.reported_epsilon.get(cid),
                    **{
                        f"epsilon_{acc}": (
                            self.server_epsilon(cid, acc)
                            if acc == self.dp.accountant
                            else (self.cross_epsilon(cid, acc) if cross_check else None)
                        )
                        for acc in get_args(Accountant)
                    },
                    "remaining": (
                        max(0.0, self.dp.target_epsilon - self.epsilon(cid)) if self.dp.target_epsilon > 0 else None
                    ),
                    "sample_rate": entry["events"][-1]["sample_rate"] if entry["events"] else None,
                    "noise_multiplier": entry["events"][-1]["noise_multiplier"] if entry["events"] else None,
                    "num_examples": self.examples.get(cid),
                    "secure_rng": self.secure_rng.get(cid),
                    "pin": json.loads(self.pins[cid]) if cid in self.pins else None,
                    "flags": self.client_flags(cid),
                }
            )
            clients[str(cid)] = entry
        example = self.dp.example_level
        return {
            "enabled": example,
            "level": self.dp.level if self.dp.enabled else None,
            "unit": "example" if example else None,
            "adjacency": "replace one training example of one client by a null example (zero-out)" if example else None,
            "trust": "nobody but each client: it clips and noises its own gradients" if example else None,
            "guarantee": GUARANTEE if example else "none (example-level DP off)",
            "released_in_clear": RELEASED_IN_CLEAR if example else [],
            "not_covered": NOT_COVERED if example else [],
            "accountant": self.dp.accountant,
            "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "max_grad_norm": self.dp.max_grad_norm,
            "rng": secure_rng.SOURCES[self.dp.noise_source] if example else None,
            "timing": timing({cid: json.loads(pin)["reply_delay"] for cid, pin in self.pins.items()})
            if self.dp.enabled
            else None,
            "max_epsilon": self.max_epsilon(),
            "flags": list(self.flags),
            "clients": clients,
            "client_level": None if self.client is None else self.client.report(cross_check),
        }

    def to_json(self) -> str:
        """The book's whole state (for a checkpoint); ``from_json`` restores it."""
        return json.dumps(
            {
                "dp": asdict(self.dp),
                "ledgers": {str(c): led.to_dict(epsilon=self.server_epsilon(c)) for c, led in self.ledgers.items()},
                "reported_epsilon": {str(c): e for c, e in self.reported_epsilon.items()},
                "secure_rng": {str(c): s for c, s in self.secure_rng.items()},
                "examples": {str(c): n for c, n in self.examples.items()},
                "flags": self.flags,
                "pins": {str(c): p for c, p in self.pins.items()},
                "tokens": {str(c): t for c, t in self.tokens.items()},
                "client": None if self.client is None else self.client.to_dict(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> LedgerBook:
        data = json.loads(text)
        return cls(
            DPConfig(**data["dp"]),
            ledgers={int(c): Ledger.from_dict(d) for c, d in data["ledgers"].items()},
            reported_epsilon={int(c): float(e) for c, e in data["reported_epsilon"].items()},
            secure_rng={int(c): bool(s) for c, s in data["secure_rng"].items()},
            examples={int(c): int(n) for c, n in data["examples"].items()},
            flags=list(data["flags"]),
            pins={int(c): str(p) for c, p in data.get("pins", {}).items()},
            tokens={int(c): str(t) for c, t in data.get("tokens", {}).items()},
            client=ClientAccount.from_dict(data["client"]) if data.get("client") else None,
        )


def _digest(token: str) -> str:
    """What the server keeps of a continuity token: its SHA-256 (the token itself stays on its node's disk)."""
    return hashlib.sha256(token.encode()).hexdigest()
