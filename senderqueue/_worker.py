"""``SenderWorker``: runs one sender, from claim to report."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import attrs

from ._errors import InvalidArgument, LeaseLost
from ._models import Claim
from ._outcomes import Delivered, HardBounce, Outcome, SoftBounce
from ._queue import DEFAULT_LEASE, SenderQueue
from ._transport import Transport
from ._validation import check_id, check_lease, check_limit

__all__ = ["SenderWorker", "WorkerSummary"]

_T = TypeVar("_T")


def _discard(_: object) -> None:
    return None


@attrs.frozen(kw_only=True)
class WorkerSummary:
    """What a worker's run came to.

    Attributes:
        delivered, soft_bounced, hard_bounced: reported outcomes.
        lost: reports refused with ``LeaseLost`` (the lease had expired and was settled).
        elapsed: seconds the run took.
    """

    delivered: int = 0
    soft_bounced: int = 0
    hard_bounced: int = 0
    lost: int = 0
    elapsed: float = 0.0

    @property
    def attempts(self) -> int:
        """Messages sent, whatever came of them."""
        return self.delivered + self.soft_bounced + self.hard_bounced

    @property
    def rate(self) -> float:
        """Attempts per second."""
        return self.attempts / self.elapsed if self.elapsed > 0 else 0.0


class SenderWorker:
    """Delivers one sender's messages: claims, sends with bounded concurrency, reports.

    It claims no more than it is about to send, so a message is ``SENDING`` only
    while it is in flight; it reports each wave of finished sends in one
    ``report_many``, renews the lease of a send that outlives half its lease, and
    on :meth:`stop` claims nothing more and lets in-flight sends finish and report.

    Args:
        queue: the queue to work.
        transport: sends the messages.
        sender: the sender whose queues it works.
        concurrency: the most messages in flight at once.
        lease: how long each claim holds its message.
        poll_interval: seconds to wait before claiming again when nothing was due.
    """

    def __init__(
        self,
        queue: SenderQueue,
        transport: Transport,
        *,
        sender: str,
        concurrency: int = 10,
        lease: timedelta = DEFAULT_LEASE,
        poll_interval: float = 1.0,
    ) -> None:
        self.queue = queue
        self.transport = transport
        self.sender = check_id("sender", sender)
        self.concurrency = check_limit(concurrency)
        self.lease = check_lease(lease)
        if poll_interval <= 0:
            raise InvalidArgument(f"poll_interval must be positive, not {poll_interval!r}")
        self.poll_interval = poll_interval
        self._stopping = threading.Event()
        self._wake: Callable[[], None] = lambda: None
        self._counts: dict[str, int] = {}

    def run_until_idle(self) -> WorkerSummary:
        """Send until nothing of this sender is due and nothing is in flight; return a summary."""
        return asyncio.run(self._run(until_idle=True))

    def run(self) -> WorkerSummary:
        """Send until :meth:`stop`, SIGTERM or SIGINT; return a summary."""
        return asyncio.run(self._run(until_idle=False))

    def stop(self) -> None:
        """Stop claiming; in-flight sends finish and are reported. Safe from any thread."""
        self._stopping.set()
        self._wake()

    async def _queue_call(self, fn: Callable[..., _T], *args: Any) -> _T:
        # The queue's backend may block on I/O; keep the event loop sending meanwhile.
        return await asyncio.to_thread(fn, *args)

    async def _run(self, *, until_idle: bool) -> WorkerSummary:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        self._wake = lambda: _discard(loop.call_soon_threadsafe(woken.set))
        self._counts = dict.fromkeys(("delivered", "soft_bounced", "hard_bounced", "lost"), 0)
        started = time.monotonic()
        handled = self._install_signals(loop) if not until_idle else []
        in_flight: dict[asyncio.Task[tuple[Claim, Outcome]], Claim] = {}
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(in_flight)
                claims = (
                    await self._queue_call(self.queue.claim, self.sender, free, self.lease) if free else []
                )
                for claim in claims:
                    in_flight[asyncio.create_task(self._send(claim))] = claim
                if not in_flight:
                    if until_idle:
                        break
                    woken.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), self.poll_interval)
                    continue
                done, _ = await asyncio.wait(
                    in_flight, timeout=self._renew_interval(), return_when=asyncio.FIRST_COMPLETED
                )
                await self._report([task.result() for task in done])
                for task in done:
                    del in_flight[task]
                await self._renew(in_flight)
            if in_flight:  # stopping: let what is in flight finish
                done, _ = await asyncio.wait(in_flight)
                await self._report([task.result() for task in done])
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            self._wake = lambda: None
        return WorkerSummary(elapsed=time.monotonic() - started, **self._counts)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        return [signal.SIGTERM, signal.SIGINT]

    def _renew_interval(self) -> float:
        return max(0.05, min(self.poll_interval, self.lease.total_seconds() / 4))

    async def _send(self, claim: Claim) -> tuple[Claim, Outcome]:
        try:
            outcome = await self.transport.send(claim.message)
        except Exception as error:  # noqa: BLE001 - an attempt must end in a report, whatever broke
            outcome = SoftBounce(code=451, enhanced="4.3.0", text=f"transport error: {error!r}")
        return claim, outcome

    async def _report(self, reports: list[tuple[Claim, Outcome]]) -> None:
        if not reports:
            return
        results = await self._queue_call(self.queue.report_many, reports)
        for (_, outcome), lost in zip(reports, results, strict=True):
            if lost is not None:
                self._counts["lost"] += 1
            elif isinstance(outcome, Delivered):
                self._counts["delivered"] += 1
            elif isinstance(outcome, HardBounce):
                self._counts["hard_bounced"] += 1
            else:
                self._counts["soft_bounced"] += 1

    async def _renew(self, in_flight: dict[asyncio.Task[tuple[Claim, Outcome]], Claim]) -> None:
        now = self.queue.now()
        for task, claim in list(in_flight.items()):
            if claim.expires_at - now < self.lease / 2:
                # A LeaseLost here means the lease was settled; the send's report will meet it too.
                with contextlib.suppress(LeaseLost):
                    in_flight[task] = await self._queue_call(self.queue.renew, claim, self.lease)
