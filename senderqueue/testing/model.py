"""A deliberately naive model of the specification, to test backends against.

It shares nothing with the backends but the public value types and the retry
policy: every message holds its state explicitly, freeze and clear rewrite each
message, metrics scan every message, and the precedence of SPEC section 3 is
written out again here. Slow on purpose, and easy to check by eye.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import attrs

from .._lifecycle import State
from .._models import Metrics, NewMessage
from .._retry import RetryPolicy

__all__ = ["ModelMessage", "SpecModel"]


@attrs.define
class ModelMessage:
    """What the model knows of one message."""

    id: str
    mailing: str
    sender: str
    order: int
    state: State
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime
    frozen_from: State | None = None
    claimed_from: State | None = None
    attempts: int = 0
    last_error: str | None = None
    claim_no: int | None = None
    lease_expires_at: datetime | None = None
    cleared_while_sending: bool = False


class SpecModel:
    """The specification as the simplest code that could work.

    Claims are numbered; a report names the claim number it was given, and the
    model says whether that claim is still valid.
    """

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry = retry
        self.messages: dict[str, ModelMessage] = {}
        self.frozen_queues: set[tuple[str, str]] = set()
        self.frozen_mailings: set[str] = set()
        self.known_queues: set[tuple[str, str]] = set()
        self._orders = 0
        self._claims = 0

    def _frozen(self, mailing: str, sender: str) -> bool:
        return (mailing, sender) in self.frozen_queues

    def _touch_queue(self, mailing: str, sender: str) -> None:
        if (mailing, sender) not in self.known_queues:
            self.known_queues.add((mailing, sender))
            if mailing in self.frozen_mailings:
                self.frozen_queues.add((mailing, sender))

    # -- changes --------------------------------------------------------------------

    def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> None:
        """Store messages whose ``message_id`` is set."""
        for new in messages:
            assert new.message_id is not None
            self._touch_queue(new.mailing, new.sender)
            self._orders += 1
            message = ModelMessage(
                id=new.message_id,
                mailing=new.mailing,
                sender=new.sender,
                order=self._orders,
                state=State.NEW,
                created_at=now,
                updated_at=now,
                next_attempt_at=now,
            )
            if self._frozen(new.mailing, new.sender):
                message.state, message.frozen_from = State.FROZEN, State.NEW
            self.messages[message.id] = message

    def claim(self, sender: str, limit: int, lease: timedelta, now: datetime) -> list[tuple[str, int]]:
        """Expire the sender's leases, then claim; return ``(message id, claim number)`` in order."""
        self.expire(now, sender)
        due = sorted(
            (
                m
                for m in self.messages.values()
                if m.sender == sender and m.state in (State.NEW, State.RETRIES) and m.next_attempt_at <= now
            ),
            key=lambda m: (m.next_attempt_at, m.order),
        )
        claimed = []
        for message in due[:limit]:
            self._claims += 1
            message.claimed_from, message.state = message.state, State.SENDING
            message.attempts += 1
            message.claim_no = self._claims
            message.lease_expires_at = now + lease
            message.updated_at = now
            claimed.append((message.id, self._claims))
        return claimed

    def holds(self, message_id: str, claim_no: int) -> bool:
        """Whether this claim is still valid."""
        message = self.messages.get(message_id)
        return message is not None and message.state is State.SENDING and message.claim_no == claim_no

    def settle(self, message_id: str, claim_no: int, verdict: str, error: str | None, now: datetime) -> bool:
        """Apply ``verdict`` (deliver, soft, hard, release); False if the claim was not valid."""
        if not self.holds(message_id, claim_no):
            return False
        message = self.messages[message_id]
        message.claim_no = message.lease_expires_at = None
        message.updated_at = now
        if error is not None:
            message.last_error = error
        if verdict == "release":
            message.attempts -= 1
        if verdict == "deliver":
            message.state = State.DELIVERED
        elif verdict == "hard":
            message.state = State.FAILED
        elif message.cleared_while_sending:
            message.state = State.DELETED
        elif verdict in ("soft", "expire") and (
            message.attempts >= self.retry.max_attempts or now - message.created_at >= self.retry.max_lifetime
        ):
            message.state = State.FAILED
        else:
            if verdict == "release":
                back = message.claimed_from
                assert back is not None
            else:
                back = State.RETRIES
                message.next_attempt_at = now + self.retry.backoff(message.attempts, message.id)
            if self._frozen(message.mailing, message.sender):
                message.state, message.frozen_from = State.FROZEN, back
            else:
                message.state = back
        return True

    def expire(self, now: datetime, sender: str | None = None) -> int:
        """Settle expired leases (of one sender, or all) as soft bounces; return how many."""
        expired = [
            m
            for m in self.messages.values()
            if m.state is State.SENDING
            and m.lease_expires_at is not None
            and m.lease_expires_at <= now
            and (sender is None or m.sender == sender)
        ]
        for message in expired:
            assert message.claim_no is not None
            self.settle(message.id, message.claim_no, "expire", "lease expired", now)
        return len(expired)

    def renew(self, message_id: str, claim_no: int, lease: timedelta, now: datetime) -> bool:
        """Extend a valid claim's lease; False if the claim was not valid."""
        if not self.holds(message_id, claim_no):
            return False
        self.messages[message_id].lease_expires_at = now + lease
        return True

    def _queues(self, mailing: str, sender: str | None) -> set[tuple[str, str]]:
        if sender is None:
            return {q for q in self.known_queues if q[0] == mailing}
        return {(mailing, sender)}

    def freeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Freeze, rewriting every NEW and RETRIES message; return how many moved."""
        if sender is None:
            self.frozen_mailings.add(mailing)
        else:
            self.known_queues.add((mailing, sender))
        queues = self._queues(mailing, sender)
        self.frozen_queues |= queues
        moved = 0
        for message in self.messages.values():
            if (message.mailing, message.sender) in queues and message.state in (State.NEW, State.RETRIES):
                message.state, message.frozen_from = State.FROZEN, message.state
                message.updated_at = now
                moved += 1
        return moved

    def unfreeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Unfreeze, returning every FROZEN message to its state; return how many moved."""
        if sender is None:
            self.frozen_mailings.discard(mailing)
        else:
            self.known_queues.add((mailing, sender))
        queues = self._queues(mailing, sender)
        self.frozen_queues -= queues
        moved = 0
        for message in self.messages.values():
            if (message.mailing, message.sender) in queues and message.state is State.FROZEN:
                assert message.frozen_from is not None
                message.state, message.frozen_from = message.frozen_from, None
                message.updated_at = now
                moved += 1
        return moved

    def clear(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Delete every NEW, FROZEN and RETRIES message; mark SENDING ones; return how many deleted."""
        queues = self._queues(mailing, sender)
        moved = 0
        for message in self.messages.values():
            if (message.mailing, message.sender) not in queues:
                continue
            if message.state in (State.NEW, State.FROZEN, State.RETRIES):
                message.state, message.frozen_from = State.DELETED, None
                message.updated_at = now
                moved += 1
            elif message.state is State.SENDING:
                message.cleared_while_sending = True
        return moved

    def purge(self, older_than: datetime) -> int:
        """Forget terminal messages last changed before ``older_than``."""
        doomed = [
            m.id
            for m in self.messages.values()
            if m.state in (State.DELIVERED, State.FAILED, State.DELETED) and m.updated_at < older_than
        ]
        for message_id in doomed:
            del self.messages[message_id]
        return len(doomed)

    # -- reads ----------------------------------------------------------------------

    def metrics(self, mailing: str, sender: str | None = None) -> Metrics:
        """Count the messages' states."""
        return Metrics.count(
            m.state
            for m in self.messages.values()
            if m.mailing == mailing and (sender is None or m.sender == sender)
        )

    def senders(self, mailing: str) -> set[str]:
        """The senders that have messages of the mailing."""
        return {m.sender for m in self.messages.values() if m.mailing == mailing}
