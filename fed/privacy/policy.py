"""A client's own privacy policy: the floor under any DP settings a server asks for.

The server's message carries the run's DP settings, but a client that simply obeyed them would let a
curious server switch DP off for a round, or ask for delta = 0.1 or a huge target in round 1. So each
node states its floor in its own node config (``dp-required``, ``max-epsilon``, ``delta``,
``min-noise-multiplier``, ``max-grad-norm``, ``evaluate``, ``min-eval-rows``, ``reply-delay``, or a
``policy-file`` holding them), the first DP round pins the run's settings on top of it (in the ledger,
so a restart keeps the pin), and every later round is refused when it asks for less.

A deployed node given no policy runs under ``STRICT``; only an explicit ``dp-opt-out=true`` (logged by
the client) gives it the permissive ``Policy()``. In a simulation the run config is both the server's
request and the node's policy (``Policy.of_run``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from fed.config import DPConfig

NODE_KEYS = {
    "dp-required": "dp_required",
    "max-epsilon": "max_epsilon",
    "delta": "delta",
    "min-noise-multiplier": "min_noise_multiplier",
    "max-grad-norm": "max_grad_norm",
    "evaluate": "evaluate",
    "min-eval-rows": "min_eval_rows",
    "reply-delay": "reply_delay",
}


class PolicyError(ValueError):
    """A node config whose policy keys cannot be used; the message names the key and what is accepted."""


@dataclass(frozen=True)
class Policy:
    """The weakest DP settings this client accepts; the defaults accept anything (no floor)."""

    dp_required: bool = False
    max_epsilon: float = math.inf
    delta: float = 1.0
    """Largest delta accepted (planning further caps it at 1 / (10 n))."""
    min_noise_multiplier: float = 0.0
    max_grad_norm: float = math.inf
    evaluate: bool = True
    """Whether a DP-bound node answers evaluate messages at all (their scores are not covered by DP)."""
    min_eval_rows: int = 20
    """Fewest held-out rows a DP-bound node scores: below it the node refuses to evaluate."""
    reply_delay: float = 0.0
    """The grid D (seconds) on which a DP reply leaves: at the first multiple of D after the request's creation
    that the round's work allows (0: at once). The operator's own setting, never pinned: it hides processing time."""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], base: Policy | None = None) -> Policy:
        """The policy keys of a node config (others are ignored) over ``base`` (default: no floor);
        bad values raise PolicyError."""
        values: dict[str, Any] = {}
        for key, name in NODE_KEYS.items():
            if key in node_config:
                values[name] = _parse(key, node_config[key], type(getattr(cls(), name)))
        return replace(base or cls(), **values)

    @classmethod
    def from_file(cls, path: str, base: Policy) -> Policy:
        """A TOML policy file (the node config's keys, e.g. ``max-epsilon = 4``) over ``base``."""
        try:
            data = tomllib.loads(Path(path).expanduser().read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise PolicyError(f"policy-file={path!r} cannot be read as TOML: {err}") from None
        unknown = sorted(set(data) - set(NODE_KEYS))
        if unknown:
            raise PolicyError(f"policy-file={path!r}: unknown key(s) {unknown}; accepted: {sorted(NODE_KEYS)}")
        return cls.from_node_config(data, base)

    @classmethod
    def of_run(cls, dp: DPConfig) -> Policy:
        """A simulation's node: the run config is both the request and the policy (its operator holds every
        row and the server), so it accepts exactly what the config asks and evaluates."""
        return cls(dp_required=dp.example_level, min_eval_rows=0)

    def strictest(self, other: Policy) -> Policy:
        """The policy that accepts only what both accept."""
        return Policy(
            dp_required=self.dp_required or other.dp_required,
            max_epsilon=min(self.max_epsilon, other.max_epsilon),
            delta=min(self.delta, other.delta),
            min_noise_multiplier=max(self.min_noise_multiplier, other.min_noise_multiplier),
            max_grad_norm=min(self.max_grad_norm, other.max_grad_norm),
            evaluate=self.evaluate and other.evaluate,
            min_eval_rows=max(self.min_eval_rows, other.min_eval_rows),
            reply_delay=max(self.reply_delay, other.reply_delay),
        )

    def pinned_by(self, dp: DPConfig) -> Policy:
        """What the first DP round fixes for every later round: DP stays on, and no later round may ask
        for a larger target, a larger delta, less (fixed) noise or a larger clipping bound."""
        run = Policy(
            dp_required=True,
            max_epsilon=dp.target_epsilon if dp.target_epsilon > 0 else math.inf,
            delta=dp.delta,
            min_noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            min_eval_rows=0,
        )
        return replace(self.strictest(run), reply_delay=0.0)

    def violations(self, dp: DPConfig) -> list[str]:
        """Why the server's DP settings are weaker than this policy (empty when they are acceptable)."""
        if not dp.example_level:
            return ["the server asks for a round without DP, but this client requires DP"] if self.dp_required else []
        problems = []
        if dp.delta > self.delta:
            problems.append(f"dp.delta={dp.delta:g} exceeds this client's limit {self.delta:g}")
        if dp.target_epsilon > self.max_epsilon:  # with a fixed noise multiplier the cap applies as the guard
            problems.append(f"dp.target_epsilon={dp.target_epsilon:g} exceeds this client's limit {self.max_epsilon:g}")
        if dp.target_epsilon == 0 and dp.noise_multiplier < self.min_noise_multiplier:
            problems.append(
                f"dp.noise_multiplier={dp.noise_multiplier:g} is below this client's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        if dp.max_grad_norm > self.max_grad_norm:
            problems.append(f"dp.max_grad_norm={dp.max_grad_norm:g} exceeds this client's limit {self.max_grad_norm:g}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an unlimited bound is written as null."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """A pin as ``to_dict`` wrote it (null: unlimited); a field an older file lacks takes ``STRICT``'s value."""

        def value(name: str) -> Any:
            if name not in data:
                return getattr(STRICT, name)
            return math.inf if data[name] is None else type(getattr(STRICT, name))(data[name])

        return cls(**{f.name: value(f.name) for f in fields(cls)})


REPLY_DELAY = 30.0
"""A deployed node's grid for DP replies when its operator sets none: a round's processing time shows only as
ceil(processing / 30 s), at most 30 s added to a round (which waits for its slowest node in any case)."""

STRICT = Policy(
    dp_required=True, max_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5, evaluate=False, reply_delay=REPLY_DELAY
)
"""A deployed node's policy when its operator gave none: DP required, epsilon at most 8, delta at most 1e-5,
fixed noise at least 0.5, no evaluation replies under DP, DP replies on a 30 s grid."""

OPT_OUT = Policy(reply_delay=REPLY_DELAY)
"""A deployed node whose operator opted out of DP (logged): no floor, but its DP replies still on the grid."""


def _parse(key: str, raw: Any, kind: type) -> Any:
    """One policy value of a node config or policy file, or PolicyError naming it and what is accepted."""
    if kind is bool:
        if not isinstance(raw, bool) and str(raw).lower() not in ("true", "false"):
            raise PolicyError(f"node config {key}={raw!r}: expected true or false")
        return raw if isinstance(raw, bool) else str(raw).lower() == "true"
    try:
        value = kind(float(raw)) if kind is int else float(raw)
    except (TypeError, ValueError, OverflowError):
        raise PolicyError(f"node config {key}={raw!r}: expected a {'whole ' if kind is int else ''}number") from None
    if value < 0 or (key not in ("min-eval-rows", "reply-delay") and not value > 0):
        raise PolicyError(f"node config {key}={raw!r}: expected a positive number")
    return value
