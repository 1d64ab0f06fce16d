"""The value objects a queue takes and returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs

from ._lifecycle import State

__all__ = ["Claim", "Message", "Metrics", "NewMessage"]


@attrs.frozen(kw_only=True)
class NewMessage:
    """A message to enqueue on one sender queue.

    Attributes:
        mailing: the mailing (campaign) it belongs to.
        sender: the sending server whose queue holds it.
        recipient: the envelope recipient (RFC 5321 address).
        content: the whole message as bytes, headers included.
        mail_from: the envelope sender (RFC 5321 address).
        message_id: the caller's id for it; one is made when ``None``.
    """

    mailing: str
    sender: str
    recipient: str
    content: bytes = attrs.field(repr=False)
    mail_from: str
    message_id: str | None = None


@attrs.frozen(kw_only=True)
class Message:
    """A stored message as it is now.

    Attributes:
        id: its id (the caller's ``message_id`` or a generated one).
        mailing, sender: its sender queue.
        recipient, mail_from, content: its envelope and content.
        state: where it is in its lifecycle.
        frozen_from: ``NEW`` or ``RETRIES`` while ``state`` is ``FROZEN``, else ``None``.
        attempts: how many delivery attempts it has had (claims, less releases).
        next_attempt_at: when it may next be claimed.
        last_error: the last bounce as ``"<code> <enhanced> <text>"``, or ``None``.
        created_at, updated_at: when it was enqueued and last changed state.
    """

    id: str
    mailing: str
    sender: str
    recipient: str
    mail_from: str
    content: bytes = attrs.field(repr=False)
    state: State
    frozen_from: State | None
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    updated_at: datetime


@attrs.frozen(kw_only=True)
class Claim:
    """A sender worker's lease on one message while it is being sent.

    Attributes:
        message: the message, in state ``SENDING``.
        token: proves the claim; a report with another token raises ``LeaseLost``.
        expires_at: when the lease runs out unless renewed.
    """

    message: Message
    token: str
    expires_at: datetime


@attrs.frozen(kw_only=True)
class Metrics:
    """The live counts of a mailing, or of one of its sender queues.

    Attributes:
        frozen, new, retries, sending: the four queued states.
        delivered, failed, deleted: terminal messages not yet purged.
        total: ``new + retries + sending + frozen``.
    """

    frozen: int = 0
    new: int = 0
    retries: int = 0
    sending: int = 0
    delivered: int = 0
    failed: int = 0
    deleted: int = 0

    @property
    def total(self) -> int:
        """The messages still queued: ``new + retries + sending + frozen``."""
        return self.new + self.retries + self.sending + self.frozen

    def __add__(self, other: Metrics) -> Metrics:
        return Metrics(
            frozen=self.frozen + other.frozen,
            new=self.new + other.new,
            retries=self.retries + other.retries,
            sending=self.sending + other.sending,
            delivered=self.delivered + other.delivered,
            failed=self.failed + other.failed,
            deleted=self.deleted + other.deleted,
        )

    @classmethod
    def of_sender_queue(
        cls, *, frozen: bool, new: int, retries: int, sending: int, delivered: int, failed: int, deleted: int
    ) -> Metrics:
        """A sender queue's metrics from its stored counters: a frozen queue shows NEW and RETRIES as FROZEN.

        Every backend keeps counters of stored states and a frozen flag per sender queue; this
        is the one place that derives the FROZEN count from them.
        """
        if frozen:
            new, retries, frozen_count = 0, 0, new + retries
        else:
            frozen_count = 0
        return cls(
            frozen=frozen_count,
            new=new,
            retries=retries,
            sending=sending,
            delivered=delivered,
            failed=failed,
            deleted=deleted,
        )

    def as_dict(self) -> dict[str, int]:
        """All eight counts, ``total`` first."""
        return {"total": self.total, **attrs.asdict(self)}

    @classmethod
    def count(cls, states: Any) -> Metrics:
        """Metrics from an iterable of message states (a scan; for checks, not for the hot path)."""
        tally = dict.fromkeys(State, 0)
        for state in states:
            tally[state] += 1
        return cls(**{state.value: n for state, n in tally.items()})
