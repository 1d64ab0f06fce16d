"""Where a queue's time comes from: any callable returning an aware UTC datetime."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "ManualClock", "ScaledClock", "system_clock"]

Clock = Callable[[], datetime]
"""A callable that returns the current time as an aware UTC datetime."""


def system_clock() -> datetime:
    """The system's time, in UTC."""
    return datetime.now(UTC)


def _aware(start: datetime) -> datetime:
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("a clock's start must be an aware datetime")
    return start.astimezone(UTC)


class ManualClock:
    """A clock that moves only when told to, for tests.

    >>> clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    >>> clock.advance(timedelta(minutes=5))
    >>> clock()
    datetime.datetime(2030, 1, 1, 0, 5, tzinfo=datetime.timezone.utc)
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = _aware(start) if start is not None else system_clock()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta`` (which must not be negative)."""
        if delta < timedelta(0):
            raise ValueError("a clock cannot go back")
        with self._lock:
            self._now += delta

    def set(self, now: datetime) -> None:
        """Move the clock to ``now`` (which must not be earlier than its time)."""
        now = _aware(now)
        with self._lock:
            if now < self._now:
                raise ValueError("a clock cannot go back")
            self._now = now


class ScaledClock:
    """A clock that runs ``speed`` times faster than real time, from ``start``.

    Demos use it to show hours of retry backoff in seconds.
    """

    def __init__(self, speed: float, start: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start = _aware(start) if start is not None else system_clock()
        self._origin = time.monotonic()

    def __call__(self) -> datetime:
        return self._start + timedelta(seconds=(time.monotonic() - self._origin) * self.speed)
