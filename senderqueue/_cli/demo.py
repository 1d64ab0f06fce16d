"""The demo's story: a mailing delivered through the fake SMTP server, with an operator at the controls.

Every duration is a realistic one (an SMTP transaction takes seconds, a soft bounce
waits minutes) measured on a :class:`ScaledClock`, so the whole story plays in seconds.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from types import TracebackType

import attrs

from .._models import Metrics, NewMessage
from .._queue import SenderQueue
from .._retry import RetryPolicy
from .._transport import FakeSMTPTransport
from .._worker import SenderWorker
from ..testing import ScaledClock

__all__ = ["Demo", "DemoSummary", "MailingResult", "Snapshot"]

SMTP_TRANSACTION = timedelta(seconds=6)
"""How long one delivery to a remote server takes: connection, TLS, envelope, data."""

CONNECTIONS = 20
"""SMTP connections each sender keeps open at once."""

RETRY = RetryPolicy(
    min_backoff=timedelta(minutes=5),
    max_backoff=timedelta(hours=1),
    max_attempts=20,
    max_lifetime=timedelta(days=5),
    jitter=0.2,
)
"""A production-like policy: 5, 10, 20, 40 minutes, then hourly, for up to five days."""

DRAFT_NOTICED = 0.2
"""The share of the draft that has gone out when the operator notices the mistake."""

FREEZE_AT = 0.3
"""The share of the mailing done (delivered or failed) when the operator freezes it."""

FREEZE_HOLD = timedelta(minutes=4)
"""How long the mailing stays frozen, on the demo clock."""

GREYLISTED = "451 4.7.1 Greylisted, please try again later"

# Where the recipients' mailboxes are, per 100 recipients, and what their servers answer
# (attempt by attempt, the last repeating). Unscripted domains accept at once.
DOMAINS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("greylist.example", 3, (GREYLISTED, GREYLISTED, "250 2.0.0 OK")),
    ("busy.example", 1, ("421 4.7.0 Too many connections from your IP, slow down", "250 2.0.0 OK")),
    ("gone.example", 2, ("550 5.1.1 The email account that you tried to reach does not exist",)),
    ("example.com", 44, ()),
    ("example.net", 30, ()),
    ("example.org", 20, ()),
)

FIRST_NAMES = ("ann", "bo", "chloe", "dev", "emma", "farid", "grace", "hugo", "ines", "jun", "kofi", "lea")


@attrs.frozen
class Mailing:
    """A mailing of the demo.

    Attributes:
        name: its id in the queue.
        size: how many messages it was launched with.
        subject: the subject line of its content.
    """

    name: str
    size: int
    subject: str


@attrs.frozen(kw_only=True)
class Snapshot:
    """What the screen shows at one moment.

    Attributes:
        main, draft: the two mailings and their metrics.
        by_sender: the main mailing's metrics per sender queue.
        frozen: whether the operator holds the main mailing frozen.
        elapsed: real seconds since the launch.
        story_time: time since the launch on the demo clock.
    """

    main: tuple[Mailing, Metrics]
    draft: tuple[Mailing, Metrics]
    by_sender: dict[str, Metrics]
    frozen: bool
    elapsed: float
    story_time: timedelta

    @property
    def done(self) -> int:
        """Messages of the main mailing with a verdict: delivered or failed."""
        metrics = self.main[1]
        return metrics.delivered + metrics.failed


@attrs.frozen
class MailingResult:
    """How one mailing ended.

    Attributes:
        mailing: the mailing.
        metrics: its final counts.
    """

    mailing: Mailing
    metrics: Metrics


@attrs.frozen(kw_only=True)
class DemoSummary:
    """How the demo ended.

    Attributes:
        mailings: each mailing's final counts.
        attempts: SMTP transactions the fake server saw.
        lost: reports refused because the lease had run out first.
        elapsed: real seconds from launch to the last verdict.
        story_time: the same span on the demo clock.
    """

    mailings: tuple[MailingResult, ...]
    attempts: int
    lost: int
    elapsed: float
    story_time: timedelta

    @property
    def rate(self) -> float:
        """Attempts per real second."""
        return self.attempts / self.elapsed if self.elapsed > 0 else 0.0


class Demo:
    """Two mailings on one queue, a worker per sender, and the operator's afternoon in :meth:`story`.

    Args:
        url: the backend; mailing names already in use there get a numbered suffix.
        messages: the size of the main mailing (the mistaken draft is a tenth of it).
        senders: how many senders share the mailing.
        speed: how many times faster than real time the demo clock runs.
    """

    def __init__(self, url: str, *, messages: int, senders: int, speed: float) -> None:
        self.clock = ScaledClock(speed)
        self.queue = SenderQueue.open(url, clock=self.clock, retry=RETRY)
        self.senders = [f"mta-{n}" for n in range(1, senders + 1)]
        self.main = Mailing(self._unused_name("spring-sale"), messages, "Spring sale: 20% off everything")
        self.draft = Mailing(
            self._unused_name("spring-sale-draft"), max(1, messages // 10), "DRAFT spring sale"
        )
        rules = {domain: replies for domain, _, replies in DOMAINS if replies}
        self.transport = FakeSMTPTransport(rules, latency=SMTP_TRANSACTION.total_seconds() / speed)
        # The clock runs fast; a lease must still outlast a real send on a busy machine.
        lease = max(timedelta(minutes=5), timedelta(seconds=5 * speed))
        self.workers = [
            SenderWorker(
                self.queue,
                self.transport,
                sender=sender,
                concurrency=CONNECTIONS,
                lease=lease,
                poll_interval=0.05,
            )
            for sender in self.senders
        ]
        self.frozen = False
        self._threads: list[threading.Thread] = []
        self._lost = 0
        self._crashes: list[Exception] = []
        self._lock = threading.Lock()
        self._started = self.clock()
        self._started_real = time.monotonic()
        self._ended: tuple[float, timedelta] | None = None

    def __enter__(self) -> Demo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop_workers()
        self.queue.close()

    def _unused_name(self, name: str) -> str:
        # A shared backend may hold an earlier run; its counts would pollute this one's.
        candidate, n = name, 1
        while self.queue.metrics(candidate) != Metrics():
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    # -- the story --------------------------------------------------------------------

    def story(self) -> Generator[str | None, None, None]:
        """What happens, one narration line at a time; ``None`` while waiting for the queue to move on."""
        main, draft = self.main.name, self.draft.name
        self._started, self._started_real = self.clock(), time.monotonic()  # the story starts now
        self._launch(self.draft)
        yield f"{draft!r} launched by mistake: the draft, {self.draft.size:,} messages to the full list"
        self._launch(self.main)
        yield f"{main!r} launched: {self.main.size:,} messages over {', '.join(self.senders)}"
        self._start_workers()
        yield (
            f"{len(self.workers)} sender workers started, {CONNECTIONS} SMTP connections each; "
            f"the demo clock runs {self.clock.speed:g}x real time"
        )

        yield from self._until(lambda: self._attempted(draft) >= DRAFT_NOTICED * self.draft.size)
        deleted = self.queue.clear(draft)
        spared = self.queue.metrics(draft).sending
        yield (
            f"The operator spots the draft and CLEARS {draft!r}: {deleted:,} deleted; {spared} in flight are "
            "spared (delivered if accepted, deleted if they bounce back)"
            if spared
            else f"The operator spots the draft and CLEARS {draft!r}: {deleted:,} deleted; none was in flight"
        )

        yield from self._until(lambda: self._done(main) >= FREEZE_AT * self.main.size)
        moved = self.queue.freeze(main)
        self.frozen = True
        share = self._done(main) / self.main.size
        yield (
            f"Marketing spots a wrong price: FREEZE {main!r} at {share:.0%} done: "
            f"{moved:,} messages moved to Frozen, the ones in flight finish"
        )
        thaw_at = self.clock() + FREEZE_HOLD
        yield from self._until(lambda: self.queue.metrics(main).sending == 0)
        frozen = self.queue.metrics(main)
        yield (
            f"Frozen: New {frozen.new}, Retries {frozen.retries}, Sending {frozen.sending}; "
            f"{frozen.frozen:,} messages wait in Frozen and nothing leaves"
        )
        yield from self._until(lambda: self.clock() >= thaw_at)
        moved = self.queue.unfreeze(main)
        self.frozen = False
        yield (
            f"Price fixed: UNFREEZE {main!r} after {_clock_time(FREEZE_HOLD)} on the demo clock: "
            f"{moved:,} messages back to New or Retries, each retry keeping its next attempt time"
        )

        yield from self._until(lambda: self.queue.metrics(main).new == 0)
        waiting = self.queue.metrics(main).retries
        if waiting:
            yield (
                f"Every message has had its first attempt; {waiting} soft-bounced ones wait in Retries "
                f"({_clock_time(RETRY.min_backoff)} backoff, doubling at each bounce)"
            )
        yield from self._until(lambda: self._remaining() == 0)
        self._stop_workers()
        yield "Total is 0 on both mailings: every message has its verdict; the workers stopped"

    def _launch(self, mailing: Mailing) -> None:
        domains = [domain for domain, share, _ in DOMAINS for _ in range(share)]
        random.Random(mailing.name).shuffle(domains)  # deterministic, but not in bands
        batch: list[NewMessage] = []
        for n in range(mailing.size):
            recipient = f"{FIRST_NAMES[n % len(FIRST_NAMES)]}.{n}@{domains[n % len(domains)]}"
            content = (
                f"From: Shop <news@shop.example>\r\nTo: <{recipient}>\r\nSubject: {mailing.subject}\r\n\r\n"
                "Twenty percent off everything, this week only.\r\n"
            ).encode()
            batch.append(
                NewMessage(
                    mailing=mailing.name,
                    sender=self.senders[n % len(self.senders)],
                    recipient=recipient,
                    content=content,
                    mail_from="news@shop.example",
                )
            )
            if len(batch) == 1000:
                self.queue.enqueue_many(batch)
                batch = []
        self.queue.enqueue_many(batch)

    def _until(self, condition: Callable[[], bool]) -> Iterator[None]:
        while not condition():
            if self._crashes:
                raise self._crashes[0]
            yield None

    def _attempted(self, mailing: str) -> int:
        metrics = self.queue.metrics(mailing)
        return metrics.delivered + metrics.failed + metrics.retries

    def _done(self, mailing: str) -> int:
        metrics = self.queue.metrics(mailing)
        return metrics.delivered + metrics.failed

    def _remaining(self) -> int:
        return self.queue.metrics(self.main.name).total + self.queue.metrics(self.draft.name).total

    # -- workers ----------------------------------------------------------------------

    def _start_workers(self) -> None:
        for worker in self.workers:
            thread = threading.Thread(target=self._work, args=(worker,), name=f"worker-{worker.sender}")
            thread.start()
            self._threads.append(thread)

    def _work(self, worker: SenderWorker) -> None:
        try:
            summary = worker.run()
        except Exception as error:  # noqa: BLE001 - raised again in the main thread, which waits on it
            with self._lock:
                self._crashes.append(error)
            return
        with self._lock:
            self._lost += summary.lost

    def _stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self._threads:
            thread.join()
        if self._threads and self._ended is None:
            self._ended = (time.monotonic() - self._started_real, self.clock() - self._started)
        self._threads = []

    # -- reading ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The mailings' metrics now."""
        by_sender = self.queue.metrics_by_sender(self.main.name)
        # One read for all sender queues, summed, so the main row always equals its sender rows.
        main = sum(by_sender.values(), Metrics())
        return Snapshot(
            main=(self.main, main),
            draft=(self.draft, self.queue.metrics(self.draft.name)),
            by_sender=by_sender,
            frozen=self.frozen,
            elapsed=self.elapsed(),
            story_time=self.clock() - self._started,
        )

    def elapsed(self) -> float:
        """Real seconds since the launch."""
        return self._ended[0] if self._ended is not None else time.monotonic() - self._started_real

    def summary(self) -> DemoSummary:
        """The final counts; call it once :meth:`story` has ended."""
        elapsed, story_time = self._ended if self._ended is not None else (0.0, timedelta(0))
        return DemoSummary(
            mailings=tuple(MailingResult(m, self.queue.metrics(m.name)) for m in (self.main, self.draft)),
            attempts=len(self.transport.attempts),
            lost=self._lost,
            elapsed=elapsed,
            story_time=story_time,
        )


def _clock_time(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:g} min"
