"""The server's privacy book as a stage: a reply's DP event is booked under the node that sent it, once valid.

Under DP only a reply's public fields are kept (``fed.privacy.release``). Identity comes from
authentication, not from the reply's claim: Flower's ``src_node_id`` is the SuperLink's id of the
authenticated node (bound to its registered key in a deployment with node authentication, the simulated
node otherwise). The first valid reply binds its partition id to its node for the run; a reply from
another node claiming a bound id is dropped with that reason while the bound node is connected (a node
that left, e.g. an unauthenticated node restarted under a new id, can be replaced: the book flags it).
An event is booked only after every stage accepted the reply (validation bounds it, so nothing
unbounded reaches an accountant); a dropped reply's spending is the client's own ledger's to count, and
the book flags it. Each node is sent back only the events its own replies booked. The book is persisted
once the round's replies are in, before aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Message, RecordDict

from fed.privacy.book import LedgerBook
from fed.privacy.ledger import events_to_json
from fed.privacy.release import public_metrics
from fed.wire import PayloadError
from strategies.pipeline import Reply, RoundState, Stage


class PrivacyBookkeeping(Stage):
    """Binds partition ids to nodes, books each valid reply's DP event, hands each node its own events back,
    flags silent DP clients."""

    def __init__(self, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None) -> None:
        self.book = book
        self.dp = book.dp.example_level
        self.on_privacy = on_privacy
        """Persists the book (privacy.json) after every batch of replies, before aggregation."""
        self.clients: dict[int, int] = {}
        """Node id -> the client id its first valid reply named: where that client's events go back."""
        self.owners: dict[int, int] = {}
        """Client id -> the node bound to it; another node naming it is dropped."""

    def outgoing(self, messages: list[Message]) -> list[Message]:
        return [self.with_known_events(m) for m in messages]

    def with_known_events(self, message: Message) -> Message:
        """The message, with the DP events the book holds for its client, so a client that lost its
        ledger file merges them back instead of spending its budget again."""
        cid = self.clients.get(message.metadata.dst_node_id)
        events = self.book.events(cid) if cid is not None else []
        if not events:
            return message
        records = dict(message.content.items())  # a new record: the message shares the others' arrays
        for key, config in message.content.config_records.items():
            records[key] = ConfigRecord({**config, "known-events": events_to_json(events)})
        return Message(
            content=RecordDict(records),
            message_type=message.metadata.message_type,
            dst_node_id=message.metadata.dst_node_id,
        )

    def arrive(self, state: RoundState, reply: Reply) -> None:
        """Narrow the reply to its public metrics; drop it when it names a client bound to another node."""
        reply.metrics = public_metrics(reply.message.content.metric_records["metrics"], self.dp)
        state.log.reported.append(reply.metrics)
        cid = reply.metrics.get("partition-id")
        owner = self.owners.get(cid) if isinstance(cid, int) else None
        if owner is not None and owner != reply.node and (not state.log.connected or owner in state.log.connected):
            raise PayloadError(f"partition-id={cid} is bound to node {owner}; node {reply.node} cannot claim it")
        bound = self.clients.get(reply.node)
        if bound is not None and bound != cid:
            raise PayloadError(f"node {reply.node} is bound to partition-id={bound}; it cannot claim {cid!r}")
        if (
            isinstance(cid, int)
            and owner == reply.node
            and "epsilon" in reply.metrics
            and "dp-steps" not in reply.metrics
        ):
            self.book.claim(cid, reply.metrics["epsilon"])  # a bound client that declined still states its spend
        if self.dp and "dp-steps" in reply.metrics and not reply.metrics.get("refused"):
            state.log.unbooked.append(reply.node)  # until ``accepted`` books it

    def accepted(self, state: RoundState, reply: Reply) -> None:
        """Bind the reply's partition id to its node and book its DP event (bounded by validation by now)."""
        cid = reply.metrics.get("partition-id")
        if not isinstance(cid, int) or cid < 0:
            return
        gone = self.owners.get(cid)
        if gone is not None and gone != reply.node:  # its node left the SuperLink (``arrive`` checked)
            self.book.flag(
                f"round {state.number}: partition-id={cid} moved from node {gone}, gone, to node {reply.node}"
            )
            self.clients.pop(gone, None)
        self.owners[cid] = reply.node
        self.clients[reply.node] = cid
        self.book.observe(state.number, reply.metrics, run=reply.message.metadata.run_id)
        if reply.node in state.log.unbooked:
            state.log.unbooked.remove(reply.node)

    def received(self, state: RoundState, replies: Sequence[Message]) -> None:
        self._flag_silent(state, {m.metadata.src_node_id for m in replies})
        for node in state.log.unbooked:
            self.book.flag(
                f"round {state.number}: node {node} sent a DP event in a reply that was dropped; it is not "
                "booked (the client's own ledger counts what it spent)"
            )
        if self.on_privacy is not None:
            self.on_privacy(self.book)

    def _flag_silent(self, state: RoundState, replied: set[int]) -> None:
        """A DP client asked to train that never replied may still have spent budget: say so."""
        if not self.dp:
            return
        for node in sorted(set(state.log.asked) - replied):
            who = f"client {self.clients[node]}" if node in self.clients else "a client not yet identified"
            self.book.flag(
                f"round {state.number}: {who} (node {node}) was asked to train and sent no reply; it "
                "may have spent budget the server never saw (its own ledger counts it)"
            )
