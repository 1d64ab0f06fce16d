"""``SMTPTransport``: real SMTP to a smart host, on an asyncio protocol.

It is written on an :class:`asyncio.BufferedProtocol` rather than aiosmtplib or
smtplib: aiosmtplib has no PIPELINING and rewrites the message's line endings,
smtplib blocks a thread per connection; both were measured (``benchmarks/smtp.py``).
Nor on asyncio's streams, which cost more CPU a message (see :class:`_Connection`).
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
from collections import deque
from typing import Final, NamedTuple, cast

from ._errors import InvalidArgument
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
_BARE_CR = re.compile(rb"\r(?!\n)")
_DOT_AFTER_LINE_ENDING = re.compile(rb"\n\.")
_MAX_REPLY_LINES: Final = 100
_MAX_LINE: Final = 8192  # RFC 5321 allows 512 octets a reply line; this is to bound a hostile one
_READ_SIZE: Final = 4096  # replies are short; a longer one takes two reads


class _SessionError(Exception):
    """The session failed before or outside a mail transaction: a soft failure of the connection."""

    def __init__(self, text: str, enhanced: str = _BAD_CONNECTION) -> None:
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced


class _Stale(Exception):
    """A reused connection was found dead before any of the message was accepted."""


class _Reply(NamedTuple):
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class _Connection(asyncio.BufferedProtocol):
    """One SMTP session, as an asyncio protocol that parses replies as they arrive.

    A sender waits for the replies to a whole pipelined group at once and is woken
    once, when the last has come. Received bytes go into one buffer of the
    connection's own rather than a new one per read (asyncio's streams allocate
    256 KiB for each ``recv``, which glibc serves by ``mmap``: three system calls a
    read, more than the reading itself). A timeout is one timer handle per wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.extensions: dict[str, str] = {}
        self.usable = True
        self.dirty = False  # a transaction did not end cleanly: RSET before the next one
        self.received = 0  # replies parsed so far
        self._buffer = bytearray(_READ_SIZE)
        self._view = memoryview(self._buffer)
        self._partial = b""  # the start of a line whose end has not come yet
        self._lines: list[str] = []  # the lines so far of a multiline reply
        self._replies: deque[_Reply] = deque()
        self._error: Exception | None = None  # why no more replies will come
        self._wanted = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] = loop.create_future()

    # -- asyncio.BufferedProtocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view  # a view, not the bytearray: asyncio's TLS layer fills slices of it

    def buffer_updated(self, nbytes: int) -> None:
        if self._error is not None:
            return  # nothing more is read from a failed session: not even kept, so nothing grows
        data = self._view[:nbytes].tobytes()
        if self._partial:
            data = self._partial + data
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._line(data[start : end + 1])
            start = end + 1
        self._partial = data[start:]
        if len(self._partial) > _MAX_LINE:
            self._partial = b""
            self._fail(_SessionError("the server sent a line too long"))
        elif len(self._replies) > _MAX_REPLY_LINES:  # none awaited (an idle connection): a flood
            self._fail(_SessionError("the server sent replies to nothing"))
        if len(self._replies) >= self._wanted:
            _wake(self._waiter)

    def eof_received(self) -> bool:
        return False  # close: an SMTP server that stops sending is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or _SessionError("the server closed the connection"))
        _wake(self._drained)
        _wake(self._lost)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        _wake(self._drained)

    def _line(self, line: bytes) -> None:
        if self._error is not None:
            return
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in b" -\r\n":
            self._fail(_SessionError(f"the server sent a malformed reply: {line[:80]!r}"))
            return
        self._lines.append(line[4:].decode("utf-8", "replace").strip())
        if line[3:4] == b"-":
            if len(self._lines) >= _MAX_REPLY_LINES:
                self._fail(_SessionError("the server sent a reply of too many lines"))
            return
        reply = _Reply(int(line[:3]), "\n".join(self._lines))
        self._lines = []
        if reply.code == 421:  # the server is closing this session
            self.usable = False
        self._replies.append(reply)
        self.received += 1

    def _fail(self, error: Exception) -> None:
        self.usable = False
        if self._error is None:
            self._error = error
        _wake(self._waiter)

    # -- what a sender calls --------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Nothing unasked for has come, and the session is open, on the running loop."""
        return (
            self.usable
            and not self._replies
            and not self._partial
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def replies(self, count: int, timeout: float | None = None) -> list[_Reply]:
        """The next ``count`` replies (to pipelined commands), waiting at most ``timeout`` (by
        default the connection's) for them all."""
        if len(self._replies) < count and self._error is None:
            self._wanted = count
            waiter = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout or self.timeout, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
                self._wanted = 0
        if len(self._replies) < count:
            assert self._error is not None
            raise self._error
        replies = self._replies
        return [replies.popleft() for _ in range(count)]

    async def reply(self, timeout: float | None = None) -> _Reply:
        (reply,) = await self.replies(1, timeout)
        return reply

    async def write(self, data: bytes) -> None:
        """Send ``data``; wait (at most ``timeout``) only when the transport's buffer is full.

        A connection that is gone sends nothing: what the server said before it
        went, or why it went, comes with the next reply awaited.
        """
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self._paused:
            waiter = self._drained = self.loop.create_future()
            timer = self.loop.call_later(self.timeout, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._drained = None

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

    def unread(self) -> bool:
        """Whether the server has sent anything not yet read."""
        return bool(self._replies or self._partial or self._lines)

    def pending(self) -> list[_Reply]:
        """The replies that came but were not read (those of a group that failed before its end)."""
        return list(self._replies)

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        assert self.transport is not None
        transport = await self.loop.start_tls(
            self.transport, self, context, server_hostname=server_hostname, ssl_handshake_timeout=timeout
        )
        self.transport = cast(asyncio.Transport, transport)

    def abort(self) -> None:
        self.usable = False
        if self.transport is not None:
            with contextlib.suppress(Exception):  # the loop may already be closed
                self.transport.abort()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    async def quit(self) -> None:
        self.usable = False
        self.timeout = min(self.timeout, 1.0)
        with contextlib.suppress(Exception):  # a polite goodbye; the server may be gone already
            await self.command("QUIT")
        self.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._lost)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _data(content: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed, ending in ``CRLF.CRLF``."""
    # As many CRs as LFs, each CR followed by an LF: every line ends in CRLF, and the content
    # goes through byte for byte (three scans, each faster than one count of b"\r\n").
    if content.count(b"\r") != content.count(b"\n") or _BARE_CR.search(content):
        content = _BARE_LINE_ENDING.sub(b"\r\n", content)  # SMTP has no bare CR or LF
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b"."):
        content = b"." + content
    if _DOT_AFTER_LINE_ENDING.search(content):  # rare; a regex finds it faster than replace looks
        content = content.replace(b"\n.", b"\n..")
    return content + b".\r\n"


def _header_section(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return content if end < 0 else content[:end]


class SMTPTransport:
    """Relays messages to one SMTP server (a smart host), reusing its connections.

    Each concurrent send uses a connection of its own; an idle one is reused for
    the next message (after an ``RSET`` only when the last transaction did not
    end), and the message is sent again on a new connection if the server had
    dropped the kept one before accepting any of it. Commands are pipelined when
    the server offers PIPELINING; the body is sent byte for byte (dot-stuffed),
    with ``BODY=8BITMIME`` and ``SMTPUTF8`` when the server offers them and the
    message needs them. Connections belong to the event loop that opened them:
    await :meth:`aclose` before that loop ends (a :class:`SenderWorker` does at
    the end of each run).

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
        data_timeout: seconds for the reply to the end of a message's data: 10 minutes by
            default, as RFC 5321 (4.5.3.2.6) asks, since a server may scan the message before
            it answers, and giving up sooner risks sending it twice.
        tls_context: the context for STARTTLS; certificates are verified against the
            system's CAs by default.
        verify: ``False`` accepts any certificate: for tests against a self-signed server only
            (with the default context; a ``tls_context`` of your own says what it verifies).
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
        data_timeout: float = 600.0,
        tls_context: ssl.SSLContext | None = None,
        verify: bool = True,
        tls_hostname: str | None = None,
        helo_name: str | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        if timeout <= 0 or data_timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise InvalidArgument("timeouts must be positive")
        if (username is None) != (password is None):
            raise InvalidArgument("give both username and password, or neither")
        if tls_context is not None and not verify:
            raise InvalidArgument("verify=False relaxes the default context: relax the tls_context you give")
        self.host = host
        self.port = port
        self.starttls = starttls
        self.username = username
        self._password = password
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.data_timeout = data_timeout
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
            if connection.loop is loop and connection.reusable:
                return connection, True
            connection.abort()  # opened under another event loop (an earlier asyncio.run), or closed
        return await self._open(loop), False

    def _put_back(self, connection: _Connection) -> None:
        if connection.usable:
            self._idle.append(connection)
        else:
            connection.close()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        async with asyncio.timeout(self.connect_timeout):
            _, connection = await loop.create_connection(
                lambda: _Connection(loop, self.connect_timeout), self.host, self.port
            )
        self.connections_opened += 1
        try:
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
        if connection.unread():
            # Said in clear after the 220, it would be read as if it came under TLS (CVE-2011-0411).
            raise _SessionError("the server sent more than its reply to STARTTLS", _SECURITY)
        try:
            await connection.start_tls(self._context(), self.tls_hostname, self.timeout)
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
        # After a transaction that ended, the server is ready for the next (RFC 5321 4.1.1.4);
        # after one that did not (a refused RCPT leaves the MAIL in force), RSET first.
        rset = connection.dirty
        commands = [*(["RSET"] if rset else []), mail, f"RCPT TO:<{message.recipient}>", "DATA"]
        connection.dirty = True
        received = connection.received
        try:
            if "PIPELINING" in connection.extensions:
                await connection.write("".join(f"{command}\r\n" for command in commands).encode())
                replies = await connection.replies(len(commands))
            else:
                replies = []
                for command in commands:
                    replies.append(await connection.command(command))
                    if replies[-1].code >= 400:
                        break
        except (OSError, TimeoutError, _SessionError):
            # A pipelined group's replies that came before the failure are still unread: a server
            # may answer the first command with 421 and hang up at once, without the rest.
            came = connection.pending()
            connection.usable = False
            first = came[0].code if came else None
            if reused and (
                connection.received == received  # a kept connection that died meanwhile
                or first == 421  # the server closed the kept session (an idle timeout)
                or (rset and first is not None and first != 250)
            ):
                raise _Stale from None  # nothing was accepted: send it again on a new connection
            refusal = next((reply for reply in came if reply.code >= 400), None)
            if refusal is not None:
                return self._outcome(refusal)  # what the server said before it went
            raise
        if reused and replies[0].code == 421:
            raise _Stale  # the server closed the kept session (an idle timeout): nothing was accepted
        if rset:
            if replies[0].code != 250:
                raise _Stale
            replies = replies[1:]
        failure = next((reply for reply in replies[:2] if reply.code >= 300), None)
        data_reply = replies[2] if len(replies) == 3 else None
        if data_reply is not None and data_reply.code < 400 and data_reply.code != 354:
            # Neither "go ahead" nor a refusal: not a word of the message went, whatever the code
            # says (a 250 here is no delivery), and where the session stands is unknown.
            connection.usable = False
            if failure is None:
                raise _SessionError(f"the server answered DATA with {data_reply}")
        if failure is None and data_reply is not None and data_reply.code == 354:
            await connection.write(data)
            final = await connection.reply(self.data_timeout)
            connection.dirty = False
            return self._outcome(final)
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


def _describe(error: BaseException, doing: str) -> str:
    if isinstance(error, TimeoutError):
        return f"timed out {doing}"
    return f"{doing}: {error.__class__.__name__}: {error}"


def _local_name() -> str:
    name = socket.gethostname()
    return name if name and name.isascii() and "." in name else "localhost"
