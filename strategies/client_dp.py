"""Client-level DP as a stage around the core strategy (DP-FedAvg with Poisson client sampling).

Three hooks, each one step of ``fed.privacy.client_level``'s mechanism, so the core stays as it is and
a streaming core that folds each reply into running sums keeps the guarantee: ``outgoing`` samples every
node independently (and sends nothing once the cap would be passed); ``accepted`` clips each reply, all
its sent tensors jointly, as soon as it is validated, weighs it 1 and counts whether it was within the
bound; ``released`` turns the rule's mean back into the sum, books the round, adds the noise and divides
by the fixed ``q N``, then moves an adaptive bound from the noised count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Message

from fed.privacy import secure_rng
from fed.privacy.book import LedgerBook
from fed.privacy.client_level import ClientAccount
from strategies.influence import Scaled, delta_norm
from strategies.kinds import Tensors
from strategies.pipeline import Reply, RoundState, Stage

log = logging.getLogger(__name__)


class ClientLevelDP(Stage):
    """Poisson-sampled, clipped, uniformly weighted replies; a noised sum over a fixed denominator."""

    def __init__(self, account: ClientAccount, on_privacy: Callable[[], None] | None = None) -> None:
        self.account = account
        self.on_privacy = on_privacy
        """Persists the account once a round is booked, before its noise is drawn."""
        self._tally: dict[int, tuple[int, int]] = {}
        """Run round -> (replies accepted, of them within the round's bound)."""

    @classmethod
    def for_book(cls, book: LedgerBook, on_privacy: Callable[[LedgerBook], None] | None = None) -> ClientLevelDP:
        """The stage booking into ``book``'s client-level account (persisted with the book)."""
        if book.client is None:
            raise ValueError("client-level DP needs a book with a client-level account (dp.level client or both)")
        return cls(book.client, None if on_privacy is None else lambda: on_privacy(book))

    def outgoing(self, messages: list[Message]) -> list[Message]:
        """Each node independently with probability q (the CSPRNG's coins); none once the cap is reached."""
        run_round = round_of(messages)
        if run_round is not None and not self.account.allows(run_round):
            log.warning("client-level DP: %s", self.account.flags[-1])
            return []
        keep = secure_rng.bernoulli_indices(len(messages), self.account.mechanism.sample_rate)
        return [messages[i] for i in keep]

    def accepted(self, state: RoundState, reply: Reply) -> None:
        """Clip the validated reply to the round's bound and give it weight 1 (its example count, self-reported,
        must not scale its influence past the bound)."""
        norm = delta_norm(reply.delta)  # all sent tensors jointly; scaled as it is read, no copy held
        reply.delta = Scaled(reply.delta, min(1.0, self.account.clip / norm) if norm > 0 else 1.0)
        reply.weight = 1.0
        reply.usage = None
        clipped = norm > self.account.clip
        state.log.clipped += clipped
        state.log.norm_bound = self.account.clip
        count, within = self._tally.get(state.number, (0, 0))
        self._tally[state.number] = (count + 1, within + (not clipped))

    def released(self, state: RoundState, merged: Tensors) -> Tensors:
        """The noised mean: the weight-1 mean times the replies is their clipped sum; booked, noised, over q N."""
        count, within = self._tally.pop(state.number, (0, 0))
        self.account.book(state.number)
        if self.on_privacy is not None:
            self.on_privacy()
        total = {name: t * count for name, t in merged.items()}
        noised = self.account.mechanism.noised_mean(total, self.account.clip)
        self.account.clip = self.account.mechanism.next_clip(self.account.clip, within, count)
        return noised


def round_of(messages: list[Message]) -> int | None:
    """The run round the train messages name (their config's ``server-round``), when there are any."""
    for message in messages:
        for config in message.content.config_records.values():
            value = config.get("server-round")
            if isinstance(value, int):
                return value
    return None
