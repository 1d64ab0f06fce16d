"""SMTPTransport against real SMTP servers on loopback (SPEC sections 4 and 7)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import pytest
from smtp_server import RecordingHandler, authenticator, free_port, raw_server, smtp_server, tls_contexts

import senderqueue as sq

T0 = datetime(2030, 1, 1, tzinfo=UTC)
CONTENT = b"From: news@shop.example\r\nSubject: hi\r\n\r\nhello\r\n"


def message(
    recipient: str = "ann@example.com", content: bytes = CONTENT, mail_from: str = "news@shop.example"
) -> sq.Message:
    return sq.Message(
        id=f"id-{recipient}",
        mailing="m",
        sender="s",
        recipient=recipient,
        mail_from=mail_from,
        content=content,
        state=sq.State.SENDING,
        frozen_from=None,
        attempts=1,
        next_attempt_at=T0,
        last_error=None,
        created_at=T0,
        updated_at=T0,
    )


def send_all(transport: sq.SMTPTransport, messages: Sequence[sq.Message]) -> list[sq.Outcome]:
    async def run() -> list[sq.Outcome]:
        try:
            return [await transport.send(m) for m in messages]
        finally:
            await transport.aclose()

    return asyncio.run(run())


def send(transport: sq.SMTPTransport, msg: sq.Message) -> sq.Outcome:
    (outcome,) = send_all(transport, [msg])
    return outcome


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture(params=[False, True], ids=["plain", "pipelining"])
def port(request: pytest.FixtureRequest, handler: RecordingHandler) -> Iterator[int]:
    handler.pipelining = request.param
    with smtp_server(handler, enable_SMTPUTF8=True) as port:
        yield port


def test_is_a_transport() -> None:
    assert isinstance(sq.SMTPTransport("127.0.0.1", 25), sq.Transport)


def test_delivers_and_the_server_records_it(port: int, handler: RecordingHandler) -> None:
    outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message())
    assert outcome == sq.Delivered(code=250, enhanced="2.0.0", text="OK queued")
    (received,) = handler.received
    assert received.mail_from == "news@shop.example"
    assert received.rcpt_tos == ("ann@example.com",)
    assert received.content == CONTENT
    assert not received.tls


def test_content_is_byte_exact_through_dot_stuffing(port: int, handler: RecordingHandler) -> None:
    content = b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\n. \r\nmiddle . dot\r\n.\r\n"
    assert (
        type(send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message(content=content))) is sq.Delivered
    )
    assert handler.received[0].content == content


def test_bare_line_endings_become_crlf(port: int, handler: RecordingHandler) -> None:
    # SMTP has no bare LF or CR; a content with them arrives with CRLF, its dots still stuffed.
    send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message(content=b"Subject: x\n\n.a\rb"))
    assert handler.received[0].content == b"Subject: x\r\n\r\n.a\r\nb\r\n"


def test_8bit_content_asks_for_8bitmime_only_when_needed(port: int, handler: RecordingHandler) -> None:
    latin = b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9 cr\xc3\xa8me\r\n"
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    send_all(transport, [message("a@example.com"), message("b@example.com", content=latin)])
    plain, eight = handler.received
    assert "BODY=8BITMIME" not in plain.mail_options
    assert "BODY=8BITMIME" in eight.mail_options
    assert "SMTPUTF8" in eight.mail_options  # UTF-8 in the headers (RFC 6532)
    assert eight.content == latin
    assert any(option.startswith("SIZE=") for option in eight.mail_options)


def test_utf8_addresses_ask_for_smtputf8(port: int, handler: RecordingHandler) -> None:
    outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message("jürgen@bücher.example"))
    assert type(outcome) is sq.Delivered
    (received,) = handler.received
    assert received.rcpt_tos == ("jürgen@bücher.example",)
    assert "SMTPUTF8" in received.mail_options


def test_utf8_addresses_hard_bounce_without_smtputf8(handler: RecordingHandler) -> None:
    with smtp_server(handler, enable_SMTPUTF8=False) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message("jürgen@bücher.example"))
    assert type(outcome) is sq.HardBounce
    assert (outcome.code, outcome.enhanced) == (553, "5.6.7")
    assert handler.received == []


@pytest.mark.parametrize(
    ("recipient", "mail_from"),
    [
        ("ann@example.com>\r\nRCPT TO:<evil@attacker.example", "news@shop.example"),
        ("ann@example.com\nDATA", "news@shop.example"),
        ("ann@example.com", "news@shop.example>\r\nRCPT TO:<evil@attacker.example"),
        ("ann@example.com\x00", "news@shop.example"),
    ],
    ids=["crlf-recipient", "lf-recipient", "crlf-sender", "nul"],
)
def test_an_envelope_that_could_inject_is_refused_before_sending(
    handler: RecordingHandler, recipient: str, mail_from: str
) -> None:
    with smtp_server(handler) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
        outcome = send(transport, message(recipient, mail_from=mail_from))
    assert type(outcome) is sq.HardBounce
    assert outcome.code == 501
    assert transport.connections_opened == 0
    assert handler.ehlos == 0
    assert handler.received == []


def test_connections_are_reused_without_rset_after_a_finished_transaction(
    port: int, handler: RecordingHandler
) -> None:
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    outcomes = send_all(transport, [message(f"u{i}@example.com") for i in range(5)])
    assert all(type(o) is sq.Delivered for o in outcomes)
    assert transport.connections_opened == 1
    assert handler.ehlos == 1
    assert handler.rsets == 0  # the end of DATA ends the transaction (RFC 5321 4.1.1.4), as smtplib does
    assert [r.rcpt_tos for r in handler.received] == [(f"u{i}@example.com",) for i in range(5)]


def test_a_transaction_that_did_not_finish_is_reset_before_the_next(
    port: int, handler: RecordingHandler
) -> None:
    # A refused RCPT leaves the MAIL in force: without RSET the next MAIL would be "nested".
    handler.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    recipients = ["gone@example.com", "a@example.com", "b@example.com"]
    gone, a, b = send_all(transport, [message(r) for r in recipients])
    assert type(gone) is sq.HardBounce
    assert (type(a), type(b)) == (sq.Delivered, sq.Delivered)
    assert handler.rsets == 1
    assert transport.connections_opened == 1


def test_concurrent_sends_use_a_connection_each(port: int, handler: RecordingHandler) -> None:
    handler.data_delay = 0.05  # keeps the five sends overlapping
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)

    async def run() -> list[sq.Outcome]:
        try:
            return await asyncio.gather(*(transport.send(message(f"u{i}@example.com")) for i in range(5)))
        finally:
            await transport.aclose()

    assert all(type(o) is sq.Delivered for o in asyncio.run(run()))
    assert transport.connections_opened == 5
    assert len(handler.received) == 5


def test_a_connection_that_was_closed_while_idle_is_not_reused(handler: RecordingHandler) -> None:
    transport = sq.SMTPTransport("127.0.0.1", free_port(), timeout=5)
    with smtp_server(handler) as port:
        transport.port = port

        async def run() -> list[sq.Outcome]:
            first = await transport.send(message("a@example.com"))
            for connection in transport._idle:
                connection.abort()
            second = await transport.send(message("b@example.com"))
            await transport.aclose()
            return [first, second]

        outcomes = asyncio.run(run())
    assert [type(o) for o in outcomes] == [sq.Delivered, sq.Delivered]
    assert transport.connections_opened == 2
    assert len(handler.received) == 2


@pytest.mark.parametrize("goodbye", [b"", b"421 4.4.2 Idle too long, closing\r\n"], ids=["silent", "421"])
def test_a_kept_connection_the_server_drops_at_the_next_message_is_replaced(goodbye: bytes) -> None:
    """The server hangs up on the second message of a session: it is sent again on a new connection."""
    sessions: list[list[bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(lines := [])
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            if len(sessions) == 1 and [x[:4] for x in lines].count(b"MAIL") == 2:
                writer.write(goodbye)
                await writer.drain()
                return  # the server closes the connection
            if line.startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
                continue
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            await writer.drain()

    with raw_server(script) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=2)
        outcomes = send_all(transport, [message("a@example.com"), message("b@example.com")])
    assert outcomes == [sq.Delivered(code=250, enhanced="2.0.0", text="queued")] * 2
    assert transport.connections_opened == 2
    first, second = ([line.split()[0] for line in session] for session in sessions)
    assert first == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL"]  # no RSET: the DATA ended the first
    assert second == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


@pytest.mark.parametrize("reads_the_group", [True, False], ids=["reads-the-group", "hangs-up-at-once"])
def test_a_kept_pipelining_connection_answered_421_and_closed_is_replaced(reads_the_group: bool) -> None:
    """A server that says 421 to the first command of a pipelined group and hangs up, the rest unanswered."""
    sessions: list[list[bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(lines := [])
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            if line.startswith(b"EHLO"):
                writer.write(b"250-raw\r\n250 PIPELINING\r\n")
            elif len(sessions) == 1 and [x[:4] for x in lines].count(b"MAIL") == 2:
                if reads_the_group:
                    lines += [await reader.readline(), await reader.readline()]
                writer.write(b"421 4.4.2 Idle too long, closing\r\n")
                writer.close()
                await writer.wait_closed()
                return
            elif line.startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            await writer.drain()

    with raw_server(script) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=2)
        outcomes = send_all(transport, [message("a@example.com"), message("b@example.com")])
    assert outcomes == [sq.Delivered(code=250, enhanced="2.0.0", text="queued")] * 2
    assert transport.connections_opened == 2


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            b"554 5.7.1 Your IP is on a block list",
            sq.HardBounce(code=554, enhanced="5.7.1", text="Your IP is on a block list"),
        ),
        (
            b"421 4.7.0 Too many messages, closing",
            sq.SoftBounce(code=421, enhanced="4.7.0", text="Too many messages, closing"),
        ),
    ],
    ids=["554", "421"],
)
def test_what_a_pipelining_server_said_before_hanging_up_is_the_outcome(
    reply: bytes, expected: sq.Outcome
) -> None:
    """Its reply to MAIL came, then the end of the connection: the reply is classified, not the end."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        for _ in range(3):  # MAIL, RCPT, DATA
            await reader.readline()
        writer.write(reply + b"\r\n")
        writer.close()
        await writer.wait_closed()

    with raw_server(script) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=2)
        outcome = send(transport, message())
    assert outcome == expected
    assert transport._idle == []


@pytest.mark.parametrize("after_the_dot", ["drop", "stall"])
def test_a_kept_connection_failing_after_the_data_is_a_soft_bounce_not_a_resend(after_the_dot: str) -> None:
    """Once the final dot has gone the server may have accepted the message: never send it again."""
    bodies: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-raw\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                bodies.append(await reader.readuntil(b"\r\n.\r\n"))
                if len(bodies) == 2:  # the second message of the session: no reply to its dot
                    if after_the_dot == "stall":
                        await asyncio.sleep(30)
                    return
                writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            await writer.drain()

    with raw_server(script) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=0.5, data_timeout=0.5)
        first, second = send_all(transport, [message("a@example.com"), message("b@example.com")])
    assert type(first) is sq.Delivered
    assert type(second) is sq.SoftBounce
    assert (second.code, second.enhanced) == (421, "4.4.2")
    assert len(bodies) == 2  # the second was not sent again on a new connection
    assert transport.connections_opened == 1


@pytest.mark.parametrize(
    "flood", [b"x" * 1_000_000, b"250 unasked\r\n" * 80_000], ids=["one-endless-line", "many-replies"]
)
def test_what_a_server_floods_an_idle_connection_with_is_not_kept(flood: bytes) -> None:
    """A kept connection reads whatever comes; once it is not SMTP it stops keeping it (memory, CPU)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # the connection is idle, kept for the next message
                writer.write(flood)
                writer.close()
                await writer.wait_closed()  # all of it sent before the end of the connection
                return
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            await writer.drain()

    transport = sq.SMTPTransport("127.0.0.1", 25, timeout=2)

    async def run() -> tuple[list[sq.Outcome], int]:
        try:
            first = await transport.send(message("a@example.com"))
            (kept,) = transport._idle
            await asyncio.wait_for(kept._lost, 10)  # the whole flood has come, then the end
            held = len(kept._partial) + sum(len(reply.text) for reply in kept._replies)
            second = await transport.send(message("b@example.com"))
            return [first, second], held
        finally:
            await transport.aclose()

    with raw_server(script) as port:
        transport.port = port
        outcomes, held = asyncio.run(run())
    assert held < 100_000  # of a megabyte
    assert [type(o) for o in outcomes] == [sq.Delivered, sq.Delivered]
    assert transport.connections_opened == 2


def test_runs_on_uvloop(port: int, handler: RecordingHandler) -> None:
    # uvloop's transports are not asyncio.Transport subclasses. tox installs it; CI must run this.
    try:
        import uvloop
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and uvloop is not installed", pytrace=False)
        pytest.skip("!!! NOT TESTED: uvloop is not installed")
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)

    async def run() -> list[sq.Outcome]:
        try:
            return [await transport.send(message(f"u{i}@example.com")) for i in range(3)]
        finally:
            await transport.aclose()

    assert [type(o) for o in uvloop.run(run())] == [sq.Delivered] * 3
    assert transport.connections_opened == 1
    assert len(handler.received) == 3


# -- classification of replies (one table, overridable) ----------------------------------


def test_scripted_replies_per_recipient(port: int, handler: RecordingHandler) -> None:
    handler.rcpt_replies = {
        "busy@example.com": "450 4.2.1 Mailbox busy",
        "gone@example.com": "550 5.1.1 No such user",
        "grey@example.com": "451 4.7.1 Greylisted, come back later",
    }
    handler.data_replies = {
        "full@example.com": "552 5.2.2 Mailbox full",
        "spam@example.com": "554 5.7.1 Rejected as spam",
        "later@example.com": "421 4.3.2 System shutting down",
    }
    recipients = ["busy", "gone", "grey", "full", "spam", "ok", "later", "ok2"]
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    outcomes = send_all(transport, [message(f"{r}@example.com") for r in recipients])
    assert outcomes == [
        sq.SoftBounce(code=450, enhanced="4.2.1", text="Mailbox busy"),
        sq.HardBounce(code=550, enhanced="5.1.1", text="No such user"),
        sq.SoftBounce(code=451, enhanced="4.7.1", text="Greylisted, come back later"),
        sq.SoftBounce(code=552, enhanced="5.2.2", text="Mailbox full"),  # DEFAULT_EXCEPTIONS: retry
        sq.HardBounce(code=554, enhanced="5.7.1", text="Rejected as spam"),
        sq.Delivered(code=250, enhanced="2.0.0", text="OK queued"),
        sq.SoftBounce(code=421, enhanced="4.3.2", text="System shutting down"),
        sq.Delivered(code=250, enhanced="2.0.0", text="OK queued"),
    ]
    assert [r.rcpt_tos for r in handler.received] == [("ok@example.com",), ("ok2@example.com",)]
    # A refusal leaves the connection usable; the server's 421 closes it.
    assert transport.connections_opened == 2


def test_the_user_overrides_the_table(port: int, handler: RecordingHandler) -> None:
    handler.rcpt_replies = {
        "gone@example.com": "550 5.1.1 No such user",
        "odd@example.com": "452 4.5.3 Too many",
    }
    classifier = sq.Classifier(exceptions={**sq.DEFAULT_EXCEPTIONS, "5.1.1": "soft", "452": "hard"})
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5, classifier=classifier)
    gone, odd = send_all(transport, [message("gone@example.com"), message("odd@example.com")])
    assert gone == sq.SoftBounce(code=550, enhanced="5.1.1", text="No such user")
    assert odd == sq.HardBounce(code=452, enhanced="4.5.3", text="Too many")
    # The enhanced code is looked up before the reply code.
    classifier = sq.Classifier(exceptions={"452": "hard", "4.5.3": "soft"})
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5, classifier=classifier)
    assert type(send(transport, message("odd@example.com"))) is sq.SoftBounce


# -- connection failures are soft -------------------------------------------------------


def test_a_refused_connection_is_a_soft_bounce() -> None:
    outcome = send(sq.SMTPTransport("127.0.0.1", free_port(), timeout=5), message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.4.1")


def test_connection_failures_can_be_reclassified() -> None:
    classifier = sq.Classifier(exceptions={"4.4.1": "hard"})
    outcome = send(sq.SMTPTransport("127.0.0.1", free_port(), timeout=5, classifier=classifier), message())
    assert type(outcome) is sq.HardBounce


def test_a_connection_dropped_mid_data_is_a_soft_bounce(port: int, handler: RecordingHandler) -> None:
    handler.drop = {"drop@example.com"}
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    dropped, after = send_all(transport, [message("drop@example.com"), message("ok@example.com")])
    assert type(dropped) is sq.SoftBounce
    assert (dropped.code, dropped.enhanced) == (421, "4.4.2")
    assert type(after) is sq.Delivered  # a new connection for the next message
    assert [r.rcpt_tos for r in handler.received] == [("ok@example.com",)]


def test_a_server_dropping_after_part_of_the_data_is_a_soft_bounce() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                await writer.drain()
                await reader.read(10)  # a few bytes of the message, then hang up
                writer.close()
                return
            writer.write(b"250 ok\r\n")
            await writer.drain()

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message(content=CONTENT * 1000))
    assert type(outcome) is sq.SoftBounce
    assert outcome.code == 421


def test_a_server_that_stalls_past_the_timeout_is_a_soft_bounce(port: int, handler: RecordingHandler) -> None:
    handler.data_delay = 30
    outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5, data_timeout=0.5), message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.4.2")
    assert "timed out" in outcome.text


def test_the_end_of_the_data_has_a_timeout_of_its_own(port: int, handler: RecordingHandler) -> None:
    """A server that scans the message before it answers the final dot is waited for (RFC 5321
    4.5.3.2.6: 10 minutes by default), longer than any other reply."""
    handler.data_delay = 1.0
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=0.3)
    assert transport.data_timeout == 600
    assert type(send(transport, message())) is sq.Delivered
    assert len(handler.received) == 1


def test_a_silent_greeting_times_out_as_a_soft_bounce() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5, connect_timeout=0.3), message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.4.1")


def test_a_server_that_stops_reading_times_out_the_write(handler: RecordingHandler) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            writer.write(b"354 go on\r\n" if line.startswith(b"DATA") else b"250 ok\r\n")
            if line.startswith(b"DATA"):
                await asyncio.sleep(30)  # reads no more: the client's buffers fill up

    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 30_000  # 30 MB
    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=0.5), message(content=big))
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.4.2")
    assert "timed out" in outcome.text


def test_plaintext_after_the_starttls_reply_is_refused() -> None:
    """What a server (or a man in the middle) says in clear after 220 must not pass as said under TLS."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-raw\r\n250 STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"STARTTLS")
        writer.write(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await reader.read()

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, starttls=True, verify=False, timeout=2), message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.7.0")
    assert "STARTTLS" in outcome.text


def test_replies_that_come_a_byte_at_a_time() -> None:
    """Replies, multiline ones too, split across reads anywhere: the parser joins them."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(data: bytes) -> None:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)

        await say(b"220-raw ESMTP\r\n220 welcome\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                await say(b"250-raw\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif line.startswith(b"DATA"):
                await say(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                await say(b"250-2.0.0 queued\r\n250 2.0.0 as 12345\r\n")
            else:
                await say(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=2), message())
    assert outcome == sq.Delivered(code=250, enhanced="2.0.0", text="queued as 12345")


@pytest.mark.parametrize(
    "greeting",
    [b"220 " + b"x" * 100_000 + b"\r\n", b"220 hello\r\nhello?\r\n", b"220-a\r\n" * 200 + b"220 b\r\n"],
    ids=["endless-line", "not-a-reply", "endless-reply"],
)
def test_a_server_that_does_not_speak_smtp_is_a_soft_bounce(greeting: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await reader.read()

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=2), message())
    assert type(outcome) is sq.SoftBounce
    assert outcome.code == 421


def test_pipelining_sends_the_envelope_in_one_go() -> None:
    """The server answers nothing until MAIL, RCPT and DATA have all come: only pipelining passes."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        assert (await reader.readline()).startswith(b"EHLO")
        writer.write(b"250-raw\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        envelope = [await reader.readline() for _ in range(3)]
        seen.extend(envelope)
        writer.write(b"250 2.1.0 sender ok\r\n250 2.1.5 rcpt ok\r\n354 go on\r\n")
        body = await reader.readuntil(b"\r\n.\r\n")
        seen.append(body)
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        await reader.readline()  # QUIT
        writer.write(b"221 bye\r\n")
        writer.close()

    with raw_server(script) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=2), message())
    assert outcome == sq.Delivered(code=250, enhanced="2.0.0", text="queued")
    assert [line.split(b":")[0] for line in seen[:3]] == [b"MAIL FROM", b"RCPT TO", b"DATA\r\n"]
    assert seen[3] == CONTENT + b".\r\n"


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "plain"])
@pytest.mark.parametrize("data_reply", [b"250 2.0.0 OK", b"334 what"])
def test_data_answered_with_neither_354_nor_a_refusal_is_no_delivery(
    data_reply: bytes, pipelining: bool
) -> None:
    """A 250 to DATA itself would read as delivered, but no byte of the message went."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        while line := await reader.readline():
            seen.append(line)
            if line.startswith(b"EHLO"):
                writer.write(b"250-raw\r\n250 PIPELINING\r\n" if pipelining else b"250 raw\r\n")
            elif line.startswith(b"DATA"):
                writer.write(data_reply + b"\r\n")
            else:
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

    with raw_server(script) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=1)
        outcome = send(transport, message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.4.2")
    assert data_reply.decode() in outcome.text
    assert [line.split()[0] for line in seen] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]  # no body, no QUIT
    assert transport._idle == []


def test_a_message_over_the_servers_size_is_a_hard_bounce_unsent(handler: RecordingHandler) -> None:
    with smtp_server(handler, data_size_limit=100) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, timeout=5), message(content=CONTENT * 10))
    assert type(outcome) is sq.HardBounce
    assert (outcome.code, outcome.enhanced) == (552, "5.3.4")
    assert handler.received == []


# -- STARTTLS and AUTH ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return tls_contexts()


def test_starttls_with_a_verified_certificate(
    handler: RecordingHandler, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = tls
    with smtp_server(handler, tls_context=server_context, require_starttls=True) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, starttls=True, tls_context=client_context, timeout=5)
        outcomes = send_all(transport, [message("a@example.com"), message("b@example.com")])
    assert [type(o) for o in outcomes] == [sq.Delivered, sq.Delivered]
    assert [r.tls for r in handler.received] == [True, True]
    assert transport.connections_opened == 1
    assert handler.ehlos == 2  # once before STARTTLS, once after


def test_starttls_refuses_an_unknown_certificate_by_default(
    handler: RecordingHandler, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, _ = tls
    with smtp_server(handler, tls_context=server_context, require_starttls=True) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, starttls=True, timeout=5), message())
    assert type(outcome) is sq.SoftBounce
    assert (outcome.code, outcome.enhanced) == (421, "4.7.0")
    assert "certificate" in outcome.text.lower()
    assert handler.received == []


def test_starttls_verification_can_be_relaxed_for_tests(
    handler: RecordingHandler, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, _ = tls
    with smtp_server(handler, tls_context=server_context, require_starttls=True) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, starttls=True, verify=False, timeout=5), message())
    assert type(outcome) is sq.Delivered
    assert handler.received[0].tls


def test_starttls_not_offered_is_a_soft_bounce(handler: RecordingHandler) -> None:
    with smtp_server(handler) as port:
        outcome = send(sq.SMTPTransport("127.0.0.1", port, starttls=True, timeout=5), message())
    assert type(outcome) is sq.SoftBounce
    assert outcome.enhanced == "4.7.0"
    assert handler.received == []


# aiosmtpd warns of AUTH without TLS: these tests do it on purpose, on loopback.
AUTH_WITHOUT_TLS = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


@AUTH_WITHOUT_TLS
def test_auth_logs_in(handler: RecordingHandler) -> None:
    with smtp_server(
        handler,
        authenticator=authenticator({"relay-user": "s3cret pa:ss"}),
        auth_require_tls=False,
        auth_required=True,
    ) as port:
        transport = sq.SMTPTransport(
            "127.0.0.1", port, username="relay-user", password="s3cret pa:ss", timeout=5
        )
        outcome = send(transport, message())
    assert type(outcome) is sq.Delivered
    assert handler.received[0].login == "relay-user"


def test_auth_over_starttls(handler: RecordingHandler, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    with smtp_server(
        handler,
        tls_context=server_context,
        require_starttls=True,
        authenticator=authenticator({"relay-user": "pw"}),
        auth_required=True,
    ) as port:
        transport = sq.SMTPTransport(
            "127.0.0.1",
            port,
            starttls=True,
            tls_context=client_context,
            username="relay-user",
            password="pw",
            timeout=5,
        )
        outcome = send(transport, message())
    assert type(outcome) is sq.Delivered
    assert (handler.received[0].tls, handler.received[0].login) == (True, "relay-user")


@AUTH_WITHOUT_TLS
def test_a_refused_login_is_a_soft_bounce_that_never_shows_the_password(handler: RecordingHandler) -> None:
    with smtp_server(
        handler,
        authenticator=authenticator({"relay-user": "right"}),
        auth_require_tls=False,
        auth_required=True,
    ) as port:
        transport = sq.SMTPTransport("127.0.0.1", port, username="relay-user", password="wrong-pw", timeout=5)
        outcome = send(transport, message())
    assert type(outcome) is sq.SoftBounce  # the sender's configuration, not the recipient's fault
    assert (outcome.code, outcome.enhanced) == (421, "4.7.0")
    assert "535" in outcome.text
    assert "wrong-pw" not in outcome.text
    assert "wrong-pw" not in repr(transport)
    assert handler.received == []


def test_auth_login_mechanism() -> None:
    """A server that offers only AUTH LOGIN (base64 user, then password)."""
    lines: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ESMTP\r\n")
        replies = {
            b"EHLO": b"250-raw\r\n250 AUTH LOGIN\r\n",
            b"AUTH": b"334 VXNlcm5hbWU6\r\n",
            b"dXNlcg==": b"334 UGFzc3dvcmQ6\r\n",
            b"cGFzcw==": b"235 2.7.0 ok\r\n",
            b"DATA": b"354 go\r\n",
            b"QUIT": b"221 bye\r\n",
        }
        while line := await reader.readline():
            lines.append(line)
            if line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
                continue
            writer.write(replies.get(line.split()[0], b"250 ok\r\n"))

    with raw_server(script) as port:
        outcome = send(
            sq.SMTPTransport("127.0.0.1", port, username="user", password="pass", timeout=2), message()
        )
    assert type(outcome) is sq.Delivered
    assert lines[1:4] == [b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"cGFzcw==\r\n"]


def test_bad_arguments() -> None:
    with pytest.raises(sq.InvalidArgument, match="timeouts"):
        sq.SMTPTransport("127.0.0.1", 25, timeout=0)
    with pytest.raises(sq.InvalidArgument, match="timeouts"):
        sq.SMTPTransport("127.0.0.1", 25, data_timeout=-1)
    with pytest.raises(sq.InvalidArgument, match="username and password"):
        sq.SMTPTransport("127.0.0.1", 25, username="u")
    context = ssl.create_default_context()
    with pytest.raises(sq.InvalidArgument, match="relax the tls_context you give"):
        sq.SMTPTransport("127.0.0.1", 25, starttls=True, tls_context=context, verify=False)


def test_multiline_replies_and_mismatched_enhanced_codes(port: int, handler: RecordingHandler) -> None:
    handler.rcpt_replies = {
        "multi@example.com": "550-5.1.1 The email account\r\n550-5.1.1 does not\r\n550 5.1.1 exist",
        "mixed@example.com": "450 5.1.1 class mismatch",  # RFC 3463: the classes must agree
        "bare@example.com": "452 Too many recipients",
    }
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    outcomes = send_all(transport, [message(f"{r}@example.com") for r in ("multi", "mixed", "bare")])
    assert outcomes == [
        sq.HardBounce(code=550, enhanced="5.1.1", text="The email account does not exist"),
        sq.SoftBounce(code=450, enhanced=None, text="5.1.1 class mismatch"),
        sq.SoftBounce(code=452, enhanced=None, text="Too many recipients"),
    ]
