"""SenderWorker in production: real SMTP, per-domain limits, graceful stop, a crash (SPEC section 7)."""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from smtp_server import RecordingHandler, smtp_server

import senderqueue as sq

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def fill(queue: sq.SenderQueue, recipients: Sequence[str], sender: str = "s1") -> list[str]:
    return queue.enqueue_many(
        sq.NewMessage(
            mailing="m1",
            sender=sender,
            recipient=recipient,
            content=f"Subject: hi\r\nX-Test-Id: {n}\r\n\r\nhello {recipient}\r\n".encode(),
            mail_from="news@shop.example",
            message_id=f"msg-{n}",
        )
        for n, recipient in enumerate(recipients)
    )


def id_in(received: bytes) -> str:
    header = next(line for line in received.split(b"\r\n") if line.startswith(b"X-Test-Id: "))
    return "msg-" + header.split(b": ")[1].decode()


@pytest.fixture
def handler() -> RecordingHandler:
    handler = RecordingHandler()
    handler.pipelining = True
    return handler


@pytest.fixture
def port(handler: RecordingHandler) -> Iterator[int]:
    with smtp_server(handler) as port:
        yield port


def test_a_worker_delivers_real_mail_and_settles_every_outcome(port: int, handler: RecordingHandler) -> None:
    handler.rcpt_replies = {"gone@b.example": "550 5.1.1 No such user"}
    handler.data_replies = {"busy@b.example": "451 4.3.0 Try later"}
    queue = sq.SenderQueue()
    recipients = [f"u{i}@a.example" for i in range(30)] + ["gone@b.example", "busy@b.example"]
    ids = fill(queue, recipients)
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=8).run_until_idle()
    assert (summary.delivered, summary.soft_bounced, summary.hard_bounced, summary.lost) == (30, 1, 1, 0)
    assert summary.released == 0
    assert queue.metrics("m1") == sq.Metrics(retries=1, delivered=30, failed=1)
    assert queue.get(ids[30]).last_error == "550 5.1.1 No such user"
    assert queue.get(ids[31]).last_error == "451 4.3.0 Try later"
    assert sorted(id_in(r.content) for r in handler.received) == sorted(ids[:30])
    assert 1 <= transport.connections_opened <= 8  # reused across the 32 messages
    assert transport._idle == []  # the run closed its connections


def test_a_dead_smart_host_soft_bounces_everything() -> None:
    from smtp_server import free_port

    queue = sq.SenderQueue()
    fill(queue, ["a@a.example", "b@b.example"])
    transport = sq.SMTPTransport("127.0.0.1", free_port(), timeout=1)
    summary = sq.SenderWorker(queue, transport, sender="s1").run_until_idle()
    assert (summary.delivered, summary.soft_bounced) == (0, 2)
    assert queue.metrics("m1") == sq.Metrics(retries=2)
    last_error = queue.get("msg-0").last_error
    assert last_error is not None
    assert last_error.startswith("421 4.4.1")


def test_a_slow_send_has_its_lease_renewed(port: int, handler: RecordingHandler) -> None:
    handler.data_delay = 1.0  # well past the 0.4 s lease
    queue = sq.SenderQueue()
    (msg_id,) = fill(queue, ["slow@a.example"])
    transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
    worker = sq.SenderWorker(queue, transport, sender="s1", lease=timedelta(seconds=0.4), poll_interval=0.05)
    summary = worker.run_until_idle()
    assert (summary.delivered, summary.lost) == (1, 0)
    assert queue.get(msg_id).state is sq.State.DELIVERED
    assert queue.get(msg_id).attempts == 1


# -- per-destination limits -------------------------------------------------------------


class TimingTransport:
    """Delivers after ``latency``; records per domain the sends in flight and their start times."""

    def __init__(self, latency: float = 0.01, queue: sq.SenderQueue | None = None) -> None:
        self.latency = latency
        self.queue = queue
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.most: collections.Counter[str] = collections.Counter()
        self.starts: dict[str, list[float]] = collections.defaultdict(list)
        self.most_sending = 0

    async def send(self, message: sq.Message) -> sq.Outcome:
        domain = message.recipient.rpartition("@")[2]
        self.starts[domain].append(time.monotonic())
        self.in_flight[domain] += 1
        self.most[domain] = max(self.most[domain], self.in_flight[domain])
        if self.queue is not None:
            self.most_sending = max(self.most_sending, self.queue.metrics("m1").sending)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight[domain] -= 1
        return sq.Delivered()

    async def aclose(self) -> None:
        pass


def test_per_domain_concurrency() -> None:
    queue = sq.SenderQueue()
    fill(queue, [f"u{i}@{d}" for i in range(20) for d in ("slow.example", "Big.Example", "free.example")])
    transport = TimingTransport(queue=queue)
    worker = sq.SenderWorker(
        queue,
        transport,
        sender="s1",
        concurrency=12,
        domain_limit=sq.DomainLimit(concurrency=4),
        domain_limits={"SLOW.example": sq.DomainLimit(concurrency=1)},
    )
    summary = worker.run_until_idle()
    assert summary.delivered == 60
    assert transport.most["slow.example"] == 1
    assert transport.most["Big.Example"] == 4
    assert transport.most["free.example"] == 4
    # Held messages count against the concurrency: never more SENDING than it.
    assert transport.most_sending <= 12
    assert queue.metrics("m1") == sq.Metrics(delivered=60)


def test_per_domain_rate() -> None:
    queue = sq.SenderQueue()
    fill(queue, [f"u{i}@{d}" for i in range(6) for d in ("paced.example", "free.example")])
    transport = TimingTransport(latency=0.0)
    worker = sq.SenderWorker(
        queue,
        transport,
        sender="s1",
        concurrency=10,
        domain_limits={"paced.example": sq.DomainLimit(rate=20)},
    )
    assert worker.run_until_idle().delivered == 12
    starts = transport.starts["paced.example"]
    assert len(starts) == 6
    # 20 per second: five gaps of 50 ms at least. Slack for a late first start on a busy machine only.
    assert starts[-1] - starts[0] >= 5 * 0.05 * 0.8
    assert len(transport.starts["free.example"]) == 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"concurrency": 1.5},
        {"concurrency": True},
        {"rate": 0},
        {"rate": -1.0},
        {"rate": "9"},
    ],
    ids=repr,
)
def test_domain_limit_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises((sq.InvalidArgument, TypeError)):
        sq.DomainLimit(**kwargs)


def test_worker_refuses_a_limit_that_is_not_a_domain_limit() -> None:
    with pytest.raises(sq.InvalidArgument):
        sq.SenderWorker(sq.SenderQueue(), sq.FakeSMTPTransport(), sender="s1", domain_limits={"a": 3})  # type: ignore[dict-item]


class GateTransport:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    async def send(self, message: sq.Message) -> sq.Outcome:
        self.started.release()
        while not self.gate.is_set():
            await asyncio.sleep(0.002)
        return sq.Delivered()

    async def aclose(self) -> None:
        pass


def test_stop_releases_what_was_claimed_but_not_started() -> None:
    queue = sq.SenderQueue()
    ids = fill(queue, [f"u{i}@one.example" for i in range(10)])
    transport = GateTransport()
    worker = sq.SenderWorker(
        queue,
        transport,
        sender="s1",
        concurrency=4,
        poll_interval=0.01,
        domain_limit=sq.DomainLimit(concurrency=1),
    )
    result: list[sq.WorkerSummary] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    assert transport.started.acquire(timeout=10)
    while worker.claimed < 4:  # one in flight, three held for the domain
        time.sleep(0.005)
    assert queue.metrics("m1").sending == 4
    worker.stop()
    transport.gate.set()
    thread.join(timeout=10)
    (summary,) = result
    assert (summary.delivered, summary.released, summary.lost) == (1, 3, 0)
    assert queue.metrics("m1") == sq.Metrics(new=9, delivered=1)
    assert [queue.get(i).attempts for i in ids].count(0) == 9  # a release does not count an attempt
    assert "released 3" in str(summary)


# -- processes: SIGTERM and SIGKILL -----------------------------------------------------

WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import senderqueue as sq

    url, port, concurrency, lease, per_domain, enqueue = sys.argv[1:7]
    queue = sq.SenderQueue.open(url)
    if enqueue == "yes":
        queue.enqueue_many(
            sq.NewMessage(mailing="m1", sender="s1", recipient=f"u{n}@one.example",
                          content=f"Subject: hi\\r\\nX-Test-Id: {n}\\r\\n\\r\\nhello\\r\\n".encode(),
                          mail_from="news@shop.example", message_id=f"msg-{n}")
            for n in range(10)
        )
    worker = sq.SenderWorker(
        queue, sq.SMTPTransport("127.0.0.1", int(port), timeout=10), sender="s1",
        concurrency=int(concurrency), lease=timedelta(seconds=float(lease)), poll_interval=0.05,
        domain_limit=sq.DomainLimit(concurrency=int(per_domain)),
    )
    print("started", flush=True)
    summary = worker.run()
    metrics = queue.metrics("m1")
    print(json.dumps({"summary": {"delivered": summary.delivered, "released": summary.released,
                                  "lost": summary.lost, "soft": summary.soft_bounced},
                      "metrics": metrics.as_dict()}), flush=True)
    """
)


def start_worker(tmp_path: Path, *args: object) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_sigterm_stops_gracefully(tmp_path: Path, port: int, handler: RecordingHandler) -> None:
    handler.data_delay = 0.5
    process = start_worker(tmp_path, "memory://", port, 4, 30, 1, "yes")
    try:
        assert handler.data_started.wait(30), process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    # The send in flight finished and was reported; the three held for the domain were released.
    assert report["summary"] == {"delivered": 1, "released": 3, "lost": 0, "soft": 0}
    assert report["metrics"]["sending"] == 0
    assert report["metrics"]["new"] == 9
    assert report["metrics"]["delivered"] == 1
    assert len(handler.received) == 1


def sql_backend_url(tmp_path: Path) -> str:
    if importlib.util.find_spec("senderqueue_sql") is None:
        reason = "the SIGKILL crash test needs a backend shared by processes (senderqueue_sql not installed)"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"!!! NOT TESTED: {reason}")
    return f"sqlite:///{tmp_path / 'queue.db'}"


def test_a_worker_killed_mid_send_loses_nothing(
    tmp_path: Path, port: int, handler: RecordingHandler, record_property: Any
) -> None:
    url = sql_backend_url(tmp_path)
    handler.data_delay = 0.1
    lease = 1.0
    retry = sq.RetryPolicy(min_backoff=timedelta(milliseconds=1), max_backoff=timedelta(milliseconds=1))
    with sq.SenderQueue.open(url, retry=retry) as queue:
        total = 40
        ids = fill(queue, [f"u{i}@d{i % 4}.example" for i in range(total)])
        process = start_worker(tmp_path, url, port, 5, lease, 5, "no")
        try:
            deadline = time.monotonic() + 60
            # Between two waves it holds no claim (five sends finish together): kill it mid-wave.
            while (
                len(handler.received) < 10 or queue.metrics("m1").sending == 0
            ) and time.monotonic() < deadline:
                time.sleep(0.01)
            process.kill()  # SIGKILL: no chance to report or release
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        killed_at = len(handler.received)
        assert 10 <= killed_at < total, "the worker was to be killed mid-run"
        assert queue.metrics("m1").sending > 0  # it died holding claims
        time.sleep(lease)  # the dead worker's leases run out
        transport = sq.SMTPTransport("127.0.0.1", port, timeout=5)
        for _ in range(100):  # expired leases come back as retries a millisecond later
            sq.SenderWorker(queue, transport, sender="s1", concurrency=5).run_until_idle()
            if queue.metrics("m1").total == 0:
                break
            time.sleep(0.01)
        assert queue.metrics("m1") == sq.Metrics(delivered=total)
    counts = collections.Counter(id_in(r.content) for r in handler.received)
    assert set(counts) == set(ids)  # every message reached the server at least once
    duplicates = sorted(msg_id for msg_id, n in counts.items() if n > 1)
    record_property("duplicates", len(duplicates))
    print(f"delivered {total}, duplicates {len(duplicates)}: {duplicates}")
    assert len(duplicates) <= 5  # at most what was in flight when the worker died
