"""When a soft-bounced message is tried again, and when it is given up."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import attrs

__all__ = ["RetryPolicy"]


MAX_BACKOFF = timedelta(days=365)
"""The longest wait a policy may set; a next attempt time then always fits in a datetime."""


def _positive(_: object, attribute: attrs.Attribute[timedelta], value: timedelta) -> None:
    if value <= timedelta(0):
        raise ValueError(f"{attribute.name} must be positive, not {value}")


def _backoff(instance: object, attribute: attrs.Attribute[timedelta], value: timedelta) -> None:
    _positive(instance, attribute, value)
    if value > MAX_BACKOFF:
        raise ValueError(f"{attribute.name} must be at most {MAX_BACKOFF.days} days, not {value}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with a cap, an attempt limit and a lifetime.

    After the n-th attempt soft-bounces, the next one is at
    ``now + min(max_backoff, min_backoff * 2 ** (n - 1))``, times a factor in
    ``[1 - jitter, 1 + jitter]`` drawn from ``seed``, the message id and n: the first
    8 hex digits of ``sha1(f"{seed}:{message_id}:{n}")`` over 2**32, so that every
    backend (Redis computes it in Lua with ``redis.sha1hex``) and every rerun draws the
    same. The message fails instead when ``n >= max_attempts`` or ``now - created_at >= max_lifetime``.

    Attributes:
        min_backoff: the wait after the first soft bounce.
        max_backoff: the longest wait (at most 365 days).
        max_attempts: attempts after which a soft bounce fails the message.
        max_lifetime: age after which a soft bounce fails the message.
        jitter: the spread of the random factor, from 0 (none) to below 1.
        seed: seeds the jitter.
    """

    min_backoff: timedelta = attrs.field(default=timedelta(minutes=5), validator=_backoff)
    max_backoff: timedelta = attrs.field(default=timedelta(hours=1), validator=_backoff)
    max_attempts: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    max_lifetime: timedelta = attrs.field(default=timedelta(days=5), validator=_positive)
    jitter: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.max_backoff < self.min_backoff:
            raise ValueError("max_backoff must not be shorter than min_backoff")

    def backoff(self, attempts: int, key: str = "") -> timedelta:
        """The wait after the ``attempts``-th attempt soft-bounced."""
        exponent = min(max(attempts - 1, 0), 1000)
        # Compared in float seconds first: min_backoff * 2**n overflows timedelta long before n = 1000.
        if self.min_backoff.total_seconds() * 2.0**exponent >= self.max_backoff.total_seconds():
            base = self.max_backoff
        else:
            base = self.min_backoff * (1 << exponent)
        if not self.jitter:
            return base
        return base * (1 - self.jitter + 2 * self.jitter * self.draw(attempts, key))

    def draw(self, attempts: int, key: str) -> float:
        """The jitter's random number in [0, 1) for this message and attempt."""
        digest = hashlib.sha1(f"{self.seed}:{key}:{attempts}".encode(), usedforsecurity=False).hexdigest()
        return int(digest[:8], 16) / 2**32

    def exhausted(self, attempts: int, created_at: datetime, now: datetime) -> bool:
        """Whether a soft bounce after ``attempts`` attempts fails the message."""
        return attempts >= self.max_attempts or now - created_at >= self.max_lifetime

    def next_attempt(
        self, attempts: int, created_at: datetime, now: datetime, key: str = ""
    ) -> datetime | None:
        """When to try again after a soft bounce, or ``None`` if the message has failed."""
        if self.exhausted(attempts, created_at, now):
            return None
        return now + self.backoff(attempts, key)
