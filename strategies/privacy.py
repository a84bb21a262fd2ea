"""The server's privacy book as a stage: a reply's DP event is booked under the node that sent it, once valid.

Under DP only a reply's public fields are kept (``fed.privacy.release``). Identity comes from
authentication, not from the reply's claim: Flower's ``src_node_id`` is the SuperLink's id of the
authenticated node (bound to its registered key in a deployment with node authentication, the simulated
node otherwise). The first valid reply binds its partition id to its node, with the hash of the node's
continuity token (a random value kept in its state dir, sent when the server asks a node to bind); a reply
from another node claiming a bound id is dropped with that reason. The id moves to another node (an
unauthenticated node restarted under a new id, or any node after a server restart) only with the same
token, and the book flags each move. Evaluate replies count only from the node bound to their id.
An event is booked only after every stage accepted the reply (validation bounds it, so nothing
unbounded reaches an accountant); a dropped reply's spending is the client's own ledger's to count, and
the book flags it. Each node is sent back only the events and the pin its own replies booked. The book is
persisted once the round's replies are in, before aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fed.privacy.book import LedgerBook
from fed.privacy.client import BIND, KNOWN_EVENTS, KNOWN_PIN, NODE_RECORD, TOKEN_BYTES
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
        """The message, with the DP events and the pin the book holds for its client, so a client that lost its
        state dir merges them back instead of spending its budget again or loosening its pin; to a node not
        yet bound, the request to bind with its continuity token."""
        cid = self.clients.get(message.metadata.dst_node_id)
        extra: dict[str, Any] = {BIND: True} if cid is None else {}
        if cid is not None and (events := self.book.events(cid)):
            extra[KNOWN_EVENTS] = events_to_json(events)
        if cid is not None and cid in self.book.pins:
            extra[KNOWN_PIN] = self.book.pins[cid]
        if not extra:
            return message
        records = dict(message.content.items())  # a new record: the message shares the others' arrays
        for key, config in message.content.config_records.items():
            records[key] = ConfigRecord({**config, **extra})
        return Message(
            content=RecordDict(records),
            message_type=message.metadata.message_type,
            dst_node_id=message.metadata.dst_node_id,
        )

    def arrive(self, state: RoundState, reply: Reply) -> None:
        """Narrow the reply to its public metrics; drop it when it names a client bound to another node."""
        reply.metrics = public_metrics(reply.message.content.metric_records["metrics"], self.dp)
        cid = reply.metrics.get("partition-id")
        if problem := self._claim_problem(reply.node, cid, state.log.connected, _node_record(reply.message)):
            raise PayloadError(problem)
        declined = "epsilon" in reply.metrics and "dp-steps" not in reply.metrics
        if declined and isinstance(cid, int) and self.owners.get(cid) == reply.node:
            self.book.claim(cid, reply.metrics["epsilon"])  # a bound client that declined still states its spend
        if self.dp and "dp-steps" in reply.metrics and not reply.metrics.get("refused"):
            state.log.unbooked.append(reply.node)  # until ``accepted`` books it

    def _claim_problem(self, node: int, cid: Any, connected: Sequence[int], record: dict[str, Any]) -> str:
        """Why ``node`` may not answer for ``cid`` (empty: it may). A bound id stays with its node while that node
        is connected (or the SuperLink's list is unknown); an id bound before, to a node that left or in a
        server that restarted since, moves only with the continuity token it was bound with."""
        bound = self.clients.get(node)
        if bound is not None and bound != cid:
            return f"node {node} is bound to partition-id={bound}; it cannot claim {cid!r}"
        if not isinstance(cid, int) or self.owners.get(cid) == node:
            return ""
        owner = self.owners.get(cid)
        if owner is not None and (not connected or owner in connected):
            return f"partition-id={cid} is bound to node {owner}; node {node} cannot claim it"
        if owner is None and cid not in self.book.tokens:
            return ""  # first contact: the first valid reply binds
        if self.book.token_matches(cid, _token(record)):
            return ""
        before = f"its node {owner} left" if owner is not None else "it was bound before the server restarted"
        return (
            f"partition-id={cid} is bound ({before}); node {node} cannot take it without the continuity token "
            "it was bound with"
        )

    def accepted(self, state: RoundState, reply: Reply) -> None:
        """Bind the reply's partition id to its node (with its continuity token, the first time), keep its pin,
        and book its DP event (bounded by validation by now)."""
        cid = reply.metrics.get("partition-id")
        if not isinstance(cid, int) or cid < 0:
            return
        gone = self.owners.get(cid)
        if gone is not None and gone != reply.node:  # its node left the SuperLink, and the token matched
            self.book.flag(
                f"round {state.number}: partition-id={cid} moved from node {gone}, gone, to node {reply.node} "
                "(its continuity token matched)"
            )
            self.clients.pop(gone, None)
        record = _node_record(reply.message)
        if token := _token(record):
            self.book.keep_token(cid, token)
        if isinstance(record.get("pin"), str):
            self.book.keep_pin(cid, record["pin"])
        self.owners[cid] = reply.node
        self.clients[reply.node] = cid
        self.book.observe(state.number, reply.metrics, run=reply.message.metadata.run_id)
        if reply.node in state.log.unbooked:
            state.log.unbooked.remove(reply.node)

    def evaluation(self, run_round: int, reply: Message) -> None:
        """Scores count only from the node bound to the partition id they name (or, before any binding of
        either, from any node: nothing of that id was trained or booked yet)."""
        cid = reply.content.metric_records["metrics"].get("partition-id")
        node = reply.metadata.src_node_id
        if not isinstance(cid, int):
            raise PayloadError(f"the evaluate reply names no partition-id (partition-id={cid!r})")
        owner, bound = self.owners.get(cid), self.clients.get(node)
        if owner == node or (owner is None and bound is None and cid not in self.book.tokens):
            return
        whose = f"bound to node {owner}" if owner is not None else "bound before, not yet in this run"
        raise PayloadError(f"node {node} claims partition-id={cid}, {whose}: its scores are left out")

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


def _node_record(message: Message) -> dict[str, Any]:
    """The reply's record about its node (``NODE_RECORD``: pin, continuity token); empty when it sent none."""
    record = message.content.config_records.get(NODE_RECORD)
    return dict(record) if record is not None else {}


def _token(record: dict[str, Any]) -> str:
    """The continuity token a node record carries, if it is one (hex of ``TOKEN_BYTES`` bytes), else empty."""
    token = record.get("continuity-token")
    if not isinstance(token, str) or len(token) != 2 * TOKEN_BYTES:
        return ""
    try:
        bytes.fromhex(token)
    except ValueError:
        return ""
    return token
