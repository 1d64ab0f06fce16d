"""``SenderWorker``: runs one sender, from claim to report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

import attrs

from ._errors import BackendError, InvalidArgument, LeaseLost
from ._memory import MemoryBackend
from ._models import Claim
from ._outcomes import Delivered, HardBounce, Outcome, SoftBounce
from ._queue import DEFAULT_LEASE, SenderQueue
from ._transport import Transport
from ._validation import check_id, check_lease, check_limit

__all__ = ["DomainLimit", "SenderWorker", "WorkerSummary"]

_T = TypeVar("_T")


def _discard(_: object) -> None:
    return None


def _positive_or_none(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
        raise InvalidArgument(f"{attribute.name} must be None or a positive number, not {value!r}")


@attrs.frozen(kw_only=True)
class DomainLimit:
    """How hard a worker may press one destination domain (its recipients' domain).

    In the spirit of Postfix's per-destination concurrency and KumoMTA's traffic
    shaping; enforced by each worker on its own.

    Attributes:
        concurrency: the most sends to the domain in flight at once; ``None`` for no limit.
        rate: the most sends to the domain started per second, evenly spaced; ``None`` for no limit.
    """

    concurrency: int | None = attrs.field(
        default=None,
        validator=[_positive_or_none, attrs.validators.optional(attrs.validators.instance_of(int))],
    )
    rate: float | None = attrs.field(default=None, validator=_positive_or_none)


_NO_LIMIT: Final = DomainLimit()
# Finished sends are reported (and their slots refilled) in waves of about a tenth of the
# concurrency, so that a claim and a report serve several messages, not one each; a send
# waits at most _LINGER seconds for the rest of its wave.
_WAVE: Final = 10
_LINGER: Final = 0.002
# A failing backend (BackendError: its operation had no effect) is called again after a pause that
# doubles from the first to the most, for as long as the claims in question could still be valid.
_RETRY_FIRST: Final = 0.05
_RETRY_MOST: Final = 2.0

_log = logging.getLogger("senderqueue.worker")


@attrs.frozen(kw_only=True)
class WorkerSummary:
    """What a worker's run came to (or has come to so far).

    Attributes:
        delivered, soft_bounced, hard_bounced: reported outcomes.
        lost: reports refused with ``LeaseLost`` (the lease had expired and was settled).
        released: claimed messages given back unsent when the worker stopped.
        elapsed: seconds the run took.
    """

    delivered: int = 0
    soft_bounced: int = 0
    hard_bounced: int = 0
    lost: int = 0
    elapsed: float = 0.0
    released: int = 0

    @property
    def attempts(self) -> int:
        """Messages sent, whatever came of them."""
        return self.delivered + self.soft_bounced + self.hard_bounced

    @property
    def rate(self) -> float:
        """Attempts per second."""
        return self.attempts / self.elapsed if self.elapsed > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"sent {self.delivered:,}, soft {self.soft_bounced:,}, hard {self.hard_bounced:,}, "
            f"released {self.released:,}, lost {self.lost:,}, "
            f"{self.elapsed:,.1f} s, {self.rate:,.1f}/s"
        )


@attrs.define
class _Destination:
    in_flight: int = 0
    next_start: float = 0.0  # time.monotonic() before which a rate-limited domain waits


_COUNTS: Final = ("delivered", "soft_bounced", "hard_bounced", "lost", "released")
_Sends = dict["asyncio.Task[Outcome]", Claim]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` seconds pass; clear it for the next wait."""
    if not event.is_set():
        # A timer that sets the event: cheaper than asyncio.timeout, which this loop pays once a wake.
        timer = asyncio.get_running_loop().call_later(min(timeout, 86400.0), event.set)
        try:
            await event.wait()
        finally:
            timer.cancel()
    event.clear()


def _transport_error(what: str) -> SoftBounce:
    """The outcome of a send that ended without one: it may have gone, so the attempt counts."""
    return SoftBounce(code=451, enhanced="4.3.0", text=f"transport error: {what}")


def _outcome_of(task: asyncio.Task[Outcome]) -> Outcome:
    # _send returns an outcome for anything an Exception; a send cancelled from within the
    # transport (CancelledError is not one) may have been delivered.
    if task.cancelled():
        return _transport_error("the send was cancelled")
    return task.result()


def _domain(claim: Claim) -> str:
    return claim.message.recipient.rpartition("@")[2].lower()


class SenderWorker:
    """Delivers one sender's messages: claims, sends with bounded concurrency, reports.

    It claims no more than it is about to send, so at most ``concurrency`` messages
    are ``SENDING``; it reports finished sends in waves (one ``report_many``, then one
    claim to refill their slots, for a tenth of the concurrency or for whatever finished
    within 2 ms), renews a lease once half of it has run, and on :meth:`stop` (or
    SIGTERM/SIGINT under :meth:`run`) claims nothing more, lets in-flight sends finish
    and report, and releases what it claimed but had not started.

    A ``BackendError`` (the backend's operation had no effect) does not end a run: the worker
    logs it (logger ``senderqueue.worker``) and calls again after a pause that doubles up to 2 s:
    claims for as long as it runs, reports and releases for as long as their leases could still
    be valid (then a report raises, and an unreleased message is due again once its lease ends).

    Per-destination limits hold a claimed message back until its recipient's domain
    has a free slot; held messages count against ``concurrency``, so a flood to one
    slow domain cannot make the worker claim without bound (it does slow the rest:
    the queue hands out messages oldest first, whatever their domain).

    Args:
        queue: the queue to work.
        transport: sends the messages; its ``aclose`` is awaited when a run ends.
        sender: the sender whose queues it works.
        concurrency: the most messages claimed (in flight, or held for a domain) at once.
        lease: how long each claim holds its message.
        poll_interval: seconds to wait before claiming again when nothing was due.
        domain_limit: the limit of every recipient domain not in ``domain_limits``.
        domain_limits: limits of particular domains (``{"gmail.com": DomainLimit(rate=20)}``).
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
        domain_limit: DomainLimit | None = None,
        domain_limits: Mapping[str, DomainLimit] | None = None,
    ) -> None:
        self.queue = queue
        self.transport = transport
        self.sender = check_id("sender", sender)
        self.concurrency = check_limit(concurrency)
        self.lease = check_lease(lease)
        if poll_interval <= 0:
            raise InvalidArgument(f"poll_interval must be positive, not {poll_interval!r}")
        self.poll_interval = poll_interval
        self.domain_limit = domain_limit if domain_limit is not None else _NO_LIMIT
        self.domain_limits = {domain.lower(): limit for domain, limit in (domain_limits or {}).items()}
        for limit in (self.domain_limit, *self.domain_limits.values()):
            if not isinstance(limit, DomainLimit):
                raise InvalidArgument(f"a domain limit is a DomainLimit, not {limit!r}")
        self._in_memory = type(queue.backend) is MemoryBackend
        self._stopping = threading.Event()
        self._wake: Callable[[], None] = lambda: None
        self._counts: dict[str, int] = dict.fromkeys(_COUNTS, 0)
        self._started = time.monotonic()
        self._claimed = 0
        self._woken = asyncio.Event()
        self._sent: list[asyncio.Task[Outcome]] = []  # finished sends, not yet reported
        self._wave = max(1, self.concurrency // _WAVE)
        self._linger: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop  # the loop of the current run
        self._renew_due: datetime | None = None  # the queue's time when the next lease needs renewing

    def run_until_idle(self) -> WorkerSummary:
        """Send until nothing of this sender is due and nothing is in flight; return a summary."""
        return asyncio.run(self._run(until_idle=True))

    def run(self) -> WorkerSummary:
        """Send until :meth:`stop`, SIGTERM or SIGINT; return a summary."""
        return asyncio.run(self._run(until_idle=False))

    def stop(self) -> None:
        """Stop claiming; in-flight sends finish and report, held ones are released. Safe from any thread.

        It ends the current run (or the next, if none is running); a later run starts afresh.
        """
        self._stopping.set()
        self._wake()

    @property
    def progress(self) -> WorkerSummary:
        """The counts of the current (or last) run so far; safe to read from any thread."""
        return WorkerSummary(elapsed=time.monotonic() - self._started, **self._counts)

    @property
    def claimed(self) -> int:
        """Messages this worker holds now: in flight or waiting for their domain."""
        return self._claimed

    def limit_for(self, domain: str) -> DomainLimit:
        """The limit that applies to a recipient domain."""
        return self.domain_limits.get(domain.lower(), self.domain_limit)

    async def _queue_call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._in_memory:
            # No I/O to wait for, and a thread hop (GIL hand-offs included) costs more than the call.
            return fn(*args)
        # The queue's backend may block on I/O; keep the event loop sending meanwhile.
        return await asyncio.to_thread(fn, *args)

    async def _run(self, *, until_idle: bool) -> WorkerSummary:
        loop = asyncio.get_running_loop()
        # Set by a send that finishes and by stop(): one event, so a wake costs O(1), not O(concurrency).
        woken = self._woken = asyncio.Event()
        self._wake = lambda: _discard(loop.call_soon_threadsafe(woken.set))
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._sent = []
        self._renew_due = None
        self._loop = loop
        self._started = started = time.monotonic()
        handled = self._install_signals(loop) if not until_idle else []
        in_flight: _Sends = {}
        held: list[Claim] = []  # claimed, waiting for a slot of their domain
        destinations: dict[str, _Destination] = {}
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(in_flight) - len(held)
                if free:
                    try:
                        claims = await self._patiently(
                            self.queue.claim, self.sender, free, self.lease, patience=None
                        )
                    except BackendError:
                        break  # stopped while the backend fails: nothing was claimed
                    if claims:
                        self._due_by(claims)
                        held += claims
                    if self._stopping.is_set():
                        break  # stopped during the claim: what it brought is released below, not sent
                held, wait_for_slot = self._start(held, in_flight, destinations)
                self._claimed = len(in_flight) + len(held)
                if not in_flight and not held:
                    if until_idle:
                        break
                    await _wait(woken, self.poll_interval)
                    continue
                # Wake for a finished send, a stop, a lease to renew or a domain's next slot.
                await _wait(woken, min(self._renew_interval(), wait_for_slot))
                await self._finish(in_flight, destinations)
                held = await self._renew(in_flight, held)
            if held:  # stopping: give back what was claimed but not started
                await self._release(held)
            while in_flight:  # stopping: let what is in flight finish, its leases renewed
                await _wait(woken, self._renew_interval())
                await self._finish(in_flight, destinations)
                await self._renew(in_flight, [])
        finally:
            self._claimed = 0
            for sig in handled:
                loop.remove_signal_handler(sig)
            self._wake = lambda: None
            try:
                with contextlib.suppress(Exception):  # a failing goodbye must not hide the summary
                    await self.transport.aclose()
            finally:
                self._stopping.clear()  # this run has ended: a later stop() is for the next one
        return WorkerSummary(elapsed=time.monotonic() - started, **self._counts)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        return [signal.SIGTERM, signal.SIGINT]

    def _renew_interval(self) -> float:
        return max(0.05, min(self.poll_interval, self.lease.total_seconds() / 4))

    def _start(
        self, held: list[Claim], in_flight: _Sends, destinations: dict[str, _Destination]
    ) -> tuple[list[Claim], float]:
        """Start every held claim its domain allows now; return the rest and the seconds to the next slot."""
        if not self.domain_limits and self.domain_limit is _NO_LIMIT:
            for claim in held:
                self._spawn(claim, in_flight)
            return [], float("inf")
        still_held: list[Claim] = []
        wait = float("inf")
        now = time.monotonic()
        for claim in held:
            domain = _domain(claim)
            limit = self.limit_for(domain)
            if limit is not _NO_LIMIT:
                destination = destinations.setdefault(domain, _Destination())
                if limit.concurrency is not None and destination.in_flight >= limit.concurrency:
                    still_held.append(claim)  # a send to this domain finishing wakes the loop
                    continue
                if limit.rate is not None:
                    if destination.next_start > now:
                        still_held.append(claim)
                        wait = min(wait, destination.next_start - now)
                        continue
                    destination.next_start = max(now, destination.next_start) + 1 / limit.rate
                destination.in_flight += 1
            self._spawn(claim, in_flight)
        return still_held, wait

    def _spawn(self, claim: Claim, in_flight: _Sends) -> None:
        task = asyncio.create_task(self._send(claim))
        task.add_done_callback(self._on_sent)
        in_flight[task] = claim

    def _on_sent(self, task: asyncio.Task[Outcome]) -> None:
        sent = self._sent
        sent.append(task)
        if len(sent) >= self._wave:
            self._woken.set()
        elif len(sent) == 1:
            self._linger = self._loop.call_later(_LINGER, self._woken.set)

    async def _send(self, claim: Claim) -> Outcome:
        try:
            outcome: object = await self.transport.send(claim.message)  # typed, but a user's transport
        except Exception as error:  # noqa: BLE001 - an attempt must end in a report, whatever broke
            return _transport_error(repr(error))
        if isinstance(outcome, Outcome):
            return outcome
        # report_many would refuse it, and with it every report of its wave.
        return _transport_error(f"not an outcome: {outcome!r}")

    async def _finish(self, in_flight: _Sends, destinations: dict[str, _Destination]) -> None:
        """Report every finished send in one round trip, and free its domain's slot."""
        done, self._sent = self._sent, []
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        reports = [(in_flight.pop(task), _outcome_of(task)) for task in done]  # the claim as last renewed
        if destinations:
            now = time.monotonic()
            for claim, _ in reports:
                domain = _domain(claim)
                destination = destinations.get(domain)
                if destination is not None:
                    destination.in_flight -= 1
                    if destination.in_flight == 0 and destination.next_start <= now:
                        del destinations[domain]  # forget idle domains: their number is unbounded
        await self._report(reports)

    async def _report(self, reports: list[tuple[Claim, Outcome]]) -> None:
        if not reports:
            return
        # Until the leases run out the reports can still land; after that they would meet LeaseLost.
        results = await self._patiently(self.queue.report_many, reports, patience=self.lease.total_seconds())
        for (_, outcome), lost in zip(reports, results, strict=True):
            if lost is not None:
                self._counts["lost"] += 1
            elif isinstance(outcome, Delivered):
                self._counts["delivered"] += 1
            elif isinstance(outcome, HardBounce):
                self._counts["hard_bounced"] += 1
            else:
                self._counts["soft_bounced"] += 1

    async def _release(self, held: list[Claim]) -> None:
        for claim in held:
            try:
                await self._patiently(self.queue.release, claim, patience=self.lease.total_seconds())
            except LeaseLost:
                self._counts["lost"] += 1
            except BackendError:
                # Given up: the lease runs out and the message is due again, its attempt counted.
                _log.error("could not release %s; it is sent again once its lease expires", claim.message.id)
            else:
                self._counts["released"] += 1

    async def _patiently(self, fn: Callable[..., _T], *args: Any, patience: float | None) -> _T:
        """Call the queue; on ``BackendError`` (no effect) wait and call again.

        Gives up, raising the last error, once ``patience`` seconds of waiting have passed
        (``None``: not while the worker runs; a claim is not retried once it is stopping).
        """
        delay, waited = _RETRY_FIRST, 0.0
        while True:
            try:
                return await self._queue_call(fn, *args)
            except BackendError as error:
                if (patience is None and self._stopping.is_set()) or (
                    patience is not None and waited >= patience
                ):
                    raise
                _log.warning("%s failed, again in %.2f s: %s", fn.__name__, delay, error)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(2 * delay, _RETRY_MOST)

    def _due_by(self, claims: list[Claim]) -> None:
        """Note when the earliest of ``claims`` needs renewing."""
        due = min(claim.expires_at for claim in claims) - self.lease / 2
        if self._renew_due is None or due < self._renew_due:
            self._renew_due = due

    async def _renew(self, in_flight: _Sends, held: list[Claim]) -> list[Claim]:
        now = self.queue.now()
        if self._renew_due is None or now < self._renew_due:
            return held  # no lease is half gone: no need to look at each claim
        self._renew_due = None
        for task, claim in list(in_flight.items()):
            if claim.expires_at - now < self.lease / 2:
                try:
                    in_flight[task] = await self._queue_call(self.queue.renew, claim, self.lease)
                except LeaseLost:
                    continue  # the lease was settled; the send's report will meet it too
                except BackendError:
                    # Still due for renewal, so the next pass tries again.
                    _log.warning("renewing %s failed; the next pass tries again", claim.message.id)
        renewed: list[Claim] = []
        for claim in held:
            if claim.expires_at - now < self.lease / 2:
                try:
                    claim = await self._queue_call(self.queue.renew, claim, self.lease)
                except LeaseLost:
                    self._counts["lost"] += 1  # settled meanwhile: no longer ours to send
                    continue
                except BackendError:
                    _log.warning("renewing %s failed; the next pass tries again", claim.message.id)
            renewed.append(claim)
        for claims in (list(in_flight.values()), renewed):
            if claims:
                self._due_by(claims)
        return renewed
