"""``SenderQueue``: the API an application uses, over any backend."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from ._backend import Backend, Settlement, backend_from_url
from ._clock import Clock, system_clock
from ._errors import InvalidArgument, LeaseLost
from ._lifecycle import Trigger
from ._memory import MemoryBackend
from ._models import Claim, Message, Metrics, NewMessage
from ._outcomes import Delivered, HardBounce, Outcome, SoftBounce
from ._retry import RetryPolicy
from ._validation import (
    DEFAULT_MAX_CONTENT_SIZE,
    IdMaker,
    check_id,
    check_lease,
    check_limit,
    check_messages,
    check_positive_int,
)

__all__ = ["DEFAULT_LEASE", "SenderQueue"]

DEFAULT_LEASE = timedelta(minutes=5)
"""How long a claim holds a message unless told otherwise."""

_DELIVER = Trigger.DELIVER  # a module constant: cheaper than the enum lookup on 3.11
_TRIGGERS: Mapping[type[Outcome], Trigger] = {
    Delivered: Trigger.DELIVER,
    SoftBounce: Trigger.SOFT_BOUNCE,
    HardBounce: Trigger.HARD_BOUNCE,
}


class SenderQueue:
    """The sender queues of an email platform: enqueue, claim, report, freeze, clear, watch.

    Every method validates its input before the backend is touched, so bad input
    raises :class:`InvalidArgument` (or :class:`InvalidMessage`) and changes nothing.

    Args:
        backend: the storage; a new :class:`MemoryBackend` when omitted.
        clock: returns the current time as an aware datetime; the system clock by default.
        retry: when soft-bounced messages are retried, and when they fail.
        max_content_size: the largest message content accepted, in bytes.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        clock: Clock = system_clock,
        retry: RetryPolicy | None = None,
        max_content_size: int = DEFAULT_MAX_CONTENT_SIZE,
    ) -> None:
        check_positive_int("max_content_size", max_content_size)
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self.clock = clock
        self.retry = retry if retry is not None else RetryPolicy()
        self.max_content_size = max_content_size
        self._make_id = IdMaker()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        clock: Clock = system_clock,
        retry: RetryPolicy | None = None,
        max_content_size: int = DEFAULT_MAX_CONTENT_SIZE,
    ) -> SenderQueue:
        """A queue on the backend a URL names: ``memory://``, ``sqlite:///path``, ``postgresql://…``, ``redis://…``.

        Schemes are found through the ``senderqueue.backends`` entry points.
        """
        return cls(backend_from_url(url), clock=clock, retry=retry, max_content_size=max_content_size)

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()

    def __enter__(self) -> SenderQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def now(self) -> datetime:
        """The queue's clock, read once and checked to be an aware time."""
        now = self.clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise InvalidArgument(f"the clock returned a naive datetime ({now!r}); it must be aware")
        return now.astimezone(UTC)

    # -- enqueue --------------------------------------------------------------------

    def enqueue(
        self,
        *,
        mailing: str,
        sender: str,
        recipient: str,
        content: bytes,
        mail_from: str,
        message_id: str | None = None,
    ) -> str:
        """Queue one message on the ``(mailing, sender)`` queue; return its id.

        Raises:
            InvalidMessage: an id, address or the content is not acceptable.
            DuplicateMessage: ``message_id`` is already in use.
        """
        message = NewMessage(
            mailing=mailing,
            sender=sender,
            recipient=recipient,
            content=content,
            mail_from=mail_from,
            message_id=message_id,
        )
        return self.enqueue_many([message])[0]

    def enqueue_many(self, messages: Iterable[NewMessage]) -> list[str]:
        """Queue a batch in one round trip, all or nothing; return the ids in order."""
        checked = check_messages(messages, self.max_content_size, self._make_id)
        if not checked:
            return []
        return self.backend.enqueue(checked, self.now())

    # -- claims and reports ---------------------------------------------------------

    def claim(self, sender: str, limit: int = 1, lease: timedelta = DEFAULT_LEASE) -> list[Claim]:
        """Claim up to ``limit`` of the sender's due messages, oldest first, for ``lease``.

        Expired leases of the sender are settled first. Each claimed message is
        ``SENDING`` and counts an attempt until it is reported.
        """
        check_id("sender", sender)
        check_limit(limit)
        check_lease(lease)
        return self.backend.claim(sender, limit, lease, self.now(), self.retry)

    def _settle_one(self, claim: Claim, trigger: Trigger, error: str | None) -> None:
        _check_claim(claim)
        (lost,) = self.backend.settle([Settlement(claim, trigger, error)], self.now(), self.retry)
        if lost is not None:
            raise lost

    def deliver(self, claim: Claim) -> None:
        """The message was accepted by the recipient's server. Raises ``LeaseLost``."""
        self._settle_one(claim, Trigger.DELIVER, None)

    def soft_bounce(self, claim: Claim, reason: str) -> None:
        """A temporary failure: retry after backoff (or fail, if exhausted). Raises ``LeaseLost``."""
        self._settle_one(claim, Trigger.SOFT_BOUNCE, _check_reason(reason))

    def hard_bounce(self, claim: Claim, reason: str) -> None:
        """A permanent failure: the message fails. Raises ``LeaseLost``."""
        self._settle_one(claim, Trigger.HARD_BOUNCE, _check_reason(reason))

    def release(self, claim: Claim) -> None:
        """Give the message back unsent: it returns to its state, the attempt not counted."""
        self._settle_one(claim, Trigger.RELEASE, None)

    def renew(self, claim: Claim, lease: timedelta = DEFAULT_LEASE) -> Claim:
        """Extend a claim's lease to now + ``lease``; return the renewed claim. Raises ``LeaseLost``."""
        _check_claim(claim)
        check_lease(lease)
        return self.backend.renew(claim, lease, self.now())

    def report_many(self, reports: Iterable[tuple[Claim, Outcome]]) -> list[LeaseLost | None]:
        """Settle many claims with their transport outcomes in one round trip.

        Returns one result per report, in order: ``None``, or the ``LeaseLost`` it met.
        A bounce's ``last_error`` is the outcome as ``"<code> <enhanced> <text>"``.
        """
        settlements = []
        for report in reports:
            claim, trigger, error = _check_report(report)
            settlements.append(Settlement(claim, trigger, error))
        if not settlements:
            return []
        return self.backend.settle(settlements, self.now(), self.retry)

    def expire_leases(self) -> int:
        """Settle every expired lease as a soft bounce ("lease expired"); return how many."""
        return self.backend.expire_leases(self.now(), self.retry)

    # -- operator actions -----------------------------------------------------------

    def freeze(self, mailing: str, sender: str | None = None) -> int:
        """Pause a mailing (all its sender queues, and later ones) or one sender queue.

        NEW and RETRIES messages become FROZEN, and so does whatever arrives while it
        is frozen; SENDING is untouched. Returns how many messages it moved.
        """
        return self.backend.freeze(*_check_target(mailing, sender), self.now())

    def unfreeze(self, mailing: str, sender: str | None = None) -> int:
        """Resume a mailing or one sender queue: each FROZEN message returns to its state."""
        return self.backend.unfreeze(*_check_target(mailing, sender), self.now())

    def clear(self, mailing: str, sender: str | None = None) -> int:
        """Delete a mailing's (or one sender queue's) NEW, FROZEN and RETRIES messages.

        SENDING messages are spared: delivered, they count as delivered; back without a
        verdict, they are DELETED. Returns how many messages it deleted.
        """
        return self.backend.clear(*_check_target(mailing, sender), self.now())

    def purge(self, older_than: timedelta) -> int:
        """Forget terminal messages (delivered, failed, deleted) last changed over ``older_than`` ago."""
        return self.backend.purge(self.now() - _check_age(older_than))

    # -- reads ----------------------------------------------------------------------

    def metrics(self, mailing: str, sender: str | None = None) -> Metrics:
        """The live counts of a mailing (or of one sender queue); all zero if unknown."""
        return self.backend.metrics(*_check_target(mailing, sender))

    def metrics_by_sender(self, mailing: str) -> dict[str, Metrics]:
        """The counts of each sender queue of a mailing."""
        return self.backend.metrics_by_sender(check_id("mailing", mailing))

    def get(self, message_id: str) -> Message:
        """The message as it is now. Raises ``UnknownMessage``."""
        return self.backend.get(check_id("message_id", message_id))


def _check_target(mailing: str, sender: str | None) -> tuple[str, str | None]:
    check_id("mailing", mailing)
    if sender is not None:
        check_id("sender", sender)
    return mailing, sender


def _check_age(age: object) -> timedelta:
    if not isinstance(age, timedelta) or age < timedelta(0):
        raise InvalidArgument(f"older_than must be a timedelta of zero or more, not {age!r}")
    return age


def _check_claim(claim: Any) -> None:
    if not isinstance(claim, Claim):
        raise InvalidArgument(f"expected a Claim, not {type(claim).__name__}")


def _check_report(report: object) -> tuple[Claim, Trigger, str | None]:
    if not isinstance(report, tuple) or len(report) != 2:
        raise InvalidArgument(f"a report is a (claim, outcome) pair, not {report!r}")
    claim, outcome = report
    _check_claim(claim)
    trigger = _TRIGGERS.get(type(outcome))
    if trigger is None:  # a subclass of an outcome class
        trigger = next((t for kind, t in _TRIGGERS.items() if isinstance(outcome, kind)), None)
    if trigger is None:
        raise InvalidArgument(f"an outcome is Delivered, SoftBounce or HardBounce, not {outcome!r}")
    return claim, trigger, None if trigger is _DELIVER else str(outcome)


def _check_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise InvalidArgument(f"reason must be a string, not {type(reason).__name__}")
    return reason
