"""Input rules that need no storage: ids, RFC 5321 addresses, content size, claim arguments.

Everything a queue receives passes here before any backend is touched, so bad
input is rejected with the same error, and no effect, on every backend.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re
import secrets
import unicodedata
from collections.abc import Iterable
from datetime import timedelta
from typing import Final

from ._errors import DuplicateMessage, InvalidArgument, InvalidMessage
from ._models import NewMessage

__all__ = [
    "DEFAULT_MAX_CONTENT_SIZE",
    "MAX_ID_LENGTH",
    "IdMaker",
    "check_address",
    "check_id",
    "check_lease",
    "check_limit",
    "check_positive_int",
    "check_messages",
]

MAX_ID_LENGTH: Final = 255
DEFAULT_MAX_CONTENT_SIZE: Final = 25 * 1024 * 1024

# RFC 5321 section 4.1.2, with RFC 6531's UTF-8 (any printable non-ASCII character) in atoms and labels.
_UTF8 = "\u0080-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_UTF8}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _UTF8 + r"]|\\[\x20-\x7e])*\""
_LABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
_ADDRESS = re.compile(
    rf"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})@(?:(?P<domain>{_LABEL}(?:\.{_LABEL})*)|\[(?P<literal>[^\[\]\\]+)\])"
)


# Unicode's graphic characters are letters, marks, numbers, punctuation, symbols and spaces (Zs):
# what is left is controls, format characters (bidi overrides, zero-width joiners), surrogates,
# private use, unassigned code points, and line and paragraph separators.
_NOT_GRAPHIC: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def check_id(kind: str, value: object, error: type[InvalidArgument] = InvalidArgument) -> str:
    """Return ``value`` if it is an id: 1 to 255 printable characters; else raise ``error``.

    Printable means graphic in Unicode's sense: any letter, mark, number, punctuation, symbol
    or space (a no-break or an ideographic space too), never a control or format character.
    """
    if not isinstance(value, str):
        raise error(f"{kind} must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise error(f"{kind} must be 1 to {MAX_ID_LENGTH} characters long, not {len(value)}")
    # str.isprintable() refuses every space but U+0020: only then are the characters looked up.
    if not value.isprintable() and any(unicodedata.category(c) in _NOT_GRAPHIC for c in value):
        raise error(f"{kind} {value!r} has a control, format or line separator character")
    return value


@functools.lru_cache(maxsize=4096)
def _address_problem(address: str) -> str | None:
    if not address.isprintable():
        return "has a control character"
    if len(address.encode()) > 254:
        return "is longer than 254 octets"
    match = _ADDRESS.fullmatch(address)
    if match is None:
        return "is not an RFC 5321 mailbox (local-part@domain)"
    if len(match["local"].encode()) > 64:
        return "has a local part longer than 64 octets"
    domain = match["domain"]
    if domain is not None:
        # Only a domain over 63 octets can hold a label over 63: most addresses skip the split.
        if len(domain.encode()) > 63 and any(len(label.encode()) > 63 for label in domain.split(".")):
            return "has a domain label longer than 63 octets"
        return None
    literal = match["literal"]
    try:
        if literal.startswith("IPv6:"):
            if "%" in literal:  # ipaddress takes a zone id; RFC 5321's IPv6-addr has none
                return "has an IPv6 literal with a zone id"
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        return "has an address literal that is not an IP address"
    return None


def check_address(kind: str, value: object) -> str:
    """Return ``value`` if it is an RFC 5321 mailbox, with nothing that could inject a command."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{kind} must be a string, not {type(value).__name__}")
    problem = _address_problem(value)
    if problem is not None:
        raise InvalidMessage(f"{kind} {value!r} {problem}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive whole number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be a positive integer, not {value!r}")
    return value


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is a positive whole number."""
    return check_positive_int("limit", limit)


def check_lease(lease: object) -> timedelta:
    """Return ``lease`` if it is a positive timedelta."""
    if not isinstance(lease, timedelta) or lease <= timedelta(0):
        raise InvalidArgument(f"lease must be a positive timedelta, not {lease!r}")
    return lease


class IdMaker:
    """Makes message ids unique across processes: a random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._count)}"


def check_messages(messages: Iterable[object], max_content_size: int, make_id: IdMaker) -> list[NewMessage]:
    """Validate a batch; return it with every ``message_id`` set. All or nothing."""
    checked: list[NewMessage] = []
    seen: set[str] = set()
    for message in messages:
        if not isinstance(message, NewMessage):
            raise InvalidMessage(f"expected a NewMessage, not {type(message).__name__}")
        check_id("mailing", message.mailing, InvalidMessage)
        check_id("sender", message.sender, InvalidMessage)
        check_address("recipient", message.recipient)
        check_address("mail_from", message.mail_from)
        content = message.content
        if not isinstance(content, bytes):
            raise InvalidMessage(f"content must be bytes, not {type(content).__name__}")
        if not 0 < len(content) <= max_content_size:
            raise InvalidMessage(f"content must be 1 to {max_content_size} bytes long, not {len(content)}")
        if message.message_id is None:
            message = NewMessage(  # not attrs.evolve, which costs ~4x as much
                mailing=message.mailing,
                sender=message.sender,
                recipient=message.recipient,
                content=content,
                mail_from=message.mail_from,
                message_id=make_id(),
            )
        else:
            check_id("message_id", message.message_id, InvalidMessage)
            if message.message_id in seen:
                raise DuplicateMessage(message.message_id)
            seen.add(message.message_id)
        checked.append(message)
    return checked
