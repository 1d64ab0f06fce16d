"""The port every storage backend implements, and how a URL finds one.

A backend speaks the queue's own words (enqueue, claim, settle, freeze, clear,
metrics). It receives input the core has already validated, and the time and
retry policy from the caller, so that every rule that needs no storage lives
once in the core. Each operation is atomic: it happens whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from importlib.metadata import entry_points
from typing import NamedTuple, Protocol, runtime_checkable
from urllib.parse import urlsplit

from ._errors import InvalidArgument, LeaseLost
from ._lifecycle import Trigger
from ._models import Claim, Message, Metrics, NewMessage
from ._retry import RetryPolicy

__all__ = ["ENTRY_POINT_GROUP", "Backend", "BackendFactory", "Settlement", "backend_from_url"]

ENTRY_POINT_GROUP = "senderqueue.backends"
"""Backends register a :data:`BackendFactory` here under their URL scheme."""


class Settlement(NamedTuple):
    """One claim's report: the trigger that takes it out of SENDING, and the error to record.

    Attributes:
        claim: the claim being settled.
        trigger: ``DELIVER``, ``SOFT_BOUNCE``, ``HARD_BOUNCE`` or ``RELEASE``.
        error: stored as the message's ``last_error`` on a bounce.
    """

    claim: Claim
    trigger: Trigger
    error: str | None = None


@runtime_checkable
class Backend(Protocol):
    """Storage for sender queues. One conformance suite (``senderqueue.testing``) defines it."""

    def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> list[str]:
        """Store validated messages (every ``message_id`` set), all or none.

        Raises ``DuplicateMessage`` if any id is stored already.
        """
        ...

    def claim(
        self, sender: str, limit: int, lease: timedelta, now: datetime, retry: RetryPolicy
    ) -> list[Claim]:
        """Settle the sender's expired leases, then claim up to ``limit`` due messages, oldest first."""
        ...

    def settle(
        self, settlements: Sequence[Settlement], now: datetime, retry: RetryPolicy
    ) -> list[LeaseLost | None]:
        """Settle each claim; a stale or unknown one changes nothing and gets a ``LeaseLost``."""
        ...

    def renew(self, claim: Claim, lease: timedelta, now: datetime) -> Claim:
        """Extend a valid claim's lease to ``now + lease``; raises ``LeaseLost``."""
        ...

    def expire_leases(self, now: datetime, retry: RetryPolicy) -> int:
        """Settle every lease that has run out as a soft bounce; return how many."""
        ...

    def freeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Freeze a mailing (all its sender queues, and later ones) or one sender queue; return moves."""
        ...

    def unfreeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Unfreeze a mailing or one sender queue; return messages moved."""
        ...

    def clear(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Delete the NEW, FROZEN and RETRIES messages of a mailing or one sender queue; return how many."""
        ...

    def metrics(self, mailing: str, sender: str | None) -> Metrics:
        """The mailing's counts, or one sender queue's, in O(sender queues)."""
        ...

    def metrics_by_sender(self, mailing: str) -> dict[str, Metrics]:
        """The counts of each sender queue of the mailing."""
        ...

    def get(self, message_id: str) -> Message:
        """The message as it is now; raises ``UnknownMessage``."""
        ...

    def purge(self, older_than: datetime) -> int:
        """Forget terminal messages last changed before ``older_than``; return how many."""
        ...

    def close(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...


BackendFactory = Callable[[str], Backend]
"""What the entry point ``senderqueue.backends:<scheme>`` loads: it makes a backend from a URL."""


def backend_from_url(url: str) -> Backend:
    """Make the backend a URL names, through the entry points registered for its scheme."""
    scheme = urlsplit(url).scheme.split("+", 1)[0].lower() if "://" in url else ""
    if not scheme:
        raise InvalidArgument(f"{url!r} is not a backend URL such as memory:// or sqlite:///queue.db")
    found = entry_points(group=ENTRY_POINT_GROUP, name=scheme)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise InvalidArgument(
            f"no backend is installed for {scheme}:// (installed: {', '.join(known) or 'none'}); "
            "install the distribution that provides it, such as senderqueue-sql or senderqueue-redis"
        )
    factory: BackendFactory = next(iter(found)).load()
    return factory(url)
