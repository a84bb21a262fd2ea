"""Heterogeneous client ranks (``federation.client_ranks``): which LoRA rank each client trains.

The global adapter always has ``adapter.rank`` components; a client of rank r_k runs and trains only the
first r_k of them (``Adapter.set_rank``: a mask, so every shape stays the same on the wire) and sends a
delta that is zero beyond r_k. Accepted forms:

- empty (the default): every client trains the full rank;
- one integer per client, indexed by partition id, each in [1, adapter.rank] (``[2, 4, 8, 8]``);
- ``linear``: a stand-in for compute tiers that grow with the partition id, client k of N trains
  ``ceil(adapter.rank · (k + 1) / N)`` (the last one the full rank);
- ``node``: each node's operator states its compute as the node config ``max-rank`` (a node without it
  trains the full rank); the server cannot know these in advance, so it checks only the bound and
  the zero padding of each reply.

Only families whose layers are LoRA layers with a rank axis take client ranks (``lora``, ``ffa-lora``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fed.adapters import registry

RULES = ("linear", "node")
NODE_KEY = "max-rank"
"""The node config key under which a node states the rank it can afford (rule ``node``)."""


def problems(spec: Sequence[str], num_clients: int, max_rank: int, kind: str) -> list[str]:
    """What is wrong with ``federation.client_ranks`` for this run (empty: nothing)."""
    if not spec:
        return []
    given = f"federation.client_ranks={list(spec)}"
    if kind not in registry.ranked_kinds():
        return [
            f"{given} needs adapter.kind in {', '.join(registry.ranked_kinds())} (a rank axis to mask); got {kind!r}"
        ]
    if len(spec) == 1 and spec[0] in RULES:
        return []
    if not all(s.strip().isdigit() for s in spec):
        return [f"{given}: give one integer rank per client, or one rule of: {', '.join(RULES)}"]
    ranks = [int(s) for s in spec]
    if len(ranks) != num_clients:
        return [f"{given} names {len(ranks)} ranks for federation.num_clients={num_clients}; give one per client"]
    bad = [r for r in ranks if not 1 <= r <= max_rank]
    if bad:
        return [f"{given}: ranks {bad} outside [1, adapter.rank={max_rank}] (the global adapter's rank is the maximum)"]
    return []


def planned_ranks(spec: Sequence[str], num_clients: int, max_rank: int) -> tuple[int, ...] | None:
    """Every client's rank by partition id, when the config decides them (None: full rank, or ``node``)."""
    if not spec or spec[0] == "node":
        return None
    if spec[0] == "linear":
        return tuple(math.ceil(max_rank * (k + 1) / num_clients) for k in range(num_clients))
    return tuple(int(s) for s in spec)


def client_rank(
    spec: Sequence[str], partition_id: int, num_clients: int, max_rank: int, node_config: Mapping[str, Any]
) -> int | None:
    """The rank this client trains (None: no client ranks in this run, the full rank, nothing to report)."""
    if not spec:
        return None
    if spec[0] == "node":
        stated = node_config.get(NODE_KEY)
        if stated is None:
            return max_rank
        if isinstance(stated, bool) or not isinstance(stated, int) or stated < 1:
            raise ValueError(f"node config {NODE_KEY}={stated!r} must be a positive integer")
        return min(stated, max_rank)
    ranks = planned_ranks(spec, num_clients, max_rank)
    assert ranks is not None
    if not 0 <= partition_id < len(ranks):
        raise ValueError(f"partition-id {partition_id} has no rank in federation.client_ranks ({len(ranks)} clients)")
    return ranks[partition_id]
