"""SenderWorker over a memory SenderQueue and scripted transports (SPEC section 7)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import senderqueue as sq
from senderqueue.testing import ManualClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def queue(clock: ManualClock) -> sq.SenderQueue:
    return sq.SenderQueue(clock=clock)


def fill(
    queue: sq.SenderQueue, recipients: Sequence[str], mailing: str = "m1", sender: str = "s1"
) -> list[str]:
    return queue.enqueue_many(
        sq.NewMessage(
            mailing=mailing,
            sender=sender,
            recipient=recipient,
            content=b"Subject: hi\r\n\r\nhello\r\n",
            mail_from="news@shop.example",
        )
        for recipient in recipients
    )


def users(n: int, domain: str = "example.com") -> list[str]:
    return [f"user{i}@{domain}" for i in range(n)]


class RecordingTransport:
    """Delivers everything after ``latency``; counts the sends in flight at once."""

    def __init__(self, latency: float = 0.0, on_send: Callable[[sq.Message], None] | None = None) -> None:
        self.latency = latency
        self.on_send = on_send
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent: list[str] = []

    async def send(self, message: sq.Message) -> sq.Outcome:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.on_send is not None:
                self.on_send(message)
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        self.sent.append(message.id)
        return sq.Delivered(code=250, enhanced="2.0.0", text="OK")

    async def aclose(self) -> None:
        pass


def test_run_until_idle_delivers_everything(queue: sq.SenderQueue) -> None:
    ids = fill(queue, users(25))
    other = fill(queue, users(3), sender="s2")
    transport = sq.FakeSMTPTransport()
    summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=5).run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.hard_bounced, summary.lost) == (25, 0, 0, 0)
    assert summary.attempts == 25
    assert summary.elapsed > 0
    assert summary.rate == pytest.approx(25 / summary.elapsed)
    assert queue.metrics("m1", sender="s1") == sq.Metrics(delivered=25)
    assert sorted(m.id for m in transport.delivered) == sorted(ids)
    assert len(transport.attempts) == 25
    for msg_id in ids:
        message = queue.get(msg_id)
        assert (message.state, message.attempts, message.last_error) == (sq.State.DELIVERED, 1, None)
    # Another sender's messages are not this worker's.
    assert {queue.get(i).state for i in other} == {sq.State.NEW}


def test_run_until_idle_with_nothing_to_do(queue: sq.SenderQueue) -> None:
    summary = sq.SenderWorker(queue, sq.FakeSMTPTransport(), sender="s1").run_until_idle()
    assert summary.attempts == summary.lost == 0
    assert summary.rate == 0.0


def test_a_frozen_mailing_is_not_sent(queue: sq.SenderQueue) -> None:
    fill(queue, users(4))
    queue.freeze("m1")
    transport = sq.FakeSMTPTransport()
    summary = sq.SenderWorker(queue, transport, sender="s1").run_until_idle()
    assert summary.attempts == 0
    assert transport.attempts == []
    assert queue.metrics("m1") == sq.Metrics(frozen=4)


def test_soft_bounces_wait_for_their_retry_time(queue: sq.SenderQueue, clock: ManualClock) -> None:
    slow = fill(queue, users(3, "slow.example"))
    fast = fill(queue, users(2, "fast.example"))
    transport = sq.FakeSMTPTransport({"slow.example": ["451 4.7.1 Try later", "250 2.0.0 OK"]})
    worker = sq.SenderWorker(queue, transport, sender="s1", concurrency=10)

    first = worker.run_until_idle()  # returns: the retries are not due under a clock that stands still
    assert (first.delivered, first.soft_bounced, first.hard_bounced) == (2, 3, 0)
    assert queue.metrics("m1") == sq.Metrics(retries=3, delivered=2)
    for msg_id in slow:
        message = queue.get(msg_id)
        assert message.state is sq.State.RETRIES
        assert message.attempts == 1
        assert message.last_error == "451 4.7.1 Try later"
        assert message.next_attempt_at == T0 + timedelta(minutes=5)

    again = worker.run_until_idle()
    assert again.attempts == 0
    clock.advance(timedelta(minutes=5) - timedelta(microseconds=1))
    assert worker.run_until_idle().attempts == 0

    clock.advance(timedelta(microseconds=1))
    later = worker.run_until_idle()
    assert (later.delivered, later.soft_bounced) == (3, 0)
    assert queue.metrics("m1") == sq.Metrics(delivered=5)
    assert [a.message.id for a in transport.attempts].count(slow[0]) == 2
    assert [a.message.id for a in transport.attempts].count(fast[0]) == 1
    assert all(queue.get(i).attempts == 2 for i in slow)


def test_soft_bounces_fail_when_attempts_run_out(clock: ManualClock) -> None:
    queue = sq.SenderQueue(clock=clock, retry=sq.RetryPolicy(max_attempts=2))
    (msg_id,) = fill(queue, ["a@down.example"])
    worker = sq.SenderWorker(queue, sq.FakeSMTPTransport({"*": "421 4.4.2 Timeout"}), sender="s1")
    assert worker.run_until_idle().soft_bounced == 1
    assert queue.get(msg_id).state is sq.State.RETRIES
    clock.advance(timedelta(hours=1))
    assert worker.run_until_idle().soft_bounced == 1
    message = queue.get(msg_id)
    assert (message.state, message.attempts, message.last_error) == (sq.State.FAILED, 2, "421 4.4.2 Timeout")
    assert queue.metrics("m1") == sq.Metrics(failed=1)


def test_hard_bounces_fail(queue: sq.SenderQueue) -> None:
    bad, good = fill(queue, ["bob@example.com", "ann@example.com"])
    transport = sq.FakeSMTPTransport({"bob@example.com": "550 5.1.1 No such user"})
    summary = sq.SenderWorker(queue, transport, sender="s1").run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.hard_bounced) == (1, 0, 1)
    message = queue.get(bad)
    assert (message.state, message.attempts) == (sq.State.FAILED, 1)
    assert message.last_error == "550 5.1.1 No such user"
    assert queue.get(good).state is sq.State.DELIVERED
    assert queue.metrics("m1") == sq.Metrics(delivered=1, failed=1)


def test_concurrency_is_bounded(queue: sq.SenderQueue) -> None:
    fill(queue, users(30))
    most_sending = [0]

    def watch(_: sq.Message) -> None:
        # A message is SENDING only while it is in flight: never more than the concurrency.
        most_sending[0] = max(most_sending[0], queue.metrics("m1").sending)

    transport = RecordingTransport(latency=0.01, on_send=watch)
    summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=4).run_until_idle()
    assert summary.delivered == 30
    assert 1 < transport.most_in_flight <= 4
    assert 1 <= most_sending[0] <= 4
    assert len(set(transport.sent)) == 30


def test_concurrency_of_one_sends_one_at_a_time(queue: sq.SenderQueue) -> None:
    fill(queue, users(5))
    transport = RecordingTransport(latency=0.001)
    assert sq.SenderWorker(queue, transport, sender="s1", concurrency=1).run_until_idle().delivered == 5
    assert transport.most_in_flight == 1


class StaggeredTransport:
    """Delivers each message after a latency of its own, looked up by recipient (0 by default)."""

    def __init__(self, latencies: Callable[[str], float]) -> None:
        self.latencies = latencies

    async def send(self, message: sq.Message) -> sq.Outcome:
        await asyncio.sleep(self.latencies(message.recipient))
        return sq.Delivered(code=250, enhanced="2.0.0", text="OK")

    async def aclose(self) -> None:
        pass


def test_finished_sends_are_reported_and_replaced_in_waves(
    queue: sq.SenderQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(queue, users(500))
    calls = {"claim": 0, "report_many": 0}
    for name in calls:
        method = getattr(queue, name)

        def counted(*args: Any, _method: Callable[..., Any] = method, _name: str = name) -> Any:
            calls[_name] += 1
            return _method(*args)

        monkeypatch.setattr(queue, name, counted)
    # Sends finish one by one, 0.2 ms apart: without waves, each would cost a report and a claim.
    transport = StaggeredTransport(lambda recipient: int(recipient[4:].partition("@")[0]) % 50 * 0.0002)
    summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=50).run_until_idle()
    assert summary.delivered == 500
    assert calls["report_many"] <= 100  # about 50 in waves of 5 or more; about 150 one by one
    assert calls["claim"] <= 102


def test_a_send_that_finishes_alone_is_reported_without_waiting_for_its_wave(queue: sq.SenderQueue) -> None:
    (fast,) = fill(queue, ["fast@example.com"])
    fill(queue, users(9))
    transport = StaggeredTransport(lambda recipient: 0.0 if recipient.startswith("fast") else 1.0)
    worker = sq.SenderWorker(queue, transport, sender="s1", concurrency=50)  # a wave is 5 sends
    thread = threading.Thread(target=worker.run_until_idle)
    thread.start()
    try:
        for _ in range(400):  # well within the slow sends' second
            if queue.get(fast).state is sq.State.DELIVERED:
                break
            threading.Event().wait(0.001)
        assert queue.get(fast).state is sq.State.DELIVERED
        assert queue.metrics("m1").sending == 9
    finally:
        thread.join(10)
    assert queue.metrics("m1") == sq.Metrics(delivered=10)


class RaisingTransport:
    async def send(self, message: sq.Message) -> sq.Outcome:
        if message.recipient.startswith("boom"):
            raise ConnectionResetError("boom went the socket")
        return sq.Delivered()

    async def aclose(self) -> None:
        pass


def test_a_transport_that_raises_is_a_soft_bounce(queue: sq.SenderQueue) -> None:
    broken, fine = fill(queue, ["boom@example.com", "fine@example.com"])
    summary = sq.SenderWorker(queue, RaisingTransport(), sender="s1").run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.hard_bounced, summary.lost) == (1, 1, 0, 0)
    message = queue.get(broken)
    assert (message.state, message.attempts) == (sq.State.RETRIES, 1)
    assert message.last_error is not None
    assert message.last_error.startswith("451 4.3.0 transport error")
    assert "boom went the socket" in message.last_error
    assert queue.get(fine).state is sq.State.DELIVERED


class MisbehavingTransport:
    """Returns something that is not an outcome, or is cancelled from within, for some recipients."""

    async def send(self, message: sq.Message) -> sq.Outcome:
        if message.recipient.startswith("none"):
            return None  # type: ignore[return-value]  # what a user's untyped transport may do
        if message.recipient.startswith("cancelled"):
            raise asyncio.CancelledError  # e.g. an inner task of the transport's, cancelled
        await asyncio.sleep(0.01)
        return sq.Delivered()

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("bad", ["none", "cancelled"])
def test_a_send_that_ends_without_an_outcome_is_a_soft_bounce_and_its_wave_is_reported(
    queue: sq.SenderQueue, bad: str
) -> None:
    broken, *fine = fill(queue, [f"{bad}@example.com", *users(9)])
    summary = sq.SenderWorker(queue, MisbehavingTransport(), sender="s1", concurrency=10).run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.lost) == (9, 1, 0)
    message = queue.get(broken)
    assert (message.state, message.attempts) == (sq.State.RETRIES, 1)  # it may have gone: the attempt counts
    assert message.last_error is not None
    assert message.last_error.startswith("451 4.3.0 transport error")
    assert {queue.get(i).state for i in fine} == {sq.State.DELIVERED}


class GatedTransport:
    """Holds every send until ``gate`` opens; counts the sends that started."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.sent: list[str] = []

    async def send(self, message: sq.Message) -> sq.Outcome:
        self.started.release()
        while not self.gate.is_set():
            await asyncio.sleep(0.002)
        self.sent.append(message.id)
        return sq.Delivered()

    async def aclose(self) -> None:
        pass


def _run_in_thread(worker: sq.SenderWorker) -> tuple[threading.Thread, list[sq.WorkerSummary]]:
    result: list[sq.WorkerSummary] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    return thread, result


def test_stop_from_another_thread_finishes_in_flight_sends(queue: sq.SenderQueue) -> None:
    ids = fill(queue, users(20))
    transport = GatedTransport()
    worker = sq.SenderWorker(queue, transport, sender="s1", concurrency=3, poll_interval=0.01)
    thread, result = _run_in_thread(worker)
    for _ in range(3):
        assert transport.started.acquire(timeout=10)
    assert queue.metrics("m1") == sq.Metrics(new=17, sending=3)
    worker.stop()
    transport.gate.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    (summary,) = result
    assert summary.delivered == 3
    assert summary.lost == 0
    assert queue.metrics("m1") == sq.Metrics(new=17, delivered=3)
    states = [queue.get(i).state for i in ids]
    assert sq.State.SENDING not in states
    assert sorted(transport.sent) == sorted(
        i for i, s in zip(ids, states, strict=True) if s is sq.State.DELIVERED
    )


def test_a_stop_that_comes_during_a_claim_releases_what_it_claimed(
    queue: sq.SenderQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = fill(queue, users(5))
    transport = RecordingTransport()
    worker = sq.SenderWorker(queue, transport, sender="s1", concurrency=5, poll_interval=0.01)
    claim = queue.claim

    def claim_while_stopped(*args: Any) -> list[sq.Claim]:
        worker.stop()  # SIGTERM while the backend answers the claim
        return claim(*args)

    monkeypatch.setattr(queue, "claim", claim_while_stopped)
    thread, result = _run_in_thread(worker)
    thread.join(timeout=10)
    assert not thread.is_alive()
    (summary,) = result
    assert (summary.attempts, summary.released) == (0, 5)
    assert transport.sent == []
    assert queue.metrics("m1") == sq.Metrics(new=5)
    assert {queue.get(i).attempts for i in ids} == {0}


def test_stop_an_idle_worker(queue: sq.SenderQueue) -> None:
    worker = sq.SenderWorker(queue, sq.FakeSMTPTransport(), sender="s1", poll_interval=0.01)
    thread, result = _run_in_thread(worker)
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert result[0].attempts == 0


def test_a_stopped_worker_runs_again(queue: sq.SenderQueue) -> None:
    worker = sq.SenderWorker(queue, sq.FakeSMTPTransport(), sender="s1", poll_interval=0.01)
    thread, _ = _run_in_thread(worker)
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    fill(queue, users(3))
    summary = worker.run_until_idle()
    assert summary.delivered == 3
    assert queue.metrics("m1") == sq.Metrics(delivered=3)


def test_a_running_worker_picks_up_new_messages(queue: sq.SenderQueue) -> None:
    delivered = threading.Semaphore(0)
    transport = RecordingTransport(on_send=lambda _: delivered.release())
    worker = sq.SenderWorker(queue, transport, sender="s1", poll_interval=0.01)
    thread, result = _run_in_thread(worker)
    try:
        fill(queue, users(2))
        for _ in range(2):
            assert delivered.acquire(timeout=10)
    finally:
        worker.stop()
        thread.join(timeout=10)
    assert result[0].delivered == 2
    assert queue.metrics("m1") == sq.Metrics(delivered=2)


def test_a_lease_settled_meanwhile_counts_as_lost(queue: sq.SenderQueue, clock: ManualClock) -> None:
    (msg_id,) = fill(queue, ["slow@example.com"])

    def expire_meanwhile(_: sq.Message) -> None:
        clock.advance(timedelta(minutes=2))
        assert queue.expire_leases() == 1

    transport = RecordingTransport(on_send=expire_meanwhile)
    worker = sq.SenderWorker(queue, transport, sender="s1", lease=timedelta(minutes=1))
    summary = worker.run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.hard_bounced, summary.lost) == (0, 0, 0, 1)
    assert transport.sent == [msg_id]
    message = queue.get(msg_id)
    assert (message.state, message.attempts, message.last_error) == (sq.State.RETRIES, 1, "lease expired")
    assert queue.metrics("m1") == sq.Metrics(retries=1)


def test_a_long_send_has_its_lease_renewed(
    queue: sq.SenderQueue, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    (msg_id,) = fill(queue, ["slow@example.com"])
    renewed = threading.Event()
    renew = queue.renew

    def renew_and_tell(claim: sq.Claim, lease: timedelta = sq.DEFAULT_LEASE) -> sq.Claim:
        result = renew(claim, lease)
        renewed.set()
        return result

    monkeypatch.setattr(queue, "renew", renew_and_tell)
    expired: list[int] = []

    class SlowTransport:
        async def send(self, message: sq.Message) -> sq.Outcome:
            clock.advance(timedelta(seconds=40))  # 20 s of a 60 s lease left: under half
            for _ in range(2000):  # the worker renews meanwhile (waits 10 s at most, not to hang)
                if renewed.is_set():
                    break
                await asyncio.sleep(0.005)
            clock.advance(timedelta(seconds=40))  # past the original lease
            expired.append(queue.expire_leases())
            return sq.Delivered()

        async def aclose(self) -> None:
            pass

    worker = sq.SenderWorker(
        queue, SlowTransport(), sender="s1", lease=timedelta(seconds=60), poll_interval=0.01
    )
    summary = worker.run_until_idle()
    assert renewed.is_set()
    assert expired == [0]
    assert (summary.delivered, summary.lost) == (1, 0)
    assert queue.get(msg_id).state is sq.State.DELIVERED


def test_a_send_is_reported_with_its_claim_as_last_renewed(
    queue: sq.SenderQueue, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(queue, ["slow@example.com"])
    renewed: list[sq.Claim] = []
    reported: list[sq.Claim] = []
    renew, report_many = queue.renew, queue.report_many

    def spy_renew(claim: sq.Claim, lease: timedelta = sq.DEFAULT_LEASE) -> sq.Claim:
        renewed.append(renew(claim, lease))
        return renewed[-1]

    def spy_report_many(reports: list[tuple[sq.Claim, sq.Outcome]]) -> list[sq.LeaseLost | None]:
        reported.extend(claim for claim, _ in reports)
        return report_many(reports)

    monkeypatch.setattr(queue, "renew", spy_renew)
    monkeypatch.setattr(queue, "report_many", spy_report_many)

    class SlowTransport:
        async def send(self, message: sq.Message) -> sq.Outcome:
            clock.advance(timedelta(seconds=40))  # under half of the 60 s lease left
            for _ in range(2000):  # the worker renews meanwhile (waits 10 s at most, not to hang)
                if renewed:
                    break
                await asyncio.sleep(0.005)
            return sq.Delivered()

        async def aclose(self) -> None:
            pass

    worker = sq.SenderWorker(
        queue, SlowTransport(), sender="s1", lease=timedelta(seconds=60), poll_interval=0.01
    )
    assert worker.run_until_idle().delivered == 1
    assert len(renewed) == 1
    assert reported == renewed  # not the claim as first claimed: a backend may renew with a new token


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sender": ""},
        {"sender": "s\n1"},
        {"concurrency": 0},
        {"concurrency": -2},
        {"concurrency": True},
        {"lease": timedelta(0)},
        {"poll_interval": 0},
        {"poll_interval": -1.0},
    ],
    ids=repr,
)
def test_worker_refuses_bad_arguments(queue: sq.SenderQueue, kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"sender": "s1", **kwargs}
    with pytest.raises(sq.InvalidArgument):
        sq.SenderWorker(queue, sq.FakeSMTPTransport(), **arguments)


_SIGNAL_SCRIPT = """
import asyncio, json, os, signal, sys
import senderqueue as sq

queue = sq.SenderQueue()
queue.enqueue_many(
    sq.NewMessage(mailing="m1", sender="s1", recipient=f"u{i}@example.com", content=b"x",
                  mail_from="f@example.com")
    for i in range(10)
)

class Transport:
    signalled = False

    async def send(self, message):
        if not Transport.signalled:
            Transport.signalled = True
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        await asyncio.sleep(0.05)
        return sq.Delivered()

    async def aclose(self):
        pass

summary = sq.SenderWorker(queue, Transport(), sender="s1", concurrency=2, poll_interval=0.01).run()
print(json.dumps({"delivered": summary.delivered, **queue.metrics("m1").as_dict()}))
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_run_stops_gracefully_on_a_signal(signal_name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_SCRIPT, signal_name], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The two sends in flight when the signal came finished and were reported; nothing more was claimed.
    assert result["delivered"] == 2
    assert (result["sending"], result["new"], result["delivered"]) == (0, 8, 2)


class FlakyBackend(sq.MemoryBackend):
    """A memory backend whose claim, settle and renew fail (with no effect) while told to."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: dict[str, int] = {}  # method name -> calls left to fail
        self.failed: list[str] = []

    def _trip(self, name: str) -> None:
        left = self.failing.get(name, 0)
        if left:
            self.failing[name] = left - 1
            self.failed.append(name)
            raise sq.BackendError(f"{name}: connection lost")

    def claim(self, *args: Any, **kwargs: Any) -> list[sq.Claim]:
        self._trip("claim")
        return super().claim(*args, **kwargs)

    def settle(self, *args: Any, **kwargs: Any) -> list[sq.LeaseLost | None]:
        self._trip("settle")
        return super().settle(*args, **kwargs)

    def renew(self, *args: Any, **kwargs: Any) -> sq.Claim:
        self._trip("renew")
        return super().renew(*args, **kwargs)


def test_a_failing_backend_is_called_again_and_nothing_is_lost(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FlakyBackend()
    queue = sq.SenderQueue(backend, clock=clock)
    ids = fill(queue, users(30))
    backend.failing = {"claim": 2, "settle": 3}
    transport = RecordingTransport()
    with caplog.at_level("WARNING", logger="senderqueue.worker"):
        summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=10).run_until_idle()
    assert backend.failed == ["claim", "claim", "settle", "settle", "settle"]
    assert sorted(transport.sent) == sorted(ids)  # each sent once: a failed report is not a resend
    assert summary.delivered == 30
    assert summary.lost == 0
    metrics = queue.metrics("m1")
    assert (metrics.total, metrics.delivered) == (0, 30)
    assert sum("failed, again in" in record.getMessage() for record in caplog.records) == 5


def test_a_report_that_keeps_failing_gives_up_once_the_lease_is_over(clock: ManualClock) -> None:
    backend = FlakyBackend()
    queue = sq.SenderQueue(backend, clock=clock)
    fill(queue, users(3))
    backend.failing = {"settle": 10**6}
    worker = sq.SenderWorker(
        queue, RecordingTransport(), sender="s1", concurrency=3, lease=timedelta(seconds=0.2)
    )
    with pytest.raises(sq.BackendError, match="settle: connection lost"):
        worker.run_until_idle()
    # Nothing was reported: the three are still SENDING, due again when their leases expire.
    assert queue.metrics("m1").sending == 3


def test_a_failing_renewal_is_tried_again(clock: ManualClock) -> None:
    backend = FlakyBackend()
    queue = sq.SenderQueue(backend, clock=clock)
    (message_id,) = fill(queue, users(1))
    lease = timedelta(seconds=60)
    backend.failing = {"renew": 1}

    def age(_: sq.Message) -> None:
        clock.advance(timedelta(seconds=40))  # past half the lease: due for renewal

    transport = RecordingTransport(latency=0.3, on_send=age)
    summary = sq.SenderWorker(
        queue, transport, sender="s1", concurrency=1, lease=lease, poll_interval=0.05
    ).run_until_idle()
    assert backend.failed == ["renew"]
    assert summary.delivered == 1
    assert queue.get(message_id).state is sq.State.DELIVERED
