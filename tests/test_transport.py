"""FakeSMTPTransport: scripted per recipient or domain, deterministic, recording (SPEC section 7)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import attrs
import pytest

import senderqueue as sq

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def message(recipient: str, msg_id: str | None = None) -> sq.Message:
    return sq.Message(
        id=msg_id or f"id-{recipient}",
        mailing="m",
        sender="s",
        recipient=recipient,
        mail_from="news@shop.example",
        content=b"hello",
        state=sq.State.SENDING,
        frozen_from=None,
        attempts=1,
        next_attempt_at=T0,
        last_error=None,
        created_at=T0,
        updated_at=T0,
    )


def send(transport: sq.Transport, msg: sq.Message) -> sq.Outcome:
    return asyncio.run(transport.send(msg))


def test_is_a_transport() -> None:
    assert isinstance(sq.FakeSMTPTransport(), sq.Transport)


def test_unmatched_recipients_are_delivered() -> None:
    transport = sq.FakeSMTPTransport()
    outcome = send(transport, message("ann@example.com"))
    assert type(outcome) is sq.Delivered
    assert outcome.code == 250


def test_rule_by_exact_recipient() -> None:
    transport = sq.FakeSMTPTransport({"bob@example.com": "550 5.1.1 No such user"})
    bounced = send(transport, message("bob@example.com"))
    assert bounced == sq.HardBounce(code=550, enhanced="5.1.1", text="No such user")
    assert type(send(transport, message("ann@example.com"))) is sq.Delivered
    assert type(send(transport, message("bob@other.example"))) is sq.Delivered


def test_rule_by_domain() -> None:
    transport = sq.FakeSMTPTransport({"slow.example": "451 4.7.1 Greylisted"})
    for recipient in ("a@slow.example", "b@slow.example"):
        outcome = send(transport, message(recipient))
        assert outcome == sq.SoftBounce(code=451, enhanced="4.7.1", text="Greylisted")
    assert type(send(transport, message("a@fast.example"))) is sq.Delivered
    # A domain rule is not a suffix rule.
    assert type(send(transport, message("a@notslow.example"))) is sq.Delivered


def test_star_is_the_default_and_the_most_specific_rule_wins() -> None:
    transport = sq.FakeSMTPTransport(
        {
            "*": "421 4.4.2 Connection dropped",
            "example.com": "550 5.7.1 Blocked",
            "vip@example.com": "250 2.0.0 OK",
        }
    )
    assert type(send(transport, message("x@elsewhere.example"))) is sq.SoftBounce
    assert type(send(transport, message("y@example.com"))) is sq.HardBounce
    assert type(send(transport, message("vip@example.com"))) is sq.Delivered


def test_matching_is_case_insensitive() -> None:
    transport = sq.FakeSMTPTransport({"Bob@Example.COM": "550 5.1.1 gone", "SLOW.example": "451 4.7.1 later"})
    assert type(send(transport, message("bob@example.com"))) is sq.HardBounce
    assert type(send(transport, message("BOB@EXAMPLE.COM"))) is sq.HardBounce
    assert type(send(transport, message("x@Slow.Example"))) is sq.SoftBounce
    assert transport.script_for("BOB@example.com") == transport.script_for("bob@EXAMPLE.com")


def test_sequence_per_message_and_the_last_repeats() -> None:
    transport = sq.FakeSMTPTransport(
        {"example.com": ["451 4.7.1 Try later", "451 4.7.1 Try later", "250 OK"]}
    )
    first, second = message("a@example.com", "one"), message("b@example.com", "two")
    kinds = [type(send(transport, first)) for _ in range(5)]
    assert kinds == [sq.SoftBounce, sq.SoftBounce, sq.Delivered, sq.Delivered, sq.Delivered]
    # The count is per message: another message starts at the beginning of the script.
    assert type(send(transport, second)) is sq.SoftBounce
    assert type(send(transport, second)) is sq.SoftBounce
    assert type(send(transport, second)) is sq.Delivered


def test_a_single_reply_repeats() -> None:
    transport = sq.FakeSMTPTransport({"*": "451 4.3.2 down"})
    msg = message("a@example.com")
    assert all(type(send(transport, msg)) is sq.SoftBounce for _ in range(4))


def test_script_replies_from_a_string_or_sequence() -> None:
    assert sq.Script("250 OK").replies == ("250 OK",)
    assert sq.Script(["451 later", "250 OK"]).replies == ("451 later", "250 OK")
    with pytest.raises(ValueError):  # noqa: PT011
        sq.Script([])
    with pytest.raises(ValueError):  # noqa: PT011
        sq.Script("250 OK", latency=-1.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        sq.Script("250 OK").latency = 1.0  # type: ignore[misc]


def test_script_with_latency_waits() -> None:
    transport = sq.FakeSMTPTransport({"slow.example": sq.Script(["250 OK"], latency=0.05)})
    started = time.monotonic()
    outcome = send(transport, message("a@slow.example"))
    assert time.monotonic() - started >= 0.05
    assert type(outcome) is sq.Delivered
    assert transport.script_for("a@slow.example").latency == 0.05
    assert transport.script_for("a@fast.example").latency == 0.0


def test_default_latency_applies_to_plain_rules_and_the_default() -> None:
    transport = sq.FakeSMTPTransport({"example.com": "250 OK"}, latency=0.03)
    assert transport.script_for("a@example.com").latency == 0.03
    assert transport.script_for("a@unknown.example").latency == 0.03
    started = time.monotonic()
    send(transport, message("a@unknown.example"))
    assert time.monotonic() - started >= 0.03


def test_sends_with_latency_overlap() -> None:
    # Latency is an await, not a blocking sleep: concurrent sends overlap.
    transport = sq.FakeSMTPTransport(latency=0.1)

    async def send_all() -> list[sq.Outcome]:
        return await asyncio.gather(*(transport.send(message(f"u{i}@example.com")) for i in range(10)))

    started = time.monotonic()
    outcomes = asyncio.run(send_all())
    elapsed = time.monotonic() - started
    assert elapsed >= 0.1
    assert all(type(o) is sq.Delivered for o in outcomes)
    assert len(transport.attempts) == 10


def test_handler_decides() -> None:
    calls: list[tuple[str, int]] = []

    def handler(msg: sq.Message, attempt: int) -> sq.Outcome:
        calls.append((msg.id, attempt))
        if attempt < 2:
            return sq.SoftBounce(code=451, enhanced="4.7.1", text=f"attempt {attempt}")
        return sq.Delivered(code=250, text="fine")

    # The handler overrides the scripted replies.
    transport = sq.FakeSMTPTransport({"*": "550 5.1.1 never"}, handler=handler)
    msg = message("a@example.com", "h1")
    first = send(transport, msg)
    second = send(transport, msg)
    assert first == sq.SoftBounce(code=451, enhanced="4.7.1", text="attempt 1")
    assert second == sq.Delivered(code=250, text="fine")
    assert calls == [("h1", 1), ("h1", 2)]
    assert [a.outcome for a in transport.attempts] == [first, second]


def test_records_attempts_in_order() -> None:
    transport = sq.FakeSMTPTransport({"bad.example": "550 5.1.1 gone", "slow.example": "451 4.7.1 later"})
    messages = [
        message("a@ok.example", "1"),
        message("b@bad.example", "2"),
        message("c@slow.example", "3"),
        message("a@ok.example", "1"),
    ]
    outcomes = [send(transport, m) for m in messages]
    assert [a.message for a in transport.attempts] == messages
    assert [a.outcome for a in transport.attempts] == outcomes
    assert [type(o) for o in outcomes] == [sq.Delivered, sq.HardBounce, sq.SoftBounce, sq.Delivered]
    assert transport.attempts[0] == sq.Attempt(messages[0], outcomes[0])


def test_delivered_lists_only_accepted_messages_in_order() -> None:
    transport = sq.FakeSMTPTransport(
        {"bad.example": "550 5.1.1 gone", "retry.example": ["451 later", "250 OK"]}
    )
    a, b, c = message("a@ok.example", "a"), message("b@bad.example", "b"), message("c@retry.example", "c")
    for msg in (a, b, c, c, b):
        send(transport, msg)
    assert transport.delivered == [a, c]
    assert len(transport.attempts) == 5


def test_is_deterministic() -> None:
    rules: dict[str, str | list[str]] = {"x.example": ["451 4.7.1 a", "550 5.1.1 b"], "*": "250 OK"}

    def run() -> list[sq.Outcome]:
        transport = sq.FakeSMTPTransport(rules)
        return [send(transport, message(r, r)) for r in ["1@x.example", "2@y.example", "1@x.example"] * 2]

    assert run() == run()


def test_aclose_is_harmless() -> None:
    transport = sq.FakeSMTPTransport()
    asyncio.run(transport.aclose())
    assert type(send(transport, message("a@example.com"))) is sq.Delivered
