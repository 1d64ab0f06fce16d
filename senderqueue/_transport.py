"""How a message leaves: the ``Transport`` port and a scripted fake SMTP transport."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from ._models import Message
from ._outcomes import Classifier, Delivered, Outcome

__all__ = ["Attempt", "FakeSMTPTransport", "Script", "Transport"]


@runtime_checkable
class Transport(Protocol):
    """Sends one message and says what came of it.

    ``send`` must not raise for a delivery failure: a refused or dropped
    connection is a :class:`SoftBounce`. A worker treats an unexpected exception
    as a soft bounce too, so that the attempt is never lost.
    """

    async def send(self, message: Message) -> Outcome:
        """Try to deliver ``message`` once."""
        ...

    async def aclose(self) -> None:
        """Close any connection held open."""
        ...


def _replies(replies: str | Sequence[str]) -> tuple[str, ...]:
    return (replies,) if isinstance(replies, str) else tuple(replies)


@attrs.frozen
class Script:
    """What a fake server answers one recipient or domain.

    Attributes:
        replies: one SMTP reply per attempt of a message, such as
            ``("451 4.7.1 Try later", "250 OK")``; the last one repeats.
        latency: seconds each attempt takes.
    """

    replies: tuple[str, ...] = attrs.field(converter=_replies, validator=attrs.validators.min_len(1))
    latency: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))


@attrs.frozen
class Attempt:
    """One send the fake transport recorded.

    Attributes:
        message: the message as it was handed to ``send``.
        outcome: what the script answered.
    """

    message: Message
    outcome: Outcome


Rule = str | Sequence[str] | Script


class FakeSMTPTransport:
    """A deterministic stand-in for an SMTP server, scripted per recipient or domain.

    ``rules`` maps a recipient address, a domain or ``"*"`` to a reply, a sequence
    of replies (attempt by attempt, per message; the last repeats), or a :class:`Script`
    with latency. The most specific key wins: address, then domain, then ``"*"``;
    anything unmatched is delivered. Every send is recorded in :attr:`attempts`.

    >>> transport = FakeSMTPTransport({"slow.example": ["451 4.7.1 Busy", "250 OK"]})
    """

    def __init__(
        self,
        rules: Mapping[str, Rule] | None = None,
        *,
        latency: float = 0.0,
        classifier: Classifier | None = None,
        handler: Callable[[Message, int], Outcome] | None = None,
    ) -> None:
        self.classifier = classifier or Classifier()
        self._scripts = {key.lower(): self._script(rule, latency) for key, rule in (rules or {}).items()}
        self._default = self._scripts.get("*", Script(("250 2.0.0 OK",), latency))
        self._handler = handler
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()
        self.attempts: list[Attempt] = []
        """Every send, in the order they finished."""

    @staticmethod
    def _script(rule: Rule, latency: float) -> Script:
        if isinstance(rule, Script):
            return rule
        return Script(_replies(rule), latency)

    def script_for(self, recipient: str) -> Script:
        """The script that answers ``recipient``."""
        address = recipient.lower()
        domain = address.rpartition("@")[2]
        return self._scripts.get(address) or self._scripts.get(domain) or self._default

    async def send(self, message: Message) -> Outcome:
        """Answer as scripted for the message's recipient and its attempt number."""
        with self._lock:
            attempt = self._count[message.id] = self._count.get(message.id, 0) + 1
        script = self.script_for(message.recipient)
        if script.latency:
            await asyncio.sleep(script.latency)
        if self._handler is not None:
            outcome = self._handler(message, attempt)
        else:
            outcome = self.classifier.parse(script.replies[min(attempt, len(script.replies)) - 1])
        with self._lock:
            self.attempts.append(Attempt(message, outcome))
        return outcome

    async def aclose(self) -> None:
        """Nothing to close."""

    @property
    def delivered(self) -> list[Message]:
        """The messages the fake server accepted, in order."""
        return [attempt.message for attempt in self.attempts if isinstance(attempt.outcome, Delivered)]
