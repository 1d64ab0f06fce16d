"""Real SMTP servers on loopback for the SMTP tests: aiosmtpd with a recording, scriptable handler.

A test scripts replies per recipient (at RCPT or at the end of DATA), a delay, or a
dropped connection, and reads back what the server received. ``RawServer`` is a
hand-written server for what aiosmtpd cannot be made to do (insisting on PIPELINING).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.frozen
class Received:
    """One message the server accepted.

    Attributes:
        mail_from, rcpt_tos: the envelope.
        content: the message as received, dot-unstuffed.
        mail_options: the parameters of MAIL FROM (``BODY=8BITMIME``, ``SMTPUTF8``, ``SIZE=…``).
        tls: whether the session was under STARTTLS.
        login: the user that logged in, if any.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...]
    tls: bool
    login: str | None


class RecordingHandler:
    """An aiosmtpd handler that records each message and answers as scripted.

    Attributes:
        rcpt_replies: recipient -> the reply to its RCPT (``"450 4.2.1 Busy"``).
        data_replies: recipient -> the reply at the end of DATA.
        data_delay: seconds to wait before answering the end of DATA.
        drop: recipients whose DATA is answered by closing the connection.
        pipelining: advertise PIPELINING in the EHLO reply.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: dict[str, str] = {}
        self.data_delay = 0.0
        self.drop: set[str] = set()
        self.pipelining = False
        self.ehlos = 0
        self.rsets = 0
        self.data_started = threading.Event()
        self._lock = threading.Lock()

    async def handle_EHLO(
        self, server: SMTPServer, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.ehlos += 1
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.rsets += 1
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        recipient = envelope.rcpt_tos[0]
        if recipient in self.drop:
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 never heard"
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        reply = self.data_replies.get(recipient, "250 2.0.0 OK queued")
        if reply.startswith("250"):
            login = session.auth_data
            with self._lock:
                self.received.append(
                    Received(
                        mail_from=envelope.mail_from or "",
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        content=bytes(envelope.original_content or b""),
                        mail_options=tuple(envelope.mail_options),
                        tls=session.ssl is not None,
                        login=_login(login),
                    )
                )
        return reply


def _login(data: object) -> str | None:
    return data.login.decode() if isinstance(data, LoginPassword) else None


def authenticator(users: dict[str, str]) -> Callable[..., AuthResult]:
    def check(
        server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and users.get(data.login.decode()) == data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=data)

    return check


@contextmanager
def smtp_server(handler: RecordingHandler, **parameters: Any) -> Iterator[int]:
    """Run aiosmtpd on a free loopback port for the duration; yield the port."""
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **parameters)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def raw_server(script: Script) -> Iterator[int]:
    """Run ``script`` for each connection on a free loopback port, in a thread of its own."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: list[asyncio.Server] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.transport.abort()

    async def serve() -> None:
        server.append(await asyncio.start_server(session, "127.0.0.1", 0))
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert started.wait(10)
    try:
        yield server[0].sockets[0].getsockname()[1]
    finally:

        async def shut() -> None:
            server[0].close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server[0].wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1 from a fresh CA, and a client context trusting it."""
    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client
