"""Bad input gets a typed error and changes nothing, on every backend (SPEC section 5, "Bad input").

Each test runs against a queue already holding messages in every queued state and one delivered,
and compares a snapshot taken before the bad call with one taken after: the metrics (and metrics by
sender) of every mailing involved, and ``get`` of every stored id and of every id the bad call
tried to use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import senderqueue as sq
from senderqueue.testing import ManualClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)
MAX_CONTENT = 1024


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def queue(new_backend: Callable[[], sq.Backend], clock: ManualClock) -> Iterator[sq.SenderQueue]:
    q = sq.SenderQueue(new_backend(), clock=clock, max_content_size=MAX_CONTENT)
    yield q
    q.close()


def new(
    message_id: str | None = None,
    *,
    mailing: str = "m1",
    sender: str = "s1",
    recipient: str = "ann@example.com",
    content: Any = b"Subject: hi\r\n\r\nhello\r\n",
    mail_from: str = "news@shop.example",
) -> sq.NewMessage:
    return sq.NewMessage(
        mailing=mailing,
        sender=sender,
        recipient=recipient,
        content=content,
        mail_from=mail_from,
        message_id=message_id,
    )


@attrs.frozen
class Stored:
    """What the ``stored`` fixture put in the queue."""

    ids: tuple[str, ...]
    sending: sq.Claim
    mailings: tuple[str, ...] = ("m1", "m2")
    # The last snapshot each ``unchanged`` scope found unchanged: the next block's "before" (it saves
    # half of the reads on the SQL and Redis backends). A stale one can only fail a test, never pass one.
    baselines: dict[tuple[tuple[str, ...], tuple[str, ...]], Snapshot] = attrs.field(factory=dict, eq=False)


@pytest.fixture
def stored(queue: sq.SenderQueue, clock: ManualClock) -> Stored:
    """Messages in NEW, SENDING, RETRIES, FROZEN (from NEW) and DELIVERED."""
    queue.enqueue_many([new("m1-sending"), new("m1-new-1"), new("m1-new-2", recipient="bo@example.org")])
    queue.enqueue_many([new("m1-retry", sender="s2"), new("m1-delivered", sender="s3")])
    queue.enqueue_many([new("m2-frozen", mailing="m2"), new("m2-new", mailing="m2", sender="s2")])
    clock.advance(timedelta(seconds=1))
    (retry,) = queue.claim("s2", limit=1)
    assert retry.message.id == "m1-retry"
    queue.soft_bounce(retry, "451 4.7.1 later")
    (done,) = queue.claim("s3", limit=1)
    queue.deliver(done)
    queue.freeze("m2", sender="s1")
    clock.advance(timedelta(seconds=1))
    (sending,) = queue.claim("s1", limit=1)
    assert sending.message.id == "m1-sending"
    clock.advance(timedelta(seconds=1))
    ids = ("m1-sending", "m1-new-1", "m1-new-2", "m1-retry", "m1-delivered", "m2-frozen", "m2-new")
    states = {i: queue.get(i).state for i in ids}
    assert states == {
        "m1-sending": sq.State.SENDING,
        "m1-new-1": sq.State.NEW,
        "m1-new-2": sq.State.NEW,
        "m1-retry": sq.State.RETRIES,
        "m1-delivered": sq.State.DELIVERED,
        "m2-frozen": sq.State.FROZEN,
        "m2-new": sq.State.NEW,
    }
    return Stored(ids=ids, sending=sending)


@attrs.frozen
class Snapshot:
    metrics: dict[str, sq.Metrics]
    by_sender: dict[str, dict[str, sq.Metrics]]
    messages: dict[str, sq.Message | None]


def snapshot(queue: sq.SenderQueue, mailings: Sequence[str], ids: Sequence[str]) -> Snapshot:
    """The visible state: metrics of ``mailings``, and each of ``ids`` (``None`` if not stored)."""

    def lookup(message_id: str) -> sq.Message | None:
        try:
            return queue.get(message_id)
        except sq.UnknownMessage:
            return None

    return Snapshot(
        metrics={m: queue.metrics(m) for m in mailings},
        by_sender={m: queue.metrics_by_sender(m) for m in mailings},
        messages={i: lookup(i) for i in ids},
    )


@contextmanager
def unchanged(
    queue: sq.SenderQueue, stored: Stored, *, mailings: Sequence[str] = (), ids: Sequence[str] = ()
) -> Iterator[None]:
    """Asserts the block changes nothing visible in the stored mailings, ``mailings`` and ``ids``."""
    all_mailings = (*stored.mailings, *mailings)
    all_ids = (*stored.ids, *ids)
    key = (all_mailings, all_ids)
    before = stored.baselines.pop(key, None) or snapshot(queue, all_mailings, all_ids)
    assert [i for i in all_ids if before.messages[i] is not None] == list(stored.ids)
    yield
    after = snapshot(queue, all_mailings, all_ids)
    if after != before:
        stored.baselines.clear()
    assert after == before
    stored.baselines[key] = after


_Case = TypeVar("_Case")


def each(cases: Iterable[_Case], check: Callable[[_Case], None]) -> None:
    """Run ``check`` on every case (on one queue per backend, to stay fast); report every failing case."""
    failures = []
    count = 0
    for case in cases:
        count += 1
        try:
            check(case)
        except (Exception, pytest.fail.Exception) as error:  # noqa: BLE001 - reported below, case by case
            failures.append(f"{case!r}: {type(error).__name__}: {error}")
    assert count > 0
    if failures:
        raise AssertionError(f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures))


def test_each_reports_every_failing_case() -> None:
    def check(n: int) -> None:
        assert n % 2 == 0

    with pytest.raises(AssertionError, match=r"2 of 4 cases failed:\n1: .*\n3: "):
        each(range(4), check)


def test_the_snapshot_sees_a_change(queue: sq.SenderQueue, stored: Stored) -> None:
    # The helper itself: an enqueue, a claim, a freeze are each visible.
    with pytest.raises(AssertionError), unchanged(queue, stored, ids=["extra"]):
        queue.enqueue(
            mailing="m9",
            sender="s1",
            recipient="a@example.com",
            content=b"x",
            mail_from="f@example.com",
            message_id="extra",
        )
    with pytest.raises(AssertionError), unchanged(queue, stored, mailings=["m9"]):
        queue.enqueue(mailing="m9", sender="s9", recipient="a@example.com", content=b"x", mail_from="f@e.com")
    with pytest.raises(AssertionError), unchanged(queue, stored):
        queue.freeze("m1", sender="s2")
    with pytest.raises(AssertionError), unchanged(queue, stored):
        queue.claim("s1")


# -- ids --------------------------------------------------------------------------------------

BAD_IDS: list[Any] = [
    "",
    "x" * 256,
    "a\nb",
    "a\r\nb",
    "\n",
    "a\x00b",
    "a\x7fb",
    "a\u2028b",
    "a\u2029b",
    "a\tb",
    "\x1b[31mred",
    "a\x85b",
    "\ud800",
    "a\u202eb",  # a right-to-left override: shown backwards, it could pass for another id
    "a\u200db",  # a zero-width joiner
    "\ufeff",  # a byte order mark
    "a\ue000b",  # private use
    None,
    5,
    b"bytes",
]


@pytest.mark.parametrize("field", ["mailing", "sender", "message_id"])
def test_enqueue_refuses_a_bad_id(queue: sq.SenderQueue, stored: Stored, field: str) -> None:
    def check(bad: Any) -> None:
        fields: dict[str, Any] = {
            "mailing": "m1",
            "sender": "s1",
            "recipient": "ann@example.com",
            "content": b"x",
            "mail_from": "news@shop.example",
            "message_id": "fresh",
            field: bad,
        }
        with unchanged(queue, stored, ids=["fresh"]), pytest.raises(sq.InvalidMessage, match=field):
            queue.enqueue(**fields)
        batch = [new("fresh-1"), sq.NewMessage(**fields), new("fresh-2")]
        with unchanged(queue, stored, ids=["fresh", "fresh-1", "fresh-2"]), pytest.raises(sq.InvalidMessage):
            queue.enqueue_many(batch)

    # message_id=None asks for a generated id.
    each([bad for bad in BAD_IDS if not (field == "message_id" and bad is None)], check)


def test_operations_refuse_a_bad_id(queue: sq.SenderQueue, stored: Stored) -> None:
    each(BAD_IDS, lambda bad: _operations_refuse(queue, stored, bad))


def _operations_refuse(queue: sq.SenderQueue, stored: Stored, bad: Any) -> None:
    calls: list[Callable[[], object]] = [
        lambda: queue.claim(bad),
        lambda: queue.freeze(bad),
        lambda: queue.unfreeze(bad),
        lambda: queue.clear(bad),
        lambda: queue.metrics(bad),
        lambda: queue.metrics_by_sender(bad),
        lambda: queue.get(bad),
    ]
    if bad is not None:  # sender=None names every sender queue of the mailing
        calls += [
            lambda: queue.freeze("m1", sender=bad),
            lambda: queue.unfreeze("m2", sender=bad),
            lambda: queue.clear("m1", sender=bad),
            lambda: queue.metrics("m1", sender=bad),
        ]
    for call in calls:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            call()


# -- addresses -----------------------------------------------------------------------------------

_LONG_DOMAIN_190 = "b" * 63 + "." + "c" * 63 + "." + "d" * 62  # "a"*64 + "@" + this is 255 octets

BAD_ADDRESSES = [
    "",
    "ann",
    "ann.example.com",
    "@example.com",
    "ann@",
    "ann@@example.com",
    "ann@b@example.com",
    "a" * 65 + "@example.com",
    "é" * 33 + "@example.com",  # 66 octets
    "ann@" + "b" * 64 + ".com",
    "ann@" + "é" * 32 + ".com",  # a 64-octet label
    "a" * 64 + "@" + _LONG_DOMAIN_190,
    "a@" + ".".join(["é" * 30] * 5),  # 156 characters, 306 octets
    "ann@example.com\r\nRCPT TO:<x@y>",
    "ann@example.com\nBcc: x@y.example",
    "ann@example.com\rDATA",
    "ann\r\n@example.com",
    "\r\nann@example.com",
    "ann@example.com\n",
    "ann\x00@example.com",
    "ann@example.com\x00",
    "ann@exa\tmple.com",
    "ann\x7f@example.com",
    "ann\u2028@example.com",
    "ann bee@example.com",
    " ann@example.com",
    "ann@example.com ",
    "ann@exa mple.com",
    "<ann@example.com>",
    "ann<@example.com",
    "ann@example.com>",
    "Ann <ann@example.com>",
    "ann..bee@example.com",
    ".ann@example.com",
    "ann.@example.com",
    "ann@example..com",
    "ann@.example.com",
    "ann@example.com.",
    "ann@-example.com",
    "ann@example-.com",
    "ann@exa_mple.com",
    "ann(comment)@example.com",
    'an"n@example.com',
    '"unclosed@example.com',
    '"a\r\nb"@example.com',
    "ann@[1.2.3.999]",
    "ann@[1.2.3]",
    "ann@[IPv6:zz::1]",
    "ann@[IPv6:1.2.3.4]",
    "ann@[example.com]",
    "ann@[]",
    "ann@[ 1.2.3.4]",
    "ann@[1.2.3.4",
]


NOT_STRINGS: list[Any] = [None, 5, b"ann@example.com", ["ann@example.com"]]


@pytest.mark.parametrize("field", ["recipient", "mail_from"])
def test_enqueue_refuses_a_bad_address(queue: sq.SenderQueue, stored: Stored, field: str) -> None:
    def check(bad: Any) -> None:
        fields: dict[str, Any] = {
            "mailing": "m3",
            "sender": "s1",
            "recipient": "ann@example.com",
            "content": b"x",
            "mail_from": "news@shop.example",
            "message_id": "fresh",
            field: bad,
        }
        with (
            unchanged(queue, stored, mailings=["m3"], ids=["fresh"]),
            pytest.raises(sq.InvalidMessage, match=field),
        ):
            queue.enqueue(**fields)
        batch = [new("fresh-1", mailing="m3"), sq.NewMessage(**fields)]
        with (
            unchanged(queue, stored, mailings=["m3"], ids=["fresh", "fresh-1"]),
            pytest.raises(sq.InvalidMessage, match=field),
        ):
            queue.enqueue_many(batch)

    each([*BAD_ADDRESSES, *NOT_STRINGS], check)


GOOD_ADDRESSES = [
    "ann@example.com",
    "Ann.Bee+tag@Example.COM",
    "o'brien@example.ie",
    "{x}|~!#$%&*=?^_`-/@example.com",
    "ann@sub-domain.example.co.uk",
    "ann@localhost",
    '"john doe"@example.com',
    '"a\\"b"@example.com',
    '"ann@home"@example.com',
    '"a..b"@example.com',
    '""@example.com',
    "üser@exämple.de",
    "用户@例子.广告",
    "пользователь@пример.рф",
    "ann@[1.2.3.4]",
    "ann@[IPv6:::1]",
    "ann@[IPv6:2001:db8::1]",
    "a" * 64 + "@example.com",
    "é" * 32 + "@example.com",  # 64 octets
    "ann@" + "b" * 63 + ".com",
    "a" * 64 + "@" + _LONG_DOMAIN_190[:-1],  # 254 octets
]


def test_good_addresses_are_accepted_and_round_trip(queue: sq.SenderQueue) -> None:
    def check(address: str) -> None:
        sender = f"s-{address}"[:255]
        msg_id = queue.enqueue(mailing="m", sender=sender, recipient=address, content=b"x", mail_from=address)
        message = queue.get(msg_id)
        assert message.recipient == address
        assert message.mail_from == address
        (claim,) = queue.claim(sender)
        assert claim.message.recipient == address
        assert claim.message.mail_from == address

    each(GOOD_ADDRESSES, check)
    assert queue.metrics("m").sending == len(GOOD_ADDRESSES)


def test_an_ipv6_literal_with_a_zone_id_is_refused() -> None:
    queue = sq.SenderQueue(clock=ManualClock(T0))
    with pytest.raises(sq.InvalidMessage, match="recipient"):
        queue.enqueue(
            mailing="m", sender="s", recipient="ann@[IPv6:fe80::1%eth0]", content=b"x", mail_from="f@e.com"
        )
    assert queue.metrics("m") == sq.Metrics()


def test_address_limits_are_counted_as_the_spec_says() -> None:
    assert len(("a" * 64 + "@" + _LONG_DOMAIN_190).encode()) == 255
    assert len(("a" * 64 + "@" + _LONG_DOMAIN_190[:-1]).encode()) == 254
    assert len(("é" * 32).encode()) == 64


# -- content ---------------------------------------------------------------------------------------


BAD_CONTENT: list[Any] = [
    b"x" * (MAX_CONTENT + 1),
    b"x" * (10 * MAX_CONTENT),
    b"",
    "text",
    bytearray(b"x"),
    memoryview(b"x"),
    None,
    [1],
]


def test_enqueue_refuses_bad_content(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(content: Any) -> None:
        with unchanged(queue, stored, ids=["fresh"]), pytest.raises(sq.InvalidMessage, match="content"):
            queue.enqueue(
                mailing="m1",
                sender="s1",
                recipient="a@example.com",
                content=content,
                mail_from="f@example.com",
                message_id="fresh",
            )

    each(BAD_CONTENT, check)


def test_content_up_to_the_limit_is_accepted(queue: sq.SenderQueue) -> None:
    content = bytes(range(256)) * (MAX_CONTENT // 256)
    assert len(content) == MAX_CONTENT
    msg_id = queue.enqueue(
        mailing="m", sender="s", recipient="a@example.com", content=content, mail_from="f@e.com"
    )
    assert queue.get(msg_id).content == content
    one = queue.enqueue(
        mailing="m", sender="s", recipient="a@example.com", content=b"\x00", mail_from="f@e.com"
    )
    assert queue.get(one).content == b"\x00"


def test_default_content_limit() -> None:
    assert sq.DEFAULT_MAX_CONTENT_SIZE == 25 * 1024 * 1024
    assert sq.SenderQueue().max_content_size == sq.DEFAULT_MAX_CONTENT_SIZE


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "10", None], ids=repr)
def test_queue_refuses_a_bad_content_limit(size: Any) -> None:
    with pytest.raises(sq.InvalidArgument):
        sq.SenderQueue(max_content_size=size)


# -- claims and leases ------------------------------------------------------------------------------

BAD_LIMITS: list[Any] = [0, -1, -(2**70), 1.0, 1.5, True, False, "3", None, float("inf")]


def test_claim_refuses_a_bad_limit(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(limit: Any) -> None:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument, match="limit"):
            queue.claim("s1", limit=limit)

    each(BAD_LIMITS, check)


BAD_LEASES: list[Any] = [
    timedelta(0),
    -timedelta(microseconds=1),
    -timedelta(minutes=5),
    300,
    300.0,
    None,
    "5m",
    True,
]


def test_claim_refuses_a_bad_lease(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(lease: Any) -> None:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument, match="lease"):
            queue.claim("s1", limit=5, lease=lease)

    each(BAD_LEASES, check)


def test_renew_refuses_a_bad_lease(queue: sq.SenderQueue, stored: Stored, clock: ManualClock) -> None:
    def check(lease: Any) -> None:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument, match="lease"):
            queue.renew(stored.sending, lease=lease)

    each(BAD_LEASES, check)
    # The lease was not touched: it still runs out when it did.
    clock.set(stored.sending.expires_at - timedelta(microseconds=1))
    assert queue.expire_leases() == 0
    clock.set(stored.sending.expires_at)
    assert queue.expire_leases() == 1


def test_claim_and_renew_accept_the_smallest_positive_lease(queue: sq.SenderQueue, stored: Stored) -> None:
    (claim,) = queue.claim("s1", limit=1, lease=timedelta(microseconds=1))
    renewed = queue.renew(claim, lease=timedelta(microseconds=1))
    assert renewed.expires_at == queue.now() + timedelta(microseconds=1)


def test_reports_refuse_what_is_not_a_claim(queue: sq.SenderQueue, stored: Stored) -> None:
    not_claims: list[Any] = [None, "m1-sending", ("m1-sending", "1"), attrs.asdict(stored.sending)]
    each(not_claims, lambda claim: _not_a_claim(queue, stored, claim))
    queue.deliver(stored.sending)  # the claim is still valid


def _not_a_claim(queue: sq.SenderQueue, stored: Stored, claim: Any) -> None:
    calls: list[Callable[[], object]] = [
        lambda: queue.deliver(claim),
        lambda: queue.soft_bounce(claim, "451 later"),
        lambda: queue.hard_bounce(claim, "550 gone"),
        lambda: queue.release(claim),
        lambda: queue.renew(claim),
        lambda: queue.report_many([(claim, sq.Delivered())]),
    ]
    for call in calls:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            call()


def test_bounces_refuse_a_reason_that_is_not_a_string(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(reason: Any) -> None:
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            queue.soft_bounce(stored.sending, reason)
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            queue.hard_bounce(stored.sending, reason)

    each([None, 451, b"451 later"], check)
    queue.deliver(stored.sending)  # the claim is still valid


def test_purge_refuses_a_negative_age(queue: sq.SenderQueue, stored: Stored) -> None:
    for age in (-timedelta(seconds=1), 5, None):
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            queue.purge(age)  # type: ignore[arg-type]


# -- batches ----------------------------------------------------------------------------------------

BAD_MESSAGES: list[Any] = [
    new("bad", recipient="ann@example.com\r\nRCPT TO:<x@y>"),
    new("bad", mail_from="not an address"),
    new("bad", mailing=""),
    new("bad", sender="s\n1"),
    new("x" * 256),
    new("bad", content=b""),
    new("bad", content=b"x" * (MAX_CONTENT + 1)),
    {"mailing": "m1", "sender": "s1", "recipient": "a@example.com", "content": b"x", "mail_from": "f@e.com"},
    None,
]


def test_one_bad_message_rejects_the_whole_batch(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(case: tuple[int, int]) -> None:
        n, position = case
        bad = BAD_MESSAGES[n]
        batch: list[Any] = [
            new(f"b{n}.{position}-0"),
            new(f"b{n}.{position}-1", sender="s9"),
            new(None, mailing="m2"),
            new(f"b{n}.{position}-3", mailing="m3"),
        ]
        touched = [m.message_id for m in batch if m.message_id is not None]
        batch.insert(position, bad)
        with (
            unchanged(queue, stored, mailings=["m3"], ids=[*touched, "bad"]),
            pytest.raises(sq.InvalidMessage),
        ):
            queue.enqueue_many(batch)

    each([(n, position) for n in range(len(BAD_MESSAGES)) for position in (0, 1, 3, 4)], check)
    # A batch of good messages goes in whole.
    good = [new("b-0"), new("b-1", sender="s9"), new(None, mailing="m2"), new("b-3", mailing="m3")]
    ids = queue.enqueue_many(good)
    assert ids[:2] == ["b-0", "b-1"]
    assert ids[3] == "b-3"
    assert queue.get(ids[2]).mailing == "m2"


def test_a_bad_message_late_in_a_generator_rejects_the_batch(queue: sq.SenderQueue, stored: Stored) -> None:
    def batch() -> Iterator[sq.NewMessage]:
        for i in range(5):
            yield new(f"g-{i}")
        yield new("g-bad", recipient="nope")

    with unchanged(queue, stored, ids=[f"g-{i}" for i in range(5)]), pytest.raises(sq.InvalidMessage):
        queue.enqueue_many(batch())


def test_an_empty_batch_stores_nothing(queue: sq.SenderQueue, stored: Stored) -> None:
    with unchanged(queue, stored):
        assert queue.enqueue_many([]) == []


def test_duplicate_id_within_a_batch(queue: sq.SenderQueue, stored: Stored) -> None:
    batch = [new("d-1"), new("d-2"), new("d-1", mailing="m3")]
    with (
        unchanged(queue, stored, mailings=["m3"], ids=["d-1", "d-2"]),
        pytest.raises(sq.DuplicateMessage) as caught,
    ):
        queue.enqueue_many(batch)
    assert caught.value.message_id == "d-1"


def test_duplicate_of_a_stored_id(queue: sq.SenderQueue, stored: Stored) -> None:
    def check(taken: str) -> None:
        with unchanged(queue, stored, mailings=["m3"]), pytest.raises(sq.DuplicateMessage) as caught:
            queue.enqueue(
                mailing="m3",
                sender="s1",
                recipient="a@example.com",
                content=b"x",
                mail_from="f@example.com",
                message_id=taken,
            )
        assert caught.value.message_id == taken
        batch = [new("d-1", mailing="m3"), new(taken, mailing="m3"), new("d-2", mailing="m3")]
        with (
            unchanged(queue, stored, mailings=["m3"], ids=["d-1", "d-2"]),
            pytest.raises(sq.DuplicateMessage),
        ):
            queue.enqueue_many(batch)

    # Whatever the stored message's state, terminal ones included.
    each(["m1-new-1", "m1-sending", "m1-retry", "m1-delivered", "m2-frozen"], check)


def test_ids_are_case_and_space_sensitive(queue: sq.SenderQueue) -> None:
    # Distinct ids never collide, even where a database collation might fold them.
    variants = [
        "id",
        "ID",
        "Id",
        "id ",
        " id",
        "\u0131d",  # dotless i
        "İd",
        "\uff49\uff44",  # fullwidth
        "i\u0307d",
        "straße",
        "strasse",
        "STRASSE",
        "é",
        "e\u0301",
    ]
    assert len(set(variants)) == len(variants)
    ids = queue.enqueue_many([new(v, mailing=v, sender=v) for v in variants])
    assert ids == variants
    for v in variants:
        message = queue.get(v)
        assert (message.id, message.mailing, message.sender) == (v, v, v)
        assert queue.metrics(v).new == 1
        assert queue.metrics_by_sender(v) == {v: sq.Metrics(new=1)}


# -- report_many -----------------------------------------------------------------------------------

BAD_REPORTS = [
    "claim",  # the claim alone
    "1-tuple",
    "3-tuple",
    "None",
    "string outcome",
    "None outcome",
    "outcome class",
    "int outcome",
    "reply tuple",
    "swapped",
]


def _bad_report(kind: str, claim: sq.Claim) -> Any:
    return {
        "claim": claim,
        "1-tuple": (claim,),
        "3-tuple": (claim, sq.Delivered(), "extra"),
        "string outcome": (claim, "250 OK"),
        "None outcome": (claim, None),
        "outcome class": (claim, sq.Delivered),
        "int outcome": (claim, 250),
        "reply tuple": (claim, (250, "2.0.0", "OK")),
        "swapped": (sq.Delivered(), claim),
        "None": None,
    }[kind]


def test_report_many_refuses_a_bad_report_and_settles_nothing(queue: sq.SenderQueue, stored: Stored) -> None:
    c1, c2 = queue.claim("s1", limit=2)  # m1-new-1 and m1-new-2, besides the stored SENDING one
    sending = [stored.sending, c1, c2]
    good = [(stored.sending, sq.Delivered()), (c1, sq.HardBounce(code=550, enhanced="5.1.1", text="gone"))]

    def check(case: tuple[str, str]) -> None:
        kind, position = case
        bad = _bad_report(kind, c2)
        reports: list[Any] = [bad, *good] if position == "first" else [*good, bad]
        with unchanged(queue, stored), pytest.raises(sq.InvalidArgument):
            queue.report_many(reports)
        assert all(queue.get(c.message.id).state is sq.State.SENDING for c in sending)

    each([(kind, position) for kind in BAD_REPORTS for position in ("first", "last")], check)
    # Every claim is still valid.
    assert queue.report_many([(c, sq.Delivered()) for c in sending]) == [None, None, None]
    assert queue.metrics("m1").delivered == 4


def test_report_many_of_nothing(queue: sq.SenderQueue, stored: Stored) -> None:
    with unchanged(queue, stored):
        assert queue.report_many([]) == []


# -- the positive side: any printable id is safe ----------------------------------------------------

GOOD_IDS = [
    '"quoted"',
    "'single'",
    "a:b:c",
    "{braces}",
    "{m1}",
    "with space",
    " leading and trailing ",
    "'; DROP TABLE x; --",
    '"; DROP TABLE messages; --',
    "Robert'); DROP TABLE Students;--",
    "redis.call('FLUSHALL')",
    "m1*",
    "m%",
    "m_",
    "[abc]",
    "\\backslash\\",
    "Привет, мир",
    "中文标识符",
    "日本語のメール",
    "😀 emoji",
    "no\xa0break\xa0space",
    "春のセール\u30002026",  # an ideographic space
    "thin\u2009and\u202fnarrow",
    "x" * 255,
    "я" * 255,
    "中" * 255,
    "😀" * 255,
]


def test_printable_ids_are_accepted_and_round_trip(queue: sq.SenderQueue) -> None:
    each(GOOD_IDS, lambda value: _round_trip(queue, value))


def _round_trip(queue: sq.SenderQueue, value: str) -> None:
    msg_id = queue.enqueue(
        mailing=value,
        sender=value,
        recipient="a@example.com",
        content=b"x",
        mail_from="f@example.com",
        message_id=value,
    )
    assert msg_id == value
    message = queue.get(value)
    assert (message.id, message.mailing, message.sender) == (value, value, value)
    assert queue.metrics(value) == sq.Metrics(new=1)
    assert queue.metrics(value, sender=value) == sq.Metrics(new=1)
    assert queue.metrics_by_sender(value) == {value: sq.Metrics(new=1)}
    assert queue.freeze(value, sender=value) == 1
    assert queue.unfreeze(value) == 1
    (claim,) = queue.claim(value, limit=5)
    assert claim.message.id == value
    queue.deliver(claim)
    assert queue.get(value).state is sq.State.DELIVERED


def test_ids_that_look_alike_do_not_collide(queue: sq.SenderQueue) -> None:
    # Separators, glob and LIKE patterns of a key scheme must not merge sender queues or mailings.
    pairs = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a", "b"),
        ("m%", "s"),
        ("m_", "s"),
        ("m1", "s"),
        ("m*", "s"),
        ("{a}", "b"),
        ("a", "{b}"),
        ("spring sale", "s"),
        ("spring\xa0sale", "s"),
        ("spring\u3000sale", "s"),
    ]
    for mailing, sender in pairs:
        queue.enqueue(
            mailing=mailing, sender=sender, recipient="a@example.com", content=b"x", mail_from="f@e.com"
        )
    assert queue.metrics("a:b") == sq.Metrics(new=1)
    assert queue.metrics_by_sender("a") == {
        "b:c": sq.Metrics(new=1),
        "b": sq.Metrics(new=1),
        "{b}": sq.Metrics(new=1),
    }
    assert queue.freeze("m%") == 1
    assert queue.freeze("m*") == 1
    assert queue.metrics("m1") == sq.Metrics(new=1)
    assert queue.metrics("m_") == sq.Metrics(new=1)
    assert queue.clear("m_") == 1
    assert queue.metrics("m1") == sq.Metrics(new=1)
    assert queue.metrics("m%") == sq.Metrics(frozen=1)
    claims = queue.claim("b:c", limit=10)
    assert [(c.message.mailing, c.message.sender) for c in claims] == [("a", "b:c")]
    assert queue.freeze("spring\xa0sale") == 1
    assert queue.metrics("spring sale") == sq.Metrics(new=1)
    assert queue.metrics("spring\u3000sale") == sq.Metrics(new=1)


# Graphic in Unicode's sense: no Other (C*) character, and of the separators only spaces (Zs).
PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
IDS = st.text(PRINTABLE, min_size=1, max_size=255)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=IDS, second=IDS)
def test_any_printable_ids_round_trip_and_never_collide(
    new_backend: Callable[[], sq.Backend], first: str, second: str
) -> None:
    assume(first != second)
    queue = sq.SenderQueue(new_backend(), clock=ManualClock(T0))
    for value in (first, second):
        assert queue.enqueue_many([new(value, mailing=value, sender=value)]) == [value]
    for value in (first, second):
        message = queue.get(value)
        assert (message.id, message.mailing, message.sender) == (value, value, value)
        assert queue.metrics(value) == sq.Metrics(new=1)
        assert queue.metrics_by_sender(value) == {value: sq.Metrics(new=1)}
    (claim,) = queue.claim(first)
    assert claim.message.id == first


NOT_PRINTABLE = st.characters(categories=("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))


@settings(max_examples=40, deadline=None)
@given(prefix=st.text(PRINTABLE, max_size=20), bad=NOT_PRINTABLE, suffix=st.text(PRINTABLE, max_size=20))
def test_any_id_with_a_control_character_is_refused(prefix: str, bad: str, suffix: str) -> None:
    queue = sq.SenderQueue(clock=ManualClock(T0))
    value = prefix + bad + suffix
    for message in (new(value), new("ok", mailing=value), new("ok", sender=value)):
        with pytest.raises(sq.InvalidMessage):
            queue.enqueue_many([message])
    assert queue.metrics("m1") == sq.Metrics()
