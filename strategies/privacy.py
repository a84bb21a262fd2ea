"""The server's privacy book as a stage: every reply's DP event is booked the moment it arrives.

Under DP only a reply's public fields are kept (``fed.privacy.release``), and its event enters the
book before any later stage may drop the reply: a dropped client still spent budget. The book is
persisted once the round's replies are in, before aggregation, so a crash loses no event the server saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Message, RecordDict

from fed.privacy.book import LedgerBook
from fed.privacy.ledger import events_to_json
from fed.privacy.release import public_metrics
from strategies.pipeline import Reply, RoundState, Stage


class PrivacyBookkeeping(Stage):
    """Books each reply's DP event, hands each client its known events back, flags silent DP clients."""

    def __init__(self, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None) -> None:
        self.book = book
        self.dp = book.dp.enabled
        self.on_privacy = on_privacy
        """Persists the book (privacy.json) after every batch of replies, before aggregation."""
        self.clients: dict[int, int] = {}
        """Node id -> the client id its replies named: where to send that client's events back."""

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
        """Narrow the reply to its public metrics and book its DP event at once."""
        reply.metrics = public_metrics(reply.message.content.metric_records["metrics"], self.dp)
        cid = self.book.observe(state.number, reply.metrics, run=reply.message.metadata.run_id)
        if cid is not None:
            self.clients[reply.node] = cid
        state.log.reported.append(reply.metrics)

    def received(self, state: RoundState, replies: Sequence[Message]) -> None:
        self._flag_silent(state, {m.metadata.src_node_id for m in replies})
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
