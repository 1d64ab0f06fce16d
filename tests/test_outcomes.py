"""Classification of SMTP replies: SPEC section 4 (RFC 5321 reply codes, RFC 3463 enhanced codes)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import senderqueue as sq

Kind = type[sq.Delivered] | type[sq.SoftBounce] | type[sq.HardBounce]

# (code, enhanced, expected kind) with the default table.
DEFAULT_TABLE: list[tuple[int, str | None, Kind]] = [
    (250, None, sq.Delivered),
    (250, "2.0.0", sq.Delivered),
    (251, "2.1.5", sq.Delivered),
    (200, None, sq.Delivered),
    (299, None, sq.Delivered),
    (421, None, sq.SoftBounce),
    (421, "4.4.2", sq.SoftBounce),
    (450, "4.2.1", sq.SoftBounce),
    (451, "4.7.1", sq.SoftBounce),
    (452, "4.2.2", sq.SoftBounce),
    (499, None, sq.SoftBounce),
    (500, None, sq.HardBounce),
    (550, None, sq.HardBounce),
    (550, "5.1.1", sq.HardBounce),
    (552, None, sq.HardBounce),
    (553, "5.1.3", sq.HardBounce),
    (554, "5.7.1", sq.HardBounce),
    (599, None, sq.HardBounce),
    # The enhanced code's class wins over the reply code's.
    (550, "4.2.0", sq.SoftBounce),
    (450, "5.1.1", sq.HardBounce),
    (554, "2.0.0", sq.Delivered),
    # DEFAULT_EXCEPTIONS: "mailbox full" is worth a retry.
    (552, "5.2.2", sq.SoftBounce),
    (550, "5.2.2", sq.SoftBounce),
    (452, "5.2.2", sq.SoftBounce),
    # Only 5.2.2 is an exception, not its neighbours.
    (552, "5.2.1", sq.HardBounce),
    (552, "5.2.3", sq.HardBounce),
]


@pytest.mark.parametrize(("code", "enhanced", "kind"), DEFAULT_TABLE)
def test_default_classification(code: int, enhanced: str | None, kind: Kind) -> None:
    outcome = sq.Classifier().classify(code, enhanced, "text")
    assert type(outcome) is kind
    assert (outcome.code, outcome.enhanced, outcome.text) == (code, enhanced, "text")


@given(code=st.integers(200, 599))
def test_reply_code_class_decides_without_an_enhanced_code(code: int) -> None:
    # A final 3xx is not an acceptance (SPEC is silent): retried, so that no message is lost.
    kind = {2: sq.Delivered, 3: sq.SoftBounce, 4: sq.SoftBounce, 5: sq.HardBounce}[code // 100]
    assert type(sq.Classifier().classify(code)) is kind


def test_default_exceptions() -> None:
    assert dict(sq.DEFAULT_EXCEPTIONS) == {"5.2.2": "soft"}
    with pytest.raises(TypeError):
        sq.DEFAULT_EXCEPTIONS["5.1.1"] = "soft"  # type: ignore[index]
    assert dict(sq.Classifier().exceptions) == {"5.2.2": "soft"}


@pytest.mark.parametrize("code", [0, 99, 199, 600, 1000, -250])
def test_classify_refuses_non_reply_codes(code: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        sq.Classifier().classify(code)


# -- user overrides ----------------------------------------------------------------------------


def test_override_by_enhanced_code() -> None:
    classifier = sq.Classifier(exceptions={**sq.DEFAULT_EXCEPTIONS, "5.7.1": "soft", "4.7.1": "hard"})
    assert type(classifier.classify(554, "5.7.1")) is sq.SoftBounce
    assert type(classifier.classify(451, "4.7.1")) is sq.HardBounce
    assert type(classifier.classify(552, "5.2.2")) is sq.SoftBounce  # the defaults kept
    assert type(classifier.classify(554, "5.7.2")) is sq.HardBounce  # others unchanged


def test_override_by_reply_code() -> None:
    classifier = sq.Classifier(exceptions={"550": "soft", "421": "hard", "252": "soft"})
    assert type(classifier.classify(550)) is sq.SoftBounce
    assert type(classifier.classify(550, "5.1.1")) is sq.SoftBounce
    assert type(classifier.classify(421, "4.4.2")) is sq.HardBounce
    assert type(classifier.classify(252)) is sq.SoftBounce
    assert type(classifier.classify(551)) is sq.HardBounce


def test_overrides_replace_the_defaults_unless_merged() -> None:
    classifier = sq.Classifier(exceptions={"550": "soft"})
    assert type(classifier.classify(552, "5.2.2")) is sq.HardBounce


def test_enhanced_override_is_looked_up_before_the_reply_code() -> None:
    classifier = sq.Classifier(exceptions={"5.1.1": "soft", "550": "hard"})
    assert type(classifier.classify(550, "5.1.1")) is sq.SoftBounce
    assert type(classifier.classify(550, "5.1.2")) is sq.HardBounce
    classifier = sq.Classifier(exceptions={"5.1.1": "hard", "550": "delivered"})
    assert type(classifier.classify(550, "5.1.1")) is sq.HardBounce
    assert type(classifier.classify(550)) is sq.Delivered


def test_overrides_are_copied_and_frozen() -> None:
    table = {"550": "soft"}
    classifier = sq.Classifier(exceptions=table)
    table["550"] = "hard"
    assert type(classifier.classify(550)) is sq.SoftBounce
    with pytest.raises(TypeError):
        classifier.exceptions["551"] = "soft"  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        classifier.exceptions = {}  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["retry", "Soft", "", "bounce", "HARD"])
def test_invalid_override_kind_raises(kind: str) -> None:
    with pytest.raises(ValueError, match=repr(kind)):
        sq.Classifier(exceptions={"550": kind})


def test_fake_transport_uses_its_classifier() -> None:
    transport = sq.FakeSMTPTransport(
        {"*": "550 5.1.1 gone"}, classifier=sq.Classifier(exceptions={"550": "soft"})
    )
    assert type(transport.classifier.parse("550 5.1.1 gone")) is sq.SoftBounce


# -- parse_reply ----------------------------------------------------------------------------------

PARSED: list[tuple[str, Kind, int, str | None, str]] = [
    ("250 ok", sq.Delivered, 250, None, "ok"),
    ("250 2.0.0 OK: queued as 12345", sq.Delivered, 250, "2.0.0", "OK: queued as 12345"),
    ("250", sq.Delivered, 250, None, ""),
    ("250 2.0.0", sq.Delivered, 250, "2.0.0", ""),
    ("451 4.7.1 Try later", sq.SoftBounce, 451, "4.7.1", "Try later"),
    ("421 Service not available", sq.SoftBounce, 421, None, "Service not available"),
    (
        "550-5.1.1 The email account does not exist",
        sq.HardBounce,
        550,
        "5.1.1",
        "The email account does not exist",
    ),
    (
        "550 5.1.1 <ann@example.com>: Recipient address rejected",
        sq.HardBounce,
        550,
        "5.1.1",
        "<ann@example.com>: Recipient address rejected",
    ),
    ("552 5.2.2 Mailbox full", sq.SoftBounce, 552, "5.2.2", "Mailbox full"),
    ("554 5.7.1 Message rejected\r\n", sq.HardBounce, 554, "5.7.1", "Message rejected"),
    ("451 4.3.0 ", sq.SoftBounce, 451, "4.3.0", ""),
    ("550 5.1.10 no such domain", sq.HardBounce, 550, "5.1.10", "no such domain"),
    ("550 5.999.999 odd", sq.HardBounce, 550, "5.999.999", "odd"),
    # Not an enhanced code: the text starts with digits and dots.
    ("550 1.2.3 weird", sq.HardBounce, 550, None, "1.2.3 weird"),
    ("450 4.2.1x busy", sq.SoftBounce, 450, None, "4.2.1x busy"),
]


@pytest.mark.parametrize(("reply", "kind", "code", "enhanced", "text"), PARSED)
def test_parse_reply(reply: str, kind: Kind, code: int, enhanced: str | None, text: str) -> None:
    outcome = sq.parse_reply(reply)
    assert type(outcome) is kind
    assert (outcome.code, outcome.enhanced, outcome.text) == (code, enhanced, text)


def test_parse_reply_of_a_multiline_reply_classifies_by_its_codes() -> None:
    reply = "550-5.1.1 The email account\r\n550-5.1.1 does not\r\n550 5.1.1 exist"
    outcome = sq.parse_reply(reply)
    assert type(outcome) is sq.HardBounce
    assert (outcome.code, outcome.enhanced) == (550, "5.1.1")
    assert outcome.text.startswith("The email account")
    assert outcome.text.endswith("exist")


def test_parse_reply_of_a_multiline_reply_joins_its_text() -> None:
    outcome = sq.parse_reply("550-5.1.1 The email account\r\n550-5.1.1 does not\r\n550 5.1.1 exist")
    assert outcome.text == "The email account does not exist"
    assert str(outcome) == "550 5.1.1 The email account does not exist"


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ("250-a\n250 b", "a b"),
        ("250-PIPELINING\r\n250-SIZE 1000\r\n250 OK", "PIPELINING SIZE 1000 OK"),
        ("451-4.7.1 Greylisted\r\n451 4.7.1 come back later", "Greylisted come back later"),
    ],
)
def test_multiline_replies_give_one_line_of_text(reply: str, text: str) -> None:
    outcome = sq.parse_reply(reply)
    assert outcome.text == text
    assert "\r" not in str(outcome)
    assert "\n" not in str(outcome)


@pytest.mark.parametrize("reply", ["550-first\r\n451 second", "250-a\r\nb", "550-a\r\n\r\n550 b"])
def test_multiline_replies_with_a_line_of_another_code_are_refused(reply: str) -> None:
    with pytest.raises(ValueError, match="SMTP reply"):
        sq.parse_reply(reply)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        "ok",
        "hello world",
        "25",
        "2 50 ok",
        "600 too high",
        "199 too low",
        "100 continue",
        "abc 250",
        "OK 250",
        "-250 ok",
        "\r\n",
        "x250 ok",
    ],
)
def test_parse_reply_refuses_garbage(garbage: str) -> None:
    with pytest.raises(ValueError, match="SMTP reply"):
        sq.parse_reply(garbage)


@pytest.mark.parametrize("garbage", ["2500 ok", "250ok", "5501 no", "451x later"])
def test_parse_reply_refuses_a_code_that_is_not_three_digits(garbage: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        sq.parse_reply(garbage)


# -- outcomes as values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "text"),
    [
        (sq.SoftBounce(code=451, enhanced="4.7.1", text="Try later"), "451 4.7.1 Try later"),
        (sq.HardBounce(code=550, enhanced="5.1.1", text="No such user"), "550 5.1.1 No such user"),
        (sq.Delivered(code=250, enhanced="2.0.0", text="OK"), "250 2.0.0 OK"),
        (sq.SoftBounce(code=421, text="connection refused"), "421 connection refused"),
        (sq.HardBounce(code=554, enhanced="5.7.1"), "554 5.7.1"),
        (sq.Delivered(), "250"),
    ],
)
def test_str_of_an_outcome_is_code_enhanced_text(outcome: sq.Outcome, text: str) -> None:
    assert str(outcome) == text


@pytest.mark.parametrize("reply", ["451 4.7.1 Try later", "550 5.1.1 No such user", "250 2.0.0 OK queued"])
def test_str_round_trips_through_parse_reply(reply: str) -> None:
    assert str(sq.parse_reply(reply)) == reply
    assert sq.parse_reply(str(sq.parse_reply(reply))) == sq.parse_reply(reply)


def test_outcomes_are_frozen_values() -> None:
    bounce = sq.SoftBounce(code=451, enhanced="4.7.1", text="later")
    assert bounce == sq.SoftBounce(code=451, enhanced="4.7.1", text="later")
    other_kind: object = sq.HardBounce(code=451, enhanced="4.7.1", text="later")
    assert bounce != other_kind
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        bounce.code = 550  # type: ignore[misc]
    assert sq.Delivered().code == 250
