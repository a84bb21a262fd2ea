"""A red-team ClientApp: the real client, except that chosen partitions send hostile deltas.

Used by the attack test and ``bench/security/attack.py`` to show what the server's defaults (capped weights,
adaptive norm clipping) hold off: scaled updates (``scale`` > 1), sign flips (``scale`` < 0), or both.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import clients.app as honest
from fed.wire import TensorMeta, config_from_record, from_record, to_record


def hostile_client(scale: float, attackers: tuple[int, ...] = (0,), examples: int = 0) -> ClientApp:
    """The real ClientApp whose ``attackers`` multiply their delta by ``scale`` and, when ``examples`` > 0,
    claim that many training examples."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        if int(context.node_config.get("partition-id", 0)) in attackers and "arrays" in reply.content.array_records:
            wire = config_from_record(msg.content.config_records["config"]).wire.dtype
            shapes = {name: TensorMeta(tuple(a.shape)) for name, a in msg.content.array_records["arrays"].items()}
            delta = from_record(reply.content.array_records["arrays"], shapes, wire)
            reply.content["arrays"] = to_record({name: scale * t for name, t in delta.items()}, wire)
            if examples:
                reply.content.metric_records["metrics"]["num-examples"] = examples
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest.evaluate_global(msg, context)

    return app
