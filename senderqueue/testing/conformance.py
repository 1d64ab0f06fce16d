"""The conformance suite: the specification as tests every backend must pass.

A backend is done when this suite passes unchanged. Subclass
:class:`BackendConformance` in a test module and supply one fixture::

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def new_backend(self):
            return lambda: MyBackend(...)   # a fresh, isolated backend per call

It holds a scenario test for each rule of SPEC section 3, a hypothesis state
machine that drives the backend and :class:`~senderqueue.testing.SpecModel`
side by side, and a multi-thread test. Needs pytest and hypothesis.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._backend import Backend
from .._clock import ManualClock
from .._errors import DuplicateMessage, LeaseLost, UnknownMessage
from .._lifecycle import State
from .._models import Claim, Message, Metrics, NewMessage
from .._outcomes import Delivered, HardBounce, Outcome, SoftBounce
from .._queue import SenderQueue
from .._retry import RetryPolicy
from .model import ModelMessage, SpecModel

__all__ = ["RETRY", "START", "BackendConformance", "NewBackend", "model_machine", "new_message"]

START = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
"""Where every conformance test's clock starts."""
RETRY = RetryPolicy(
    min_backoff=timedelta(minutes=5),
    max_backoff=timedelta(minutes=20),
    max_attempts=3,
    max_lifetime=timedelta(hours=2),
)
"""A retry policy short enough for every path (backoff cap, attempts, lifetime) to be reached."""
LEASE = timedelta(minutes=10)
CONTENT = b"Subject: conformance\r\n\r\nHello.\r\n"

NewBackend = Callable[[], Backend]


def new_message(
    mailing: str = "m1", sender: str = "s1", n: int = 0, message_id: str | None = None
) -> NewMessage:
    """A valid message for a sender queue; ``n`` makes the recipient distinct."""
    return NewMessage(
        mailing=mailing,
        sender=sender,
        recipient=f"rcpt{n}@example.com",
        content=CONTENT,
        mail_from="news@shop.example",
        message_id=message_id,
    )


def _fill(queue: SenderQueue, count: int, mailing: str = "m1", sender: str = "s1") -> list[str]:
    return queue.enqueue_many(new_message(mailing, sender, n) for n in range(count))


def _snapshot(queue: SenderQueue, ids: list[str], mailings: tuple[str, ...] = ("m1", "m2")) -> object:
    return (
        [queue.metrics(m) for m in mailings],
        [queue.metrics_by_sender(m) for m in mailings],
        [queue.get(i) for i in ids],
    )


class BackendConformance:
    """Every rule of the specification, as tests of one backend.

    Attributes:
        model_examples: how many random runs the model test makes.
        model_steps: how many steps each random run takes.
        thread_messages: how many messages the multi-thread test drains.
    """

    model_examples: ClassVar[int] = 200
    model_steps: ClassVar[int] = 40
    thread_messages: ClassVar[int] = 1200

    @pytest.fixture
    def new_backend(self) -> NewBackend:
        """Override: return a callable that makes a fresh, isolated backend."""
        raise NotImplementedError("a conformance test class must provide a new_backend fixture")

    @pytest.fixture
    def clock(self) -> ManualClock:
        """A clock that moves only when a test advances it."""
        return ManualClock(START)

    @pytest.fixture
    def queue(self, new_backend: NewBackend, clock: ManualClock) -> Iterator[SenderQueue]:
        """A queue on a fresh backend, with the manual clock and :data:`RETRY`."""
        queue = SenderQueue(new_backend(), clock=clock, retry=RETRY)
        yield queue
        queue.close()

    # -- enqueue --------------------------------------------------------------------

    def test_enqueue_makes_a_new_message(self, queue: SenderQueue) -> None:
        message_id = queue.enqueue(
            mailing="m1",
            sender="s1",
            recipient="ann@example.com",
            content=CONTENT,
            mail_from="news@shop.example",
        )
        message = queue.get(message_id)
        assert message == Message(
            id=message_id,
            mailing="m1",
            sender="s1",
            recipient="ann@example.com",
            mail_from="news@shop.example",
            content=CONTENT,
            state=State.NEW,
            frozen_from=None,
            attempts=0,
            next_attempt_at=START,
            last_error=None,
            created_at=START,
            updated_at=START,
        )
        assert queue.metrics("m1") == Metrics(new=1)
        assert queue.metrics("m1").total == 1

    def test_enqueue_many_keeps_order_and_caller_ids(self, queue: SenderQueue) -> None:
        ids = queue.enqueue_many(
            [new_message(n=0, message_id="first"), new_message(n=1), new_message(n=2, message_id="third")]
        )
        assert ids[0] == "first"
        assert ids[2] == "third"
        assert len(set(ids)) == 3
        assert [queue.get(i).recipient for i in ids] == [
            "rcpt0@example.com",
            "rcpt1@example.com",
            "rcpt2@example.com",
        ]
        assert queue.enqueue_many([]) == []

    def test_a_batch_is_claimed_in_its_order_whatever_its_ids(self, queue: SenderQueue) -> None:
        # Ids in no order of their own (as a caller's UUIDs are): the batch's order is the queue's.
        ids = [f"{(n * 7919) % 1000:03d}-{n}" for n in range(300)]
        assert queue.enqueue_many(new_message(n=n, message_id=i) for n, i in enumerate(ids)) == ids
        assert [claim.message.id for claim in queue.claim("s1", limit=300)] == ids

    def test_a_reused_message_id_is_rejected_and_nothing_is_stored(self, queue: SenderQueue) -> None:
        queue.enqueue_many([new_message(message_id="taken")])
        before = _snapshot(queue, ["taken"])
        with pytest.raises(DuplicateMessage):
            queue.enqueue_many([new_message(n=1, message_id="fresh"), new_message(n=2, message_id="taken")])
        with pytest.raises(DuplicateMessage):
            queue.enqueue_many([new_message(n=3, message_id="twice"), new_message(n=4, message_id="twice")])
        assert _snapshot(queue, ["taken"]) == before
        for absent in ("fresh", "twice"):
            with pytest.raises(UnknownMessage):
                queue.get(absent)

    def test_an_unknown_mailing_has_all_zero_metrics(self, queue: SenderQueue) -> None:
        assert queue.metrics("nobody") == Metrics()
        assert queue.metrics("nobody", sender="s1") == Metrics()
        assert queue.metrics_by_sender("nobody") == {}
        with pytest.raises(UnknownMessage):
            queue.get("no-such-message")

    def test_awkward_ids_are_stored_and_found_exactly(self, queue: SenderQueue) -> None:
        awkward = [
            'it\'s "quoted"',
            "a:b",
            "{hash}tag",
            "'; DROP TABLE messages; --",
            "пример рассылки",
            "邮件",
            "春のセール\u30002026",
            "no\xa0break",
            "x" * 255,
            "back\\slash %s %",
        ]
        for n, name in enumerate(awkward):
            queue.enqueue_many([new_message(mailing=name, sender=name, n=n, message_id=name)])
        for name in awkward:
            message = queue.get(name)
            assert (message.id, message.mailing, message.sender) == (name, name, name)
            assert queue.metrics(name) == Metrics(new=1)
            assert queue.metrics_by_sender(name) == {name: Metrics(new=1)}
        # Joined naively, ("a:b", "c") and ("a", "b:c") would name one queue.
        queue.enqueue_many([new_message("a:b", "c", message_id="1"), new_message("a", "b:c", message_id="2")])
        assert queue.metrics("a:b") == Metrics(new=2)
        assert queue.metrics("a") == Metrics(new=1)
        assert [c.message.id for c in queue.claim("b:c", 10)] == ["2"]

    # -- claim ----------------------------------------------------------------------

    def test_claim_moves_a_message_to_sending(self, queue: SenderQueue) -> None:
        (message_id,) = _fill(queue, 1)
        (claim,) = queue.claim("s1", 10, lease=LEASE)
        assert claim.message.id == message_id
        assert claim.message.state is State.SENDING
        assert claim.message.attempts == 1
        assert claim.expires_at == START + LEASE
        assert claim.token
        assert queue.get(message_id).state is State.SENDING
        assert queue.metrics("m1") == Metrics(sending=1)
        assert queue.claim("s1", 10) == []

    def test_claim_takes_the_oldest_due_across_mailings(self, queue: SenderQueue, clock: ManualClock) -> None:
        order: list[str] = []
        for mailing in ("m1", "m2", "m1", "m2"):
            order += queue.enqueue_many([new_message(mailing, n=len(order))])
            clock.advance(timedelta(seconds=1))
        queue.enqueue_many([new_message("m1", "other", n=9)])
        assert [c.message.id for c in queue.claim("s1", 3)] == order[:3]
        assert [c.message.id for c in queue.claim("s1", 3)] == order[3:]

    def test_claim_orders_by_next_attempt_then_enqueue_order(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        first, second, third = _fill(queue, 3)
        claims = {c.message.id: c for c in queue.claim("s1", 1)}
        queue.soft_bounce(claims[first], "451 busy")  # due again at START + 5 min
        clock.advance(timedelta(minutes=5))
        fourth = _fill(queue, 1)[0]
        assert [c.message.id for c in queue.claim("s1", 10)] == [second, third, first, fourth]

    def test_claim_respects_its_limit(self, queue: SenderQueue) -> None:
        _fill(queue, 5)
        assert len(queue.claim("s1", 2)) == 2
        assert len(queue.claim("s1", 10)) == 3

    def test_a_retry_is_claimed_only_when_due(self, queue: SenderQueue, clock: ManualClock) -> None:
        (message_id,) = _fill(queue, 1)
        queue.soft_bounce(queue.claim("s1")[0], "451 4.7.1 busy")
        assert queue.claim("s1") == []
        clock.advance(timedelta(minutes=5) - timedelta(microseconds=1))
        assert queue.claim("s1") == []
        clock.advance(timedelta(microseconds=1))
        (claim,) = queue.claim("s1")
        assert claim.message.id == message_id
        assert claim.message.attempts == 2

    def test_each_claim_gets_a_fresh_token(self, queue: SenderQueue) -> None:
        _fill(queue, 1)
        first = queue.claim("s1")[0]
        queue.release(first)
        second = queue.claim("s1")[0]
        assert second.token != first.token
        with pytest.raises(LeaseLost):
            queue.deliver(first)
        assert queue.get(second.message.id).state is State.SENDING
        queue.deliver(second)

    # -- reports --------------------------------------------------------------------

    def test_deliver(self, queue: SenderQueue) -> None:
        (message_id,) = _fill(queue, 1)
        queue.deliver(queue.claim("s1")[0])
        message = queue.get(message_id)
        assert (message.state, message.attempts) == (State.DELIVERED, 1)
        assert queue.metrics("m1") == Metrics(delivered=1)

    def test_a_stale_or_unknown_claim_changes_nothing(self, queue: SenderQueue) -> None:
        ids = _fill(queue, 2)
        claim = queue.claim("s1")[0]
        queue.deliver(claim)
        before = _snapshot(queue, ids)
        reports: list[Callable[[], object]] = [
            lambda: queue.deliver(claim),
            lambda: queue.soft_bounce(claim, "451"),
            lambda: queue.hard_bounce(claim, "550"),
            lambda: queue.release(claim),
            lambda: queue.renew(claim),
        ]
        for report in reports:
            with pytest.raises(LeaseLost):
                report()
        forged = attrs.evolve(claim, message=attrs.evolve(claim.message, id=ids[1]))
        with pytest.raises(LeaseLost):
            queue.deliver(forged)
        ghost = attrs.evolve(claim, message=attrs.evolve(claim.message, id="ghost"))
        with pytest.raises(LeaseLost):
            queue.deliver(ghost)
        assert _snapshot(queue, ids) == before

    def test_a_token_spelt_otherwise_is_another_token(self, queue: SenderQueue) -> None:
        ids = _fill(queue, 1)
        (claim,) = queue.claim("s1")
        before = _snapshot(queue, ids)
        for token in ("0" + claim.token, " " + claim.token, claim.token + " ", claim.token + "\n"):
            respelt = attrs.evolve(claim, token=token)
            with pytest.raises(LeaseLost):
                queue.deliver(respelt)
            with pytest.raises(LeaseLost):
                queue.renew(respelt)
        assert _snapshot(queue, ids) == before
        queue.deliver(claim)

    def test_soft_bounce_waits_with_growing_backoff(self, queue: SenderQueue, clock: ManualClock) -> None:
        (message_id,) = _fill(queue, 1)
        queue.soft_bounce(queue.claim("s1")[0], "451 4.7.1 busy")
        message = queue.get(message_id)
        assert (message.state, message.attempts, message.last_error) == (State.RETRIES, 1, "451 4.7.1 busy")
        assert message.next_attempt_at == START + timedelta(minutes=5)
        assert queue.metrics("m1") == Metrics(retries=1)
        clock.advance(timedelta(minutes=5))
        queue.soft_bounce(queue.claim("s1")[0], "421 again")
        assert queue.get(message_id).next_attempt_at == clock() + timedelta(minutes=10)

    def test_soft_bounce_fails_when_attempts_are_exhausted(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        (message_id,) = _fill(queue, 1)
        for _ in range(RETRY.max_attempts - 1):
            queue.soft_bounce(queue.claim("s1")[0], "451 busy")
            clock.advance(RETRY.max_backoff)
        queue.soft_bounce(queue.claim("s1")[0], "451 still busy")
        message = queue.get(message_id)
        assert (message.state, message.attempts, message.last_error) == (State.FAILED, 3, "451 still busy")
        assert queue.metrics("m1") == Metrics(failed=1)

    def test_soft_bounce_fails_when_the_lifetime_is_over(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        (message_id,) = _fill(queue, 1)
        clock.advance(RETRY.max_lifetime)
        queue.soft_bounce(queue.claim("s1")[0], "451 busy")
        assert queue.get(message_id).state is State.FAILED

    def test_hard_bounce_fails(self, queue: SenderQueue) -> None:
        (message_id,) = _fill(queue, 1)
        queue.hard_bounce(queue.claim("s1")[0], "550 5.1.1 no such user")
        message = queue.get(message_id)
        assert (message.state, message.last_error) == (State.FAILED, "550 5.1.1 no such user")

    def test_release_returns_a_new_message_uncounted_and_first_in_line(self, queue: SenderQueue) -> None:
        first, _second = _fill(queue, 2)
        queue.release(queue.claim("s1")[0])
        message = queue.get(first)
        assert (message.state, message.attempts, message.next_attempt_at) == (State.NEW, 0, START)
        assert queue.metrics("m1") == Metrics(new=2)
        assert queue.claim("s1")[0].message.id == first

    def test_release_returns_a_retry_with_its_attempt_time(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        (message_id,) = _fill(queue, 1)
        queue.soft_bounce(queue.claim("s1")[0], "451 busy")
        clock.advance(timedelta(minutes=7))
        queue.release(queue.claim("s1")[0])
        message = queue.get(message_id)
        assert (message.state, message.attempts) == (State.RETRIES, 1)
        assert message.next_attempt_at == START + timedelta(minutes=5)

    def test_renew_extends_the_lease(self, queue: SenderQueue, clock: ManualClock) -> None:
        _fill(queue, 1)
        claim = queue.claim("s1", lease=LEASE)[0]
        clock.advance(timedelta(minutes=8))
        renewed = queue.renew(claim, lease=LEASE)
        assert renewed.token == claim.token
        assert renewed.expires_at == clock() + LEASE
        clock.advance(timedelta(minutes=8))  # past the first expiry, not the renewed one
        assert queue.expire_leases() == 0
        queue.deliver(renewed)
        assert queue.metrics("m1") == Metrics(delivered=1)

    def test_report_many_settles_each_and_returns_what_it_met(self, queue: SenderQueue) -> None:
        ids = _fill(queue, 3)
        one, two, three = queue.claim("s1", 3)
        results = queue.report_many(
            [
                (one, Delivered(code=250, enhanced="2.0.0", text="OK")),
                (two, SoftBounce(code=451, enhanced="4.7.1", text="Try later")),
                (three, HardBounce(code=550, enhanced="5.1.1", text="No such user")),
                (one, Delivered()),
            ]
        )
        assert results[:3] == [None, None, None]
        assert isinstance(results[3], LeaseLost)
        states = [queue.get(i) for i in ids]
        assert [m.state for m in states] == [State.DELIVERED, State.RETRIES, State.FAILED]
        assert [m.last_error for m in states] == [None, "451 4.7.1 Try later", "550 5.1.1 No such user"]
        assert queue.report_many([]) == []

    # -- leases ---------------------------------------------------------------------

    def test_an_expired_lease_counts_as_a_soft_bounce(self, queue: SenderQueue, clock: ManualClock) -> None:
        (message_id,) = _fill(queue, 1)
        claim = queue.claim("s1", lease=LEASE)[0]
        clock.advance(LEASE - timedelta(microseconds=1))
        assert queue.expire_leases() == 0
        clock.advance(timedelta(microseconds=1))
        assert queue.expire_leases() == 1
        message = queue.get(message_id)
        assert (message.state, message.attempts, message.last_error) == (State.RETRIES, 1, "lease expired")
        assert message.next_attempt_at == clock() + RETRY.min_backoff
        with pytest.raises(LeaseLost):
            queue.deliver(claim)
        assert queue.expire_leases() == 0

    def test_claim_settles_its_senders_expired_leases_first(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        (message_id,) = _fill(queue, 1)
        _fill(queue, 1, sender="s2")
        queue.claim("s1", lease=LEASE)
        queue.claim("s2", lease=LEASE)
        clock.advance(LEASE)
        assert queue.claim("s1") == []
        assert queue.get(message_id).state is State.RETRIES
        assert queue.metrics("m1", sender="s2") == Metrics(sending=1)

    def test_a_late_report_is_accepted_until_the_lease_is_settled(
        self, queue: SenderQueue, clock: ManualClock
    ) -> None:
        (message_id,) = _fill(queue, 1)
        claim = queue.claim("s1", lease=LEASE)[0]
        clock.advance(LEASE * 2)
        queue.deliver(claim)
        assert queue.get(message_id).state is State.DELIVERED
        assert queue.expire_leases() == 0

    def test_an_expired_lease_can_exhaust_the_attempts(self, queue: SenderQueue, clock: ManualClock) -> None:
        (message_id,) = _fill(queue, 1)
        for _ in range(RETRY.max_attempts):
            assert len(queue.claim("s1", lease=LEASE)) == 1
            clock.advance(LEASE)
            assert queue.expire_leases() == 1
            clock.advance(RETRY.max_backoff)
        message = queue.get(message_id)
        assert (message.state, message.attempts, message.last_error) == (State.FAILED, 3, "lease expired")

    # -- freeze and unfreeze --------------------------------------------------------

    def _mixed_queue(self, queue: SenderQueue) -> tuple[str, str, str, Claim]:
        """One NEW, one RETRIES and one SENDING message in (m1, s1)."""
        retry_id, sending_id, new_id = _fill(queue, 3)
        first, second = queue.claim("s1", 2)
        queue.soft_bounce(first, "451 busy")
        return new_id, retry_id, sending_id, second

    def test_freeze_moves_new_and_retries_and_spares_sending(self, queue: SenderQueue) -> None:
        new_id, retry_id, sending_id, _ = self._mixed_queue(queue)
        assert queue.freeze("m1") == 2
        assert queue.freeze("m1") == 0
        assert queue.freeze("m1", sender="s1") == 0
        assert queue.metrics("m1") == Metrics(frozen=2, sending=1)
        assert queue.metrics("m1").total == 3
        assert (queue.get(new_id).state, queue.get(new_id).frozen_from) == (State.FROZEN, State.NEW)
        assert (queue.get(retry_id).state, queue.get(retry_id).frozen_from) == (State.FROZEN, State.RETRIES)
        assert queue.get(sending_id).state is State.SENDING

    def test_a_frozen_queue_gives_nothing_to_claim(self, queue: SenderQueue, clock: ManualClock) -> None:
        _fill(queue, 2)
        queue.freeze("m1")
        clock.advance(timedelta(hours=1))
        assert queue.claim("s1", 10) == []

    def test_a_frozen_queue_freezes_what_arrives(self, queue: SenderQueue) -> None:
        _, _, sending_id, claim = self._mixed_queue(queue)
        queue.freeze("m1")
        (late,) = _fill(queue, 1)
        assert (queue.get(late).state, queue.get(late).frozen_from) == (State.FROZEN, State.NEW)
        queue.soft_bounce(claim, "451 busy")
        assert (queue.get(sending_id).state, queue.get(sending_id).frozen_from) == (
            State.FROZEN,
            State.RETRIES,
        )
        assert queue.metrics("m1") == Metrics(frozen=4)

    def test_a_release_into_a_frozen_queue_freezes(self, queue: SenderQueue) -> None:
        (message_id,) = _fill(queue, 1)
        claim = queue.claim("s1")[0]
        queue.freeze("m1")
        queue.release(claim)
        message = queue.get(message_id)
        assert (message.state, message.frozen_from, message.attempts) == (State.FROZEN, State.NEW, 0)

    def test_unfreeze_returns_each_message_to_its_state(self, queue: SenderQueue, clock: ManualClock) -> None:
        new_id, retry_id, _, _ = self._mixed_queue(queue)
        retry_before = queue.get(retry_id)
        queue.freeze("m1")
        clock.advance(timedelta(minutes=1))
        assert queue.unfreeze("m1") == 2
        assert queue.unfreeze("m1") == 0
        assert queue.get(new_id).state is State.NEW
        retry = queue.get(retry_id)
        assert (retry.state, retry.frozen_from) == (State.RETRIES, None)
        assert (retry.attempts, retry.next_attempt_at) == (
            retry_before.attempts,
            retry_before.next_attempt_at,
        )
        assert queue.metrics("m1") == Metrics(new=1, retries=1, sending=1)

    def test_freeze_and_unfreeze_one_sender_queue(self, queue: SenderQueue) -> None:
        _fill(queue, 2, sender="s1")
        _fill(queue, 3, sender="s2")
        assert queue.freeze("m1", sender="s2") == 3
        assert queue.metrics_by_sender("m1") == {"s1": Metrics(new=2), "s2": Metrics(frozen=3)}
        assert len(queue.claim("s1", 10)) == 2
        assert queue.claim("s2", 10) == []
        assert queue.unfreeze("m1", sender="s2") == 3
        assert len(queue.claim("s2", 10)) == 3

    def test_a_mailing_freeze_covers_sender_queues_that_come_later(self, queue: SenderQueue) -> None:
        assert queue.freeze("m1") == 0  # before its first message
        _fill(queue, 2, sender="s1")
        _fill(queue, 1, sender="s2")
        assert queue.metrics("m1") == Metrics(frozen=3)
        assert queue.unfreeze("m1", sender="s1") == 2
        assert queue.metrics_by_sender("m1") == {"s1": Metrics(new=2), "s2": Metrics(frozen=1)}
        _fill(queue, 1, sender="s3")
        assert queue.metrics("m1", sender="s3") == Metrics(frozen=1)
        assert queue.unfreeze("m1") == 2
        assert queue.metrics("m1") == Metrics(new=4)
        _fill(queue, 1, sender="s4")
        assert queue.metrics("m1", sender="s4") == Metrics(new=1)

    def test_a_sender_queue_can_be_frozen_before_its_first_message(self, queue: SenderQueue) -> None:
        assert queue.freeze("m1", sender="s9") == 0
        _fill(queue, 1, sender="s9")
        _fill(queue, 1, sender="s1")
        assert queue.metrics_by_sender("m1") == {"s9": Metrics(frozen=1), "s1": Metrics(new=1)}

    # -- clear ----------------------------------------------------------------------

    def test_clear_deletes_new_frozen_and_retries_and_spares_sending(self, queue: SenderQueue) -> None:
        new_id, retry_id, sending_id, _ = self._mixed_queue(queue)
        queue.freeze("m1", sender="s1")
        (frozen_late,) = _fill(queue, 1)
        assert queue.clear("m1") == 3
        assert queue.clear("m1") == 0
        assert queue.metrics("m1") == Metrics(sending=1, deleted=3)
        for message_id in (new_id, retry_id, frozen_late):
            message = queue.get(message_id)
            assert (message.state, message.frozen_from) == (State.DELETED, None)
        assert queue.get(sending_id).state is State.SENDING

    @pytest.mark.parametrize(
        ("report", "state"),
        [
            ("deliver", State.DELIVERED),
            ("hard_bounce", State.FAILED),
            ("soft_bounce", State.DELETED),
            ("release", State.DELETED),
            ("expire", State.DELETED),
        ],
    )
    def test_a_message_spared_by_clear(
        self, queue: SenderQueue, clock: ManualClock, report: str, state: State
    ) -> None:
        (message_id,) = _fill(queue, 1)
        claim = queue.claim("s1", lease=LEASE)[0]
        assert queue.clear("m1") == 0
        queue.freeze("m1")  # a cleared queue's message does not come back even into a frozen queue
        if report == "expire":
            clock.advance(LEASE)
            assert queue.expire_leases() == 1
        elif report in ("soft_bounce", "hard_bounce"):
            getattr(queue, report)(claim, "4xx/5xx")
        else:
            getattr(queue, report)(claim)
        assert queue.get(message_id).state is state
        assert queue.metrics("m1") == Metrics.count([state])
        queue.unfreeze("m1")
        assert queue.claim("s1") == []

    def test_clear_is_not_a_mode(self, queue: SenderQueue) -> None:
        _fill(queue, 2)
        assert queue.clear("m1") == 2
        (late,) = _fill(queue, 1)
        assert queue.get(late).state is State.NEW
        assert queue.claim("s1")[0].message.id == late

    def test_clear_one_sender_queue(self, queue: SenderQueue) -> None:
        _fill(queue, 2, sender="s1")
        _fill(queue, 3, sender="s2")
        assert queue.clear("m1", sender="s2") == 3
        assert queue.clear("m1", sender="nobody") == 0
        assert queue.metrics_by_sender("m1") == {"s1": Metrics(new=2), "s2": Metrics(deleted=3)}

    def test_a_frozen_queue_stays_frozen_after_clear(self, queue: SenderQueue) -> None:
        _fill(queue, 2)
        queue.freeze("m1")
        assert queue.clear("m1") == 2
        (late,) = _fill(queue, 1)
        assert queue.get(late).state is State.FROZEN

    # -- metrics and history --------------------------------------------------------

    def test_metrics_add_up_over_sender_queues(self, queue: SenderQueue) -> None:
        _fill(queue, 3, sender="s1")
        _fill(queue, 2, sender="s2")
        _fill(queue, 4, mailing="m2", sender="s1")
        queue.deliver(queue.claim("s1")[0])
        queue.freeze("m1", sender="s2")
        by_sender = queue.metrics_by_sender("m1")
        assert by_sender == {"s1": Metrics(new=2, delivered=1), "s2": Metrics(frozen=2)}
        assert by_sender["s1"] + by_sender["s2"] == queue.metrics("m1")
        assert queue.metrics("m2") == Metrics(new=4)

    def test_purge_forgets_old_terminal_messages(self, queue: SenderQueue, clock: ManualClock) -> None:
        delivered, failed, cleared, queued = _fill(queue, 4)
        claims = queue.claim("s1", 2)
        queue.deliver(claims[0])
        queue.hard_bounce(claims[1], "550")
        clock.advance(timedelta(hours=1))
        queue.freeze("m1")
        queue.clear("m1", sender="s1")  # deletes `cleared` and `queued`
        (fresh,) = _fill(queue, 1)
        clock.advance(timedelta(minutes=30))
        assert queue.purge(older_than=timedelta(minutes=45)) == 2
        for gone in (delivered, failed):
            with pytest.raises(UnknownMessage):
                queue.get(gone)
        assert queue.get(cleared).state is State.DELETED
        assert queue.metrics("m1") == Metrics(deleted=2, frozen=1)
        assert queue.purge(older_than=timedelta(0)) == 2
        assert queue.metrics("m1") == Metrics(frozen=1)
        assert queue.get(fresh).state is State.FROZEN
        del queued

    # -- the model and threads ------------------------------------------------------

    def test_matches_the_model(self, new_backend: NewBackend) -> None:
        """Random runs drive the backend and SpecModel side by side; every step must agree."""
        run_state_machine_as_test(
            model_machine(new_backend),
            settings=settings(
                max_examples=self.model_examples,
                stateful_step_count=self.model_steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )

    def test_threads_never_hold_a_message_twice_and_counts_stay_exact(self, new_backend: NewBackend) -> None:
        """Four workers claim and report while an operator freezes, unfreezes and clears."""
        _race(new_backend(), self.thread_messages)


# -- the state machine --------------------------------------------------------------

MAILINGS = st.sampled_from(["m1", "m2"])
SENDERS = st.sampled_from(["s1", "s2"])
VERDICTS: dict[str, Outcome] = {
    "deliver": Delivered(code=250, enhanced="2.0.0", text="OK"),
    "soft": SoftBounce(code=451, enhanced="4.7.1", text="Try later"),
    "hard": HardBounce(code=550, enhanced="5.1.1", text="No such user"),
}


def _view(message: Message | ModelMessage) -> tuple[Any, ...]:
    return (
        message.mailing,
        message.sender,
        message.state,
        message.frozen_from,
        message.attempts,
        message.next_attempt_at,
        message.last_error,
        message.created_at,
        message.updated_at,
    )


def model_machine(new_backend: NewBackend) -> type[RuleBasedStateMachine]:
    """A hypothesis state machine comparing a fresh backend from ``new_backend`` with :class:`SpecModel`."""

    class QueueMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = ManualClock(START)
            self.queue = SenderQueue(new_backend(), clock=self.clock, retry=RETRY)
            self.model = SpecModel(RETRY)
            self.claims: list[tuple[Claim, int]] = []
            self.purged: set[str] = set()
            self.count = 0

        def teardown(self) -> None:
            self.queue.close()

        @rule(mailing=MAILINGS, sender=SENDERS, count=st.integers(1, 3))
        def enqueue(self, mailing: str, sender: str, count: int) -> None:
            batch = []
            for _ in range(count):
                self.count += 1
                batch.append(
                    new_message(mailing, sender, self.count, message_id=f"{mailing}/{sender}/{self.count}")
                )
            assert self.queue.enqueue_many(batch) == [m.message_id for m in batch]
            self.model.enqueue(batch, self.clock())

        @rule(sender=SENDERS, limit=st.integers(1, 4), minutes=st.sampled_from([1, 10, 30]))
        def claim(self, sender: str, limit: int, minutes: int) -> None:
            lease = timedelta(minutes=minutes)
            claims = self.queue.claim(sender, limit, lease)
            expected = self.model.claim(sender, limit, lease, self.clock())
            assert [c.message.id for c in claims] == [message_id for message_id, _ in expected]
            for claim, (_, number) in zip(claims, expected, strict=True):
                assert claim.message.state is State.SENDING
                assert claim.expires_at == self.clock() + lease
                self.claims.append((claim, number))

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), verdict=st.sampled_from(["deliver", "soft", "hard", "release"]))
        def report(self, data: st.DataObject, verdict: str) -> None:
            claim, number = data.draw(st.sampled_from(self.claims))
            valid = self.model.holds(claim.message.id, number)
            outcome = VERDICTS.get(verdict)
            error = str(outcome) if verdict in ("soft", "hard") else None
            calls: dict[str, Callable[[], None]] = {
                "deliver": lambda: self.queue.deliver(claim),
                "soft": lambda: self.queue.soft_bounce(claim, str(outcome)),
                "hard": lambda: self.queue.hard_bounce(claim, str(outcome)),
                "release": lambda: self.queue.release(claim),
            }
            if valid:
                calls[verdict]()
                assert self.model.settle(claim.message.id, number, verdict, error, self.clock())
            else:
                with pytest.raises(LeaseLost):
                    calls[verdict]()

        @precondition(lambda self: self.claims)
        @rule(data=st.data())
        def report_many(self, data: st.DataObject) -> None:
            picks = data.draw(
                st.lists(
                    st.tuples(st.sampled_from(self.claims), st.sampled_from(sorted(VERDICTS))), max_size=4
                )
            )
            results = self.queue.report_many([(claim, VERDICTS[verdict]) for (claim, _), verdict in picks])
            now = self.clock()
            for ((claim, number), verdict), result in zip(picks, results, strict=True):
                error = None if verdict == "deliver" else str(VERDICTS[verdict])
                settled = self.model.settle(claim.message.id, number, verdict, error, now)
                assert (result is None) == settled, (claim.message.id, verdict, result)
                assert result is None or isinstance(result, LeaseLost)

        @precondition(lambda self: self.claims)
        @rule(data=st.data(), minutes=st.sampled_from([1, 10]))
        def renew(self, data: st.DataObject, minutes: int) -> None:
            index = data.draw(st.integers(0, len(self.claims) - 1))
            claim, number = self.claims[index]
            lease = timedelta(minutes=minutes)
            if self.model.renew(claim.message.id, number, lease, self.clock()):
                renewed = self.queue.renew(claim, lease)
                assert renewed.expires_at == self.clock() + lease
                self.claims[index] = (renewed, number)
            else:
                with pytest.raises(LeaseLost):
                    self.queue.renew(claim, lease)

        @rule(mailing=MAILINGS, sender=st.none() | SENDERS)
        def freeze(self, mailing: str, sender: str | None) -> None:
            assert self.queue.freeze(mailing, sender) == self.model.freeze(mailing, sender, self.clock())

        @rule(mailing=MAILINGS, sender=st.none() | SENDERS)
        def unfreeze(self, mailing: str, sender: str | None) -> None:
            assert self.queue.unfreeze(mailing, sender) == self.model.unfreeze(mailing, sender, self.clock())

        @rule(mailing=MAILINGS, sender=st.none() | SENDERS)
        def clear(self, mailing: str, sender: str | None) -> None:
            assert self.queue.clear(mailing, sender) == self.model.clear(mailing, sender, self.clock())

        @rule(minutes=st.sampled_from([1, 4, 5, 10, 30, 61]))
        def advance(self, minutes: int) -> None:
            self.clock.advance(timedelta(minutes=minutes))

        @rule()
        def expire_leases(self) -> None:
            assert self.queue.expire_leases() == self.model.expire(self.clock())

        @rule(minutes=st.sampled_from([0, 30, 120]))
        def purge(self, minutes: int) -> None:
            before = set(self.model.messages)
            expected = self.model.purge(self.clock() - timedelta(minutes=minutes))
            assert self.queue.purge(timedelta(minutes=minutes)) == expected
            self.purged |= before - set(self.model.messages)

        @invariant()
        def agrees_with_the_model(self) -> None:
            for mailing in ("m1", "m2"):
                assert self.queue.metrics(mailing) == self.model.metrics(mailing), mailing
                by_sender = self.queue.metrics_by_sender(mailing)
                for sender in ("s1", "s2"):
                    expected = self.model.metrics(mailing, sender)
                    assert self.queue.metrics(mailing, sender) == expected, (mailing, sender)
                    assert by_sender.get(sender, Metrics()) == expected, (mailing, sender)
            for message_id, expected_message in self.model.messages.items():
                assert _view(self.queue.get(message_id)) == _view(expected_message), message_id
            for message_id in self.purged:
                with pytest.raises(UnknownMessage):
                    self.queue.get(message_id)

    return QueueMachine


# -- the race -----------------------------------------------------------------------


def _race(backend: Backend, messages: int) -> None:
    retry = RetryPolicy(
        min_backoff=timedelta(milliseconds=1), max_backoff=timedelta(milliseconds=4), max_attempts=4
    )
    queue = SenderQueue(backend, retry=retry)
    cells = [("m1", "s1"), ("m1", "s2"), ("m2", "s1"), ("m2", "s2")]
    ids = []
    for n in range(messages):
        mailing, sender = cells[n % len(cells)]
        ids.append(f"{mailing}-{sender}-{n}")
    for start in range(0, messages, 500):
        queue.enqueue_many(
            new_message(*cells[n % len(cells)], n, message_id=ids[n])
            for n in range(start, min(start + 500, messages))
        )
    lock = threading.Lock()
    holders: dict[str, int] = {}
    problems: list[str] = []
    delivered: Counter[str] = Counter()
    operator_done = threading.Event()
    deadline = time.monotonic() + 120

    def drained() -> bool:
        return all(queue.metrics(m).total == 0 for m in ("m1", "m2"))

    def work(number: int, sender: str) -> None:
        rnd = random.Random(number)
        while time.monotonic() < deadline:
            claims = queue.claim(sender, rnd.randint(1, 8), timedelta(minutes=10))
            if not claims:
                if operator_done.is_set() and drained():
                    return
                time.sleep(0.001)
                continue
            reports: list[tuple[Claim, Outcome]] = []
            releases = []
            with lock:
                for claim in claims:
                    if claim.message.id in holders:
                        problems.append(
                            f"{claim.message.id} held by {holders[claim.message.id]} and {number}"
                        )
                    holders[claim.message.id] = number
                # Let go before reporting: once reported, the message may be claimed again at once.
                for claim in claims:
                    del holders[claim.message.id]
            for claim in claims:
                roll = rnd.random()
                if roll < 0.08:
                    releases.append(claim)
                else:
                    outcome = VERDICTS["soft" if roll < 0.16 else "hard" if roll < 0.2 else "deliver"]
                    reports.append((claim, outcome))
            for claim in releases:
                queue.release(claim)
            for (claim, outcome), lost in zip(reports, queue.report_many(reports), strict=True):
                if lost is not None:
                    problems.append(f"{claim.message.id}: unexpected {lost!r}")
                elif isinstance(outcome, Delivered):
                    with lock:
                        delivered[claim.message.id] += 1
        problems.append(f"worker {number} did not finish in time")

    # m2 starts frozen, so that the operator's first clear meets queued messages however threads run.
    queue.freeze("m2")

    def operate() -> None:
        rnd = random.Random(99)
        try:
            if queue.clear("m2", "s1") == 0:
                problems.append("the first clear of a frozen queue deleted nothing")
            for _ in range(300):
                mailing = rnd.choice(["m1", "m2"])
                sender = rnd.choice([None, "s1", "s2"])
                action = rnd.choices(["freeze", "unfreeze", "clear"], weights=[10, 10, 1])[0]
                getattr(queue, action)(mailing, sender)
                for m in ("m1", "m2"):
                    metrics = queue.metrics(m)
                    if min(attrs.astuple(metrics)) < 0:
                        problems.append(f"negative count: {metrics}")
                time.sleep(0.0005)
            for m in ("m1", "m2"):
                queue.unfreeze(m)
        finally:
            operator_done.set()

    threads = [threading.Thread(target=operate)]
    threads += [threading.Thread(target=work, args=(n, f"s{n % 2 + 1}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    states = {message_id: queue.get(message_id).state for message_id in ids}
    assert all(state in (State.DELIVERED, State.FAILED, State.DELETED) for state in states.values())
    for message_id, state in states.items():
        assert delivered[message_id] == (1 if state is State.DELIVERED else 0), message_id
    for mailing in ("m1", "m2"):
        mine = [state for message_id, state in states.items() if message_id.startswith(mailing + "-")]
        assert queue.metrics(mailing) == Metrics.count(mine)
    total = queue.metrics("m1") + queue.metrics("m2")
    assert total.delivered + total.failed + total.deleted == messages
    assert total.delivered > 0
    assert total.deleted > 0
    queue.close()
