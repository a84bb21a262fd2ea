"""A client's own privacy policy: the floor under any DP settings a server asks for.

The server's message carries the run's DP settings, but a client that simply obeyed them would let a
curious server switch DP off for a round, or ask for delta = 0.1 or a huge target in round 1. So each
node states its floor in its own node config (``dp-required``, ``max-epsilon``, ``delta``,
``min-noise-multiplier``, ``max-grad-norm``), the first DP round pins the run's settings on top of it
(in the ledger, so a restart keeps the pin), and every later round is refused when it asks for less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fed.config import DPConfig

NODE_KEYS = {
    "dp-required": "dp_required",
    "max-epsilon": "max_epsilon",
    "delta": "delta",
    "min-noise-multiplier": "min_noise_multiplier",
    "max-grad-norm": "max_grad_norm",
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

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Policy:
        """The policy keys of a node config (others are ignored); bad values raise PolicyError."""
        values: dict[str, Any] = {}
        for key, name in NODE_KEYS.items():
            if key not in node_config:
                continue
            raw = node_config[key]
            if name == "dp_required":
                if not isinstance(raw, bool) and str(raw).lower() not in ("true", "false"):
                    raise PolicyError(f"node config {key}={raw!r}: expected true or false")
                values[name] = raw if isinstance(raw, bool) else str(raw).lower() == "true"
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise PolicyError(f"node config {key}={raw!r}: expected a positive number") from None
            if not value > 0:
                raise PolicyError(f"node config {key}={raw!r}: expected a positive number")
            values[name] = value
        return cls(**values)

    def strictest(self, other: Policy) -> Policy:
        """The policy that accepts only what both accept."""
        return Policy(
            dp_required=self.dp_required or other.dp_required,
            max_epsilon=min(self.max_epsilon, other.max_epsilon),
            delta=min(self.delta, other.delta),
            min_noise_multiplier=max(self.min_noise_multiplier, other.min_noise_multiplier),
            max_grad_norm=min(self.max_grad_norm, other.max_grad_norm),
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
        )
        return self.strictest(run)

    def violations(self, dp: DPConfig) -> list[str]:
        """Why the server's DP settings are weaker than this policy (empty when they are acceptable)."""
        if not dp.enabled:
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
        defaults = cls()
        return cls(
            **{
                k: (getattr(defaults, k) if data.get(k) is None else type(getattr(defaults, k))(data[k]))
                for k in NODE_KEYS.values()
            }
        )
