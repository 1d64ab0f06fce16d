"""``SMTPTransport``: real SMTP to a smart host, on asyncio streams.

It is written on :mod:`asyncio` streams rather than aiosmtplib or smtplib:
aiosmtplib has no PIPELINING and rewrites the message's line endings, smtplib
blocks a thread per connection; both were measured (``benchmarks/smtp.py``).
Every failure to talk to the server becomes an outcome from the one
:class:`~senderqueue.Classifier` table, never an exception.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
from collections.abc import Iterator
from typing import Final

import attrs

from ._models import Message
from ._outcomes import Classifier, Outcome

__all__ = ["SMTPTransport"]

# RFC 3463 codes given to failures that have no server reply of their own.
_NO_ANSWER: Final = "4.4.1"  # could not connect, or the server did not answer in time
_BAD_CONNECTION: Final = "4.4.2"  # the connection dropped or broke mid-session
_SECURITY: Final = "4.7.0"  # STARTTLS or AUTH could not be done

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")
_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_MAX_REPLY_LINES: Final = 100


class _SessionError(Exception):
    """The session failed before or outside a mail transaction: a soft failure of the connection."""

    def __init__(self, text: str, enhanced: str = _BAD_CONNECTION) -> None:
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced


class _Stale(Exception):
    """A reused connection was found dead before any of the message was accepted."""


@attrs.frozen
class _Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class _Connection:
    """One SMTP session: reads replies and writes commands, each under a timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.loop = asyncio.get_running_loop()
        self.usable = True

    async def reply(self) -> _Reply:
        async with asyncio.timeout(self.timeout):
            return await self._reply()

    async def replies(self, count: int) -> list[_Reply]:
        """Read the replies to ``count`` pipelined commands, under one timeout: they come together."""
        async with asyncio.timeout(self.timeout):
            return [await self._reply() for _ in range(count)]

    async def _reply(self) -> _Reply:
        lines: list[str] = []
        for _ in range(_MAX_REPLY_LINES):
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise _SessionError("the server closed the connection")
            if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise _SessionError(f"the server sent a malformed reply: {line[:80]!r}")
            lines.append(line[4:].decode("utf-8", "replace").strip())
            if line[3:4] != b"-":
                reply = _Reply(int(line[:3]), "\n".join(lines))
                if reply.code == 421:  # the server is closing this session
                    self.usable = False
                return reply
        raise _SessionError("the server sent a reply of too many lines")

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size():  # only a full socket buffer makes drain wait
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()

    async def command(self, line: str) -> _Reply:
        await self.write(line.encode() + b"\r\n")
        return await self.reply()

    async def ehlo(self, name: str) -> None:
        reply = await self.command(f"EHLO {name}")
        if reply.code == 250:
            extensions = reply.text.split("\n")[1:]
            self.extensions = {
                keyword.upper(): params for keyword, _, params in (ext.partition(" ") for ext in extensions)
            }
            return
        reply = await self.command(f"HELO {name}")
        if reply.code != 250:
            raise _SessionError(f"HELO refused: {reply}")
        self.extensions = {}

    def abort(self) -> None:
        self.usable = False
        with contextlib.suppress(Exception):  # the loop may already be closed
            self.writer.transport.abort()

    async def quit(self) -> None:
        self.usable = False
        with contextlib.suppress(Exception):  # a polite goodbye; the server may be gone already
            async with asyncio.timeout(min(self.timeout, 1.0)):
                await self.command("QUIT")
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self.timeout, 1.0)):
                await self.writer.wait_closed()


def _data(content: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed, ending in ``CRLF.CRLF``."""
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        # SMTP has no bare CR or LF; a content that is already CRLF goes through byte for byte.
        content = _BARE_LINE_ENDING.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\n.", b"\n..") + b".\r\n"


def _header_section(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return content if end < 0 else content[:end]


class SMTPTransport:
    """Relays messages to one SMTP server (a smart host), reusing its connections.

    Each concurrent send uses a connection of its own; an idle one is reused for
    the next message, after an ``RSET``, and reopened if the server dropped it
    meanwhile. Commands are pipelined when the server offers PIPELINING; the body
    is sent byte for byte (dot-stuffed), with ``BODY=8BITMIME`` and ``SMTPUTF8``
    when the server offers them and the message needs them. Connections belong to
    the event loop that opened them: await :meth:`aclose` before that loop ends
    (a :class:`SenderWorker` does at the end of each run).

    Every reply is classified by ``classifier``; a failure of the connection (refused,
    dropped, timed out, STARTTLS or AUTH failing) is a 421 with an RFC 3463 code of
    4.4.1, 4.4.2 or 4.7.0, a soft bounce by default. A message whose envelope holds a
    control character (CR or LF could inject commands) is refused before anything is sent.

    Args:
        host, port: the smart host.
        starttls: upgrade every connection with STARTTLS; a server that does not offer it fails the send.
        username, password: log in with AUTH PLAIN or LOGIN after any STARTTLS.
        timeout: seconds for each command's reply (and each write).
        connect_timeout: seconds to connect and read the greeting; ``timeout`` by default.
        tls_context: the context for STARTTLS; certificates are verified against the
            system's CAs by default.
        verify: ``False`` accepts any certificate: for tests against a self-signed server only.
        tls_hostname: the name the certificate must carry; ``host`` by default.
        helo_name: the name given in EHLO; this machine's host name by default.
        classifier: turns replies into outcomes.
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        tls_context: ssl.SSLContext | None = None,
        verify: bool = True,
        tls_hostname: str | None = None,
        helo_name: str | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError("timeouts must be positive")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.host = host
        self.port = port
        self.starttls = starttls
        self.username = username
        self._password = password
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.tls_hostname = tls_hostname or host
        self.helo_name = helo_name or _local_name()
        self.classifier = classifier or Classifier()
        self._tls_context = tls_context
        self._verify = verify
        self._idle: list[_Connection] = []
        self.connections_opened = 0
        """How many connections it has opened (a reused one counts once)."""

    def __repr__(self) -> str:  # never shows the password
        return (
            f"SMTPTransport({self.host!r}, {self.port}, starttls={self.starttls}, username={self.username!r})"
        )

    # -- the Transport protocol -----------------------------------------------------

    async def send(self, message: Message) -> Outcome:
        """Deliver ``message`` once to the smart host; never raises for a delivery failure."""
        refused = self._refuse(message)
        if refused is not None:
            return refused
        for fresh in (False, True):  # a second try, on a new connection, only when a kept one was dead
            try:
                connection, reused = await self._acquire(fresh=fresh)
            except _SessionError as error:
                return self.classifier.classify(421, error.enhanced, error.text)
            except (OSError, TimeoutError) as error:
                return self.classifier.classify(421, _NO_ANSWER, _describe(error, "connecting"))
            try:
                outcome = await self._transaction(connection, message, reused)
            except _Stale:
                connection.abort()
                continue
            except _SessionError as error:
                connection.abort()
                return self.classifier.classify(421, error.enhanced, error.text)
            except (OSError, TimeoutError) as error:
                connection.abort()
                return self.classifier.classify(421, _BAD_CONNECTION, _describe(error, "sending"))
            except BaseException:  # cancelled mid-transaction: the session is in an unknown state
                connection.abort()
                raise
            self._put_back(connection)
            return outcome
        raise AssertionError("unreachable: a fresh connection is never stale")  # pragma: no cover

    async def aclose(self) -> None:
        """Say QUIT on idle connections and close them; the transport stays usable."""
        idle, self._idle = self._idle, []
        loop = asyncio.get_running_loop()
        for connection in idle:
            if connection.loop is not loop:
                connection.abort()
        await asyncio.gather(*(connection.quit() for connection in idle if connection.loop is loop))

    # -- connections ----------------------------------------------------------------

    async def _acquire(self, *, fresh: bool) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        while self._idle and not fresh:
            connection = self._idle.pop()
            if connection.loop is loop and connection.usable and not connection.reader.at_eof():
                return connection, True
            connection.abort()  # opened under another event loop (an earlier asyncio.run) or closed
        return await self._open(), False

    def _put_back(self, connection: _Connection) -> None:
        if connection.usable:
            self._idle.append(connection)
        else:
            connection.writer.close()

    async def _open(self) -> _Connection:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self.connections_opened += 1
        connection = _Connection(reader, writer, self.timeout)
        try:
            connection.timeout = self.connect_timeout
            greeting = await connection.reply()
            connection.timeout = self.timeout
            if greeting.code != 220:
                raise _SessionError(f"greeting: {greeting}", _NO_ANSWER)
            await connection.ehlo(self.helo_name)
            if self.starttls:
                await self._start_tls(connection)
            if self.username is not None:
                await self._login(connection)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _start_tls(self, connection: _Connection) -> None:
        if "STARTTLS" not in connection.extensions:
            raise _SessionError("the server does not offer STARTTLS", _SECURITY)
        reply = await connection.command("STARTTLS")
        if reply.code != 220:
            raise _SessionError(f"STARTTLS refused: {reply}", _SECURITY)
        try:
            await connection.writer.start_tls(
                self._context(), server_hostname=self.tls_hostname, ssl_handshake_timeout=self.timeout
            )
        except ssl.SSLError as error:
            raise _SessionError(f"TLS handshake failed: {error}", _SECURITY) from None
        await connection.ehlo(self.helo_name)  # RFC 3207: forget what was said before TLS

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            context = ssl.create_default_context()
            if not self._verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context
        return self._tls_context

    async def _login(self, connection: _Connection) -> None:
        assert self.username is not None
        assert self._password is not None
        mechanisms = connection.extensions.get("AUTH", "").upper().split()
        user, password = self.username.encode(), self._password.encode()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode()
            reply = await connection.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await connection.command("AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await connection.command(base64.b64encode(secret).decode())
        else:
            raise _SessionError(f"the server offers no AUTH PLAIN or LOGIN ({mechanisms})", _SECURITY)
        if reply.code != 235:
            # A refused login is the sender's configuration, not the recipient's: soft, whatever the code.
            raise _SessionError(f"AUTH failed: {reply}", _SECURITY)

    # -- one message ----------------------------------------------------------------

    def _refuse(self, message: Message) -> Outcome | None:
        if _CONTROL.search(message.mail_from):
            return self.classifier.classify(501, "5.1.7", "the envelope sender holds a control character")
        if _CONTROL.search(message.recipient):
            return self.classifier.classify(501, "5.1.3", "the envelope recipient holds a control character")
        return None

    def _mail_options(self, connection: _Connection, message: Message, data: bytes) -> list[str] | Outcome:
        extensions = connection.extensions
        options: list[str] = []
        if "SIZE" in extensions:
            limit = extensions["SIZE"].strip()
            if limit.isdigit() and 0 < int(limit) < len(data):
                return self.classifier.classify(
                    552, "5.3.4", f"the message is larger than the server's {limit}"
                )
            options.append(f"SIZE={len(data)}")
        if "8BITMIME" in extensions and not message.content.isascii():
            options.append("BODY=8BITMIME")
        envelope_ascii = message.mail_from.isascii() and message.recipient.isascii()
        if "SMTPUTF8" in extensions:
            if not envelope_ascii or not _header_section(message.content).isascii():
                options.append("SMTPUTF8")
        elif not envelope_ascii:
            return self.classifier.classify(553, "5.6.7", "the server does not offer SMTPUTF8")
        return options

    async def _transaction(self, connection: _Connection, message: Message, reused: bool) -> Outcome:
        data = _data(message.content)
        options = self._mail_options(connection, message, data)
        if not isinstance(options, list):
            return options
        mail = " ".join([f"MAIL FROM:<{message.mail_from}>", *options])
        commands = [*(["RSET"] if reused else []), mail, f"RCPT TO:<{message.recipient}>", "DATA"]
        if "PIPELINING" in connection.extensions:
            await connection.write("".join(f"{command}\r\n" for command in commands).encode())
            replies = []
            if reused:
                with _stale_if_broken():
                    replies.append(await connection.reply())
            replies += await connection.replies(3)
        else:
            replies = []
            for index, command in enumerate(commands):
                if index == 0 and reused:
                    with _stale_if_broken():
                        replies.append(await connection.command(command))
                else:
                    replies.append(await connection.command(command))
                if replies[-1].code >= 400:
                    break
        if reused:
            rset, *replies = replies
            if rset.code != 250:
                raise _Stale
        failure = next((reply for reply in replies[:2] if reply.code >= 300), None)
        data_reply = replies[2] if len(replies) == 3 else None
        if failure is None and data_reply is not None and data_reply.code == 354:
            await connection.write(data)
            return self._outcome(await connection.reply())
        if data_reply is not None and data_reply.code == 354:
            # A pipelining server that let DATA through after a refusal: end it empty (RFC 2920 3.1).
            await connection.write(b".\r\n")
            await connection.reply()
        return self._outcome(failure or data_reply or replies[-1])

    def _outcome(self, reply: _Reply) -> Outcome:
        lines = reply.text.split("\n")
        match = _ENHANCED.match(lines[0])
        # RFC 3463: the enhanced code's class repeats the reply's; one that does not is only text.
        enhanced = match[1] if match and match[1][0] == str(reply.code)[0] else None
        if enhanced is not None:
            lines = [line.removeprefix(enhanced).strip() for line in lines]
        # A 3xx where a final reply was due is soft by the table, like any other code.
        return self.classifier.classify(reply.code, enhanced, " ".join(line for line in lines if line))


@contextlib.contextmanager
def _stale_if_broken() -> Iterator[None]:
    try:
        yield None
    except (OSError, TimeoutError, _SessionError) as error:
        raise _Stale from error


def _describe(error: BaseException, doing: str) -> str:
    if isinstance(error, TimeoutError):
        return f"timed out {doing}"
    return f"{doing}: {error.__class__.__name__}: {error}"


def _local_name() -> str:
    name = socket.gethostname()
    return name if name and name.isascii() and "." in name else "localhost"
