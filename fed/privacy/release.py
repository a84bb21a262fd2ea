"""What a client may release, and the guarantee that covers it.

Under DP the guarantee covers the noised adapter update and nothing else a client computes from its
training data. So a DP reply carries the update plus an allowlist of fields that are public by
construction: hyper-parameters of the mechanism, the epsilon they compose to, the frozen-factor
fingerprint (a function of the run seed), and n, the number of training examples, which the
guarantee declares public (zero-out adjacency, below). A raw training loss (measured: it alone told
a canary's presence apart at 50% TPR / 0% FPR) or a wall-clock time (a side channel on the Poisson
batch sizes) never leaves a DP client; a training loss leaves it only privatised (``dp-train-loss``).
Adapter families add no field here: RoseLoRA's masks ride in the arrays and are computed from the
released parameters, and Dynamic LoRA's layer importance is computed by the server from aggregates
(docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

PUBLIC_UNDER_DP = frozenset(
    {
        "partition-id",  # which client this is (the node's own configuration)
        "round",  # which round the reply answers (the server chose it)
        "fingerprint",  # hash of the frozen factors, derived from the run seed
        "num-examples",  # n: public under zero-out adjacency
        "declined",  # the budget guard's decision: a function of the ledger's public events
        "refused",  # the client's policy refused the server's settings: a function of public settings
        "epsilon",  # composed from the public events
        "steps",
        "dp-steps",
        "dp-noise-multiplier",
        "dp-sample-rate",  # the DP event itself
        "secure-rng",  # 1 when the mechanism's randomness came from the OS CSPRNG
        "rank",  # the client's LoRA rank: the run config's, or the node operator's own setting (max-rank)
        "dp-train-loss",  # the noised, clipped loss (dp.loss_noise_multiplier > 0), accounted with the gradient
    }
)

GUARANTEE = (
    "(epsilon, delta)-differential privacy for each client's training examples, separately per client. "
    "Unit: one training example of one client. Adjacency: zero-out with n public: two datasets of a client "
    "are neighbours when they have the same size n and differ in one example, which in one of them is "
    "replaced by a null example that contributes nothing to any gradient (this is the adjacency under "
    "which the Poisson-subsampled Gaussian mechanism has exactly the add/remove-one privacy curve, so the "
    "accountant's numbers hold while n itself is released). Mechanism: DP-SGD with Poisson sampling at "
    "rate batch/n, per-example clipping of every trained adapter tensor (and task head) jointly to "
    "max_grad_norm (with dp.head_clip_share > 0, each tensor to its own bound, the squares of the bounds "
    "summing to max_grad_norm^2, so the joint norm is still at most max_grad_norm), Gaussian noise of std "
    "noise_multiplier * max_grad_norm, all randomness from the OS "
    "CSPRNG. Composition over every DP event of the client (all rounds and all runs recorded in its "
    "ledger) with the named accountant, at the stated delta. Everything the server receives from a DP "
    "client is an output of that accounted mechanism (the noised update and, with dp.loss_noise_multiplier > 0, "
    "the noised mean of losses clipped to [0, dp.loss_clip]; post-processing) or a field listed as released in "
    "the clear."
)

TIMING = (
    "the reply's timing: Flower's created_at and ttl, and when it arrives. Under DP a node with reply-delay D > 0 "
    "(a deployed node's default: 30 s) releases each reply, error replies included, at the first multiple of D "
    "after the request's created_at that its work allows: created_at(reply) - created_at(request) = "
    "ceil(processing / D) * D (at least D), so only ceil(processing / D) is visible. A node whose operator set "
    "reply-delay 0 (and every simulated node) shows its processing time"
)

RELEASED_IN_CLEAR = [
    "n, the number of training examples of each client (public under the zero-out adjacency)",
    "the DP event fields: noise multiplier, sample rate (= batch / n), steps; and the epsilon they compose to",
    "the frozen-factor fingerprint (a hash of tensors derived from the public run seed)",
    "declined/refused flags and a refusal's reason (the client's own policy limits against the server's settings; "
    "no data)",
    "the round the reply answers, and the client's statement that its randomness came from the OS CSPRNG",
    "the client's LoRA rank (federation.client_ranks: from the run config or the node's own max-rank setting)",
    "evaluation: a DP node answers evaluate messages only where its own policy allows it (evaluate=true; "
    "the strict default refuses them), then with loss, accuracy and count over all of its pinned held-out "
    "rows, never trained on and never a subset the server picks: NOT covered by the guarantee",
    "a refusal's reason, or one generic error text for any data problem (details stay in the node's log)",
    "the node's pin less its secret seed (its policy limits, whether it evaluates, the data settings of its first "
    "contact, its reply-delay) and, when the server binds it, a random continuity token: settings and randomness, "
    "no data",
    TIMING,
]

NOT_COVERED = [
    "the held-out evaluation split of a node that allows evaluation: its metrics are released as they are",
    "which clients take part in a round, and when (participation is public)",
    "group privacy: a user with k examples is protected at roughly k times epsilon",
]


def timing(reply_delays: Mapping[int, float]) -> str:
    """What the reply timing of this run's DP clients shows, for privacy.json: ``TIMING``, and the clients that
    declared no grid (reply-delay 0, their operator's explicit choice) by name."""
    visible = sorted(cid for cid, delay in reply_delays.items() if delay <= 0)
    grids = sorted({delay for delay in reply_delays.values() if delay > 0})
    parts = [TIMING]
    if grids:
        parts.append(f"grids declared: {', '.join(f'{d:g} s' for d in grids)}")
    if visible:
        parts.append(f"clients with reply-delay 0, whose processing time is visible: {visible}")
    return "; ".join(parts)


def public_metrics(metrics: Mapping[str, Any], dp: bool) -> dict[str, Any]:
    """The fields of a reply that may travel: all of them without DP, only ``PUBLIC_UNDER_DP`` with it.

    The client applies it before sending; the server applies it again on arrival (and logs what it
    had to drop), so a non-public field never reaches a log, an aggregate or metrics.jsonl.
    """
    if not dp:
        return dict(metrics)
    dropped = sorted(set(metrics) - PUBLIC_UNDER_DP)
    if dropped:
        log.warning("dropping non-public fields of a DP reply: %s", dropped)
    return {k: v for k, v in metrics.items() if k in PUBLIC_UNDER_DP}
