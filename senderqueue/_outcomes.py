"""What a delivery attempt came to, and the one table that classifies SMTP replies.

RFC 5321 reply codes and RFC 3463 enhanced status codes decide: 2xx delivered,
4xx (and any failure to talk to the server at all, or a 3xx where a final reply
was due) a soft bounce, 5xx a hard bounce. :class:`Classifier` holds that rule
with a table of exceptions a user can extend or override.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, TypeAlias

import attrs

__all__ = [
    "DEFAULT_EXCEPTIONS",
    "Classifier",
    "Delivered",
    "HardBounce",
    "Outcome",
    "SoftBounce",
    "parse_reply",
]


@attrs.frozen(kw_only=True)
class _Reply:
    code: int
    enhanced: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


@attrs.frozen(kw_only=True)
class Delivered(_Reply):
    """The server accepted the message.

    Attributes:
        code: the SMTP reply code (2xx).
        enhanced: the RFC 3463 enhanced status code, when the server gave one.
        text: the rest of the server's reply.
    """

    code: int = 250


@attrs.frozen(kw_only=True)
class SoftBounce(_Reply):
    """A temporary failure: the message will be tried again.

    Attributes:
        code: the SMTP reply code (4xx; 421 for a failed connection).
        enhanced: the RFC 3463 enhanced status code, when there is one.
        text: the server's text, or what went wrong with the connection.
    """


@attrs.frozen(kw_only=True)
class HardBounce(_Reply):
    """A permanent failure: the message fails.

    Attributes:
        code: the SMTP reply code (5xx).
        enhanced: the RFC 3463 enhanced status code, when there is one.
        text: the server's text.
    """


Outcome: TypeAlias = Delivered | SoftBounce | HardBounce
"""What one delivery attempt came to."""

_KINDS: Final[Mapping[str, type[Outcome]]] = MappingProxyType(
    {"delivered": Delivered, "soft": SoftBounce, "hard": HardBounce}
)

DEFAULT_EXCEPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # "Mailbox full": RFC 3463 lists X.2.2 as a mailbox status likely to change; retry it.
        "5.2.2": "soft",
    }
)
"""Replies whose class digit does not tell the truth: an enhanced code (``"5.2.2"``) or a
reply code (``"552"``) mapped to ``"delivered"``, ``"soft"`` or ``"hard"``. The enhanced
code is looked up first."""

# One line of a reply: exactly three digits, then a space, a hyphen (more lines follow) or the end.
_LINE = re.compile(
    r"(?P<code>[2-5]\d\d)(?:[ -](?:(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?= |$))? ?(?P<text>.*))?"
)


def _frozen_table(table: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(table))


@attrs.frozen(kw_only=True)
class Classifier:
    """Turns an SMTP reply into an :data:`Outcome`.

    The class digit of the enhanced code (or, without one, of the reply code)
    decides, unless ``exceptions`` names the enhanced code or the reply code.

    Attributes:
        exceptions: ``{"5.2.2": "soft", "550": "hard", ...}``; defaults to
            :data:`DEFAULT_EXCEPTIONS`. Pass ``{**DEFAULT_EXCEPTIONS, ...}`` to extend it.
    """

    exceptions: Mapping[str, str] = attrs.field(default=DEFAULT_EXCEPTIONS, converter=_frozen_table)

    @exceptions.validator
    def _check(self, _: object, table: Mapping[str, str]) -> None:
        for key, kind in table.items():
            if kind not in _KINDS:
                raise ValueError(f"{key!r} maps to {kind!r}; expected one of {sorted(_KINDS)}")

    def classify(self, code: int, enhanced: str | None = None, text: str = "") -> Outcome:
        """The outcome of a reply with this code, enhanced code and text."""
        if not 200 <= code <= 599:
            raise ValueError(f"{code} is not an SMTP reply code")
        kind = self.exceptions.get(enhanced or "") or self.exceptions.get(str(code))
        if kind is None:
            digit = (enhanced or str(code))[0]
            # A final 3xx is a protocol error, not an acceptance: retry rather than lose the message.
            kind = {"2": "delivered", "3": "soft", "4": "soft"}.get(digit, "hard")
        return _KINDS[kind](code=code, enhanced=enhanced, text=text)

    def parse(self, reply: str) -> Outcome:
        """Classify a reply written as ``"451 4.7.1 Try again later"`` (enhanced code optional).

        A multi-line reply (``"550-5.1.1 No such user\\r\\n550 5.1.1 here"``) gives one line of text.
        """
        lines = [_LINE.fullmatch(line) for line in reply.strip().splitlines() or [""]]
        first = lines[0]
        if first is None or any(line is None or line["code"] != first["code"] for line in lines):
            raise ValueError(f"{reply!r} is not an SMTP reply (a three-digit code on every line)")
        text = " ".join(line["text"].strip() for line in lines if line is not None and line["text"])
        return self.classify(int(first["code"]), first["enhanced"], text)


def parse_reply(reply: str) -> Outcome:
    """Classify a reply such as ``"550 5.1.1 No such user"`` with the default table."""
    return _DEFAULT.parse(reply)


_DEFAULT: Final = Classifier()
