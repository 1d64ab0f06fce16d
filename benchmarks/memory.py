"""Measure the in-memory backend against a plain dict + heapq queue doing the same work.

Run ``python benchmarks/memory.py`` (about two minutes on 2 cores at the default
1,000,000 messages; ``--quick`` for a few seconds; ``--profile`` adds a cProfile of
enqueue_many and drain). Each figure of ``SenderQueue()`` is printed beside the same
workload on :class:`PlainQueue`, below, and their ratio.

The baseline is what a careful engineer would write by hand without the library: per
message a record with its state, attempts, lease token and expiry; per sender queue a
heap ordered by (next attempt time, enqueue order), a frozen flag, a clear epoch and
the counters behind the five metrics; per sender a lease heap so expired claims can be
settled. A claim pops due messages, marks them sending with a fresh token and builds
one claim object per message; a report checks the token and moves the counters.
It has no input validation and no frozen attrs objects: that is the library's share.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import heapq
import importlib.metadata
import itertools
import os
import platform
import pstats
import secrets
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import senderqueue as sq
from senderqueue.testing import ManualClock

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=5)
BATCH = 1000  # messages per enqueue_many call
CLAIM_LIMIT = 100  # messages per claim in the drain
SENDERS = 4  # sender queues of the big mailing; metrics sums over them
CONTENT = b"Subject: hello\r\n\r\n" + b"x" * 1000  # one object shared by every message
MAIL_FROM = "news@shop.example"
DELIVERED = sq.Delivered(code=250, text="ok")

# -- the baseline -------------------------------------------------------------------

NEW, RETRIES, SENDING = "new", "retries", "sending"
DELIVERED_STATE, FAILED, DELETED = "delivered", "failed", "deleted"
_VERDICTS: dict[type[sq.Outcome], str] = {
    sq.Delivered: DELIVERED_STATE,
    sq.SoftBounce: RETRIES,
    sq.HardBounce: FAILED,
}


class PlainSenderQueue:
    """One (mailing, sender) queue: its heap, frozen flag, clear epoch and counters."""

    __slots__ = (
        "deleted",
        "delivered",
        "epoch",
        "failed",
        "frozen",
        "heap",
        "mailing",
        "new",
        "retries",
        "sender",
        "sending",
    )

    def __init__(self, mailing: str, sender: str, frozen: bool) -> None:
        self.mailing = mailing
        self.sender = sender
        self.frozen = frozen
        self.epoch = 0
        self.heap: list[tuple[dt.datetime, int, PlainRecord]] = []
        self.new = self.retries = self.sending = 0
        self.delivered = self.failed = self.deleted = 0


class PlainRecord:
    """One stored message. A queued record of an older epoch was cleared; of a frozen queue, is frozen."""

    __slots__ = (
        "attempts",
        "claimed_from",
        "content",
        "created_at",
        "epoch",
        "expires_at",
        "id",
        "last_error",
        "mail_from",
        "next_attempt_at",
        "queue",
        "recipient",
        "seq",
        "state",
        "token",
        "updated_at",
    )

    def __init__(
        self, message_id: str, message: sq.NewMessage, queue: PlainSenderQueue, seq: int, now: dt.datetime
    ) -> None:
        self.id = message_id
        self.queue = queue
        self.recipient = message.recipient
        self.mail_from = message.mail_from
        self.content = message.content
        self.state = NEW
        self.claimed_from = NEW
        self.attempts = 0
        self.next_attempt_at = now
        self.seq = seq
        self.epoch = queue.epoch
        self.last_error: str | None = None
        self.created_at = now
        self.updated_at = now
        self.token: str | None = None
        self.expires_at: dt.datetime | None = None


class PlainClaim:
    """A snapshot of the claimed message, with the lease token and expiry."""

    __slots__ = (
        "attempts",
        "content",
        "created_at",
        "expires_at",
        "id",
        "last_error",
        "mail_from",
        "mailing",
        "next_attempt_at",
        "recipient",
        "sender",
        "state",
        "token",
        "updated_at",
    )

    def __init__(self, record: PlainRecord, queue: PlainSenderQueue) -> None:
        self.id = record.id
        self.mailing = queue.mailing
        self.sender = queue.sender
        self.recipient = record.recipient
        self.mail_from = record.mail_from
        self.content = record.content
        self.state = record.state
        self.attempts = record.attempts
        self.next_attempt_at = record.next_attempt_at
        self.last_error = record.last_error
        self.created_at = record.created_at
        self.updated_at = record.updated_at
        self.token = record.token
        self.expires_at = record.expires_at


class PlainQueue:
    """The same sender queues written plainly with a dict, heapq and a lock."""

    def __init__(self, clock: sq.Clock, retry: sq.RetryPolicy | None = None) -> None:
        self.clock = clock
        self.retry = retry or sq.RetryPolicy()
        self._lock = threading.Lock()
        self._records: dict[str, PlainRecord] = {}
        self._by_mailing: dict[str, dict[str, PlainSenderQueue]] = {}
        self._by_sender: dict[str, list[PlainSenderQueue]] = {}
        self._frozen_mailings: set[str] = set()
        self._leases: dict[str, list[tuple[dt.datetime, int, str, PlainRecord]]] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)

    def _queue(self, mailing: str, sender: str) -> PlainSenderQueue:
        queues = self._by_mailing.setdefault(mailing, {})
        queue = queues.get(sender)
        if queue is None:
            queue = queues[sender] = PlainSenderQueue(mailing, sender, mailing in self._frozen_mailings)
            self._by_sender.setdefault(sender, []).append(queue)
        return queue

    def enqueue_many(self, messages: Iterable[sq.NewMessage]) -> list[str]:
        batch = list(messages)
        now = self.clock()
        with self._lock:
            ids = [m.message_id or f"{self._id_prefix}-{next(self._ids)}" for m in batch]
            if any(i in self._records for i in ids):
                raise sq.DuplicateMessage("a message id is already in use")
            for message_id, message in zip(ids, batch, strict=True):
                queue = self._queue(message.mailing, message.sender)
                record = PlainRecord(message_id, message, queue, next(self._seq), now)
                self._records[message_id] = record
                queue.new += 1
                heapq.heappush(queue.heap, (now, record.seq, record))
            return ids

    def claim(self, sender: str, limit: int = 1, lease: dt.timedelta = LEASE) -> list[PlainClaim]:
        now = self.clock()
        with self._lock:
            self._expire(sender, now)
            queues = self._by_sender.get(sender, [])
            heads = [
                (q.heap[0][0], q.heap[0][1], q)
                for q in queues
                if not q.frozen and q.heap and q.heap[0][0] <= now
            ]
            heapq.heapify(heads)
            leases = self._leases.setdefault(sender, [])
            expires_at = now + lease
            claims: list[PlainClaim] = []
            while heads and len(claims) < limit:
                queue = heads[0][2]
                record = heapq.heappop(queue.heap)[2]
                if queue.heap and queue.heap[0][0] <= now:
                    heapq.heapreplace(heads, (queue.heap[0][0], queue.heap[0][1], queue))
                else:
                    heapq.heappop(heads)
                if record.state is NEW:
                    queue.new -= 1
                else:
                    queue.retries -= 1
                queue.sending += 1
                token = str(next(self._tokens))
                record.claimed_from = record.state
                record.state = SENDING
                record.attempts += 1
                record.token = token
                record.expires_at = expires_at
                record.updated_at = now
                heapq.heappush(leases, (expires_at, record.seq, token, record))
                claims.append(PlainClaim(record, queue))
            # Stale lease entries (settled claims) are dropped once they outnumber live ones.
            if len(leases) > 64 and len(leases) > 4 * sum(q.sending for q in queues):
                leases[:] = [e for e in leases if e[3].token == e[2]]
                heapq.heapify(leases)
            return claims

    def report_many(self, reports: Iterable[tuple[PlainClaim, sq.Outcome]]) -> list[sq.LeaseLost | None]:
        now = self.clock()
        results: list[sq.LeaseLost | None] = []
        with self._lock:
            for claim, outcome in reports:
                verdict = _VERDICTS[type(outcome)]
                record = self._records.get(claim.id)
                if record is None or record.state is not SENDING or record.token != claim.token:
                    results.append(sq.LeaseLost(claim.id))
                    continue
                self._leave(record, verdict, None if verdict is DELIVERED_STATE else str(outcome), now)
                results.append(None)
        return results

    def _leave(self, record: PlainRecord, verdict: str, error: str | None, now: dt.datetime) -> None:
        queue = record.queue
        queue.sending -= 1
        record.token = record.expires_at = None
        record.updated_at = now
        if error is not None:
            record.last_error = error
        if verdict is RETRIES:
            if record.epoch != queue.epoch:
                verdict = DELETED
            else:
                retry_at = self.retry.next_attempt(record.attempts, record.created_at, now, record.id)
                if retry_at is None:
                    verdict = FAILED
                else:
                    record.state = RETRIES
                    record.next_attempt_at = retry_at
                    queue.retries += 1
                    heapq.heappush(queue.heap, (retry_at, record.seq, record))
                    return
        record.state = verdict
        if verdict is DELIVERED_STATE:
            queue.delivered += 1
        elif verdict is FAILED:
            queue.failed += 1
        else:
            queue.deleted += 1

    def _expire(self, sender: str, now: dt.datetime) -> None:
        leases = self._leases.get(sender)
        while leases and leases[0][0] <= now:
            expires_at, _, token, record = heapq.heappop(leases)
            if record.token == token and record.expires_at == expires_at:
                self._leave(record, RETRIES, "lease expired", now)

    def _targets(self, mailing: str, sender: str | None) -> list[PlainSenderQueue]:
        if sender is None:
            return list(self._by_mailing.get(mailing, {}).values())
        return [self._queue(mailing, sender)]

    def freeze(self, mailing: str, sender: str | None = None) -> int:
        with self._lock:
            if sender is None:
                self._frozen_mailings.add(mailing)
            moved = 0
            for queue in self._targets(mailing, sender):
                if not queue.frozen:
                    queue.frozen = True
                    moved += queue.new + queue.retries
            return moved

    def unfreeze(self, mailing: str, sender: str | None = None) -> int:
        with self._lock:
            if sender is None:
                self._frozen_mailings.discard(mailing)
            moved = 0
            for queue in self._targets(mailing, sender):
                if queue.frozen:
                    queue.frozen = False
                    moved += queue.new + queue.retries
            return moved

    def clear(self, mailing: str, sender: str | None = None) -> int:
        with self._lock:
            moved = 0
            for queue in self._targets(mailing, sender):
                cleared = queue.new + queue.retries
                queue.deleted += cleared
                queue.new = queue.retries = 0
                queue.heap = []
                queue.epoch += 1
                moved += cleared
            return moved

    def metrics(self, mailing: str, sender: str | None = None) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(
                ("frozen", "new", "retries", "sending", "delivered", "failed", "deleted"), 0
            )
            queues = self._by_mailing.get(mailing, {})
            for name, queue in queues.items():
                if sender is not None and name != sender:
                    continue
                if queue.frozen:
                    counts["frozen"] += queue.new + queue.retries
                else:
                    counts["new"] += queue.new
                    counts["retries"] += queue.retries
                counts["sending"] += queue.sending
                counts["delivered"] += queue.delivered
                counts["failed"] += queue.failed
                counts["deleted"] += queue.deleted
            counts["total"] = counts["frozen"] + counts["new"] + counts["retries"] + counts["sending"]
            return counts


# -- the workloads, written once for both ---------------------------------------------

C = TypeVar("C")
T = TypeVar("T")


class Subject(Protocol[C]):
    """What the workloads call: the part of ``SenderQueue``'s API that ``PlainQueue`` also has."""

    def enqueue_many(self, messages: Iterable[sq.NewMessage]) -> list[str]: ...
    def claim(self, sender: str, limit: int = ..., lease: dt.timedelta = ...) -> list[C]: ...
    def report_many(self, reports: Iterable[tuple[C, sq.Outcome]]) -> list[sq.LeaseLost | None]: ...
    def freeze(self, mailing: str, sender: str | None = ...) -> int: ...
    def unfreeze(self, mailing: str, sender: str | None = ...) -> int: ...
    def clear(self, mailing: str, sender: str | None = ...) -> int: ...
    def metrics(self, mailing: str, sender: str | None = ...) -> object: ...


def library(clock: sq.Clock) -> sq.SenderQueue:
    return sq.SenderQueue(clock=clock)


def baseline(clock: sq.Clock) -> PlainQueue:
    return PlainQueue(clock)


def batches(mailing: str, recipients: Sequence[str], senders: int) -> Iterator[list[sq.NewMessage]]:
    """The messages of a mailing, ``BATCH`` at a time, spread round-robin over ``senders``."""
    for start in range(0, len(recipients), BATCH):
        yield [
            sq.NewMessage(
                mailing=mailing,
                sender=f"s{i % senders}",
                recipient=recipients[i],
                content=CONTENT,
                mail_from=MAIL_FROM,
            )
            for i in range(start, min(start + BATCH, len(recipients)))
        ]


def fill(subject: Subject[C], mailing: str, recipients: Sequence[str], senders: int) -> int:
    """Enqueue a mailing in batches; return the nanoseconds spent inside ``enqueue_many``."""
    spent = 0
    for batch in batches(mailing, recipients, senders):
        started = time.perf_counter_ns()
        subject.enqueue_many(batch)
        spent += time.perf_counter_ns() - started
    return spent


def timed(call: Callable[[], T]) -> tuple[int, T]:
    """The nanoseconds one call takes, and what it returned."""
    started = time.perf_counter_ns()
    result = call()
    return time.perf_counter_ns() - started, result


def timed_ns(call: Callable[[], object]) -> int:
    """The nanoseconds one call takes."""
    return timed(call)[0]


def drain(subject: Subject[C]) -> int:
    """Claim ``CLAIM_LIMIT`` and report them delivered until the sender has nothing due; return how many."""
    done = 0
    while claims := subject.claim("s0", limit=CLAIM_LIMIT, lease=LEASE):
        results = subject.report_many([(claim, DELIVERED) for claim in claims])
        assert not any(results)
        done += len(claims)
    return done


@dataclass
class Figures:
    """What one side measured; times in nanoseconds, memory in bytes."""

    enqueue_ns_per_message: float = 0.0
    drain_ns_per_message: float = 0.0
    metrics_ns: float = 0.0
    freeze_ns: float = 0.0
    unfreeze_ns: float = 0.0
    clear_ns: float = 0.0
    bytes_per_message: float = 0.0


def big_mailing(subject: Subject[C], recipients: Sequence[str], repeats: int, figures: Figures) -> None:
    """enqueue_many, then freeze, unfreeze, metrics and clear of the whole mailing."""
    n = len(recipients)
    gc.collect()
    figures.enqueue_ns_per_message = fill(subject, "big", recipients, SENDERS) / n
    assert subject.freeze("big") == n
    assert subject.freeze("big") == 0
    assert subject.unfreeze("big") == n
    freezes, unfreezes = [], []
    for _ in range(repeats):  # each freeze and each unfreeze moves all n messages
        freezes.append(timed_ns(partial(subject.freeze, "big")))
        unfreezes.append(timed_ns(partial(subject.unfreeze, "big")))
    figures.freeze_ns = statistics.median(freezes)
    figures.unfreeze_ns = statistics.median(unfreezes)
    figures.metrics_ns = statistics.median(
        timed_ns(partial(subject.metrics, "big")) for _ in range(repeats * 10)
    )
    gc.collect()
    figures.clear_ns, cleared = timed(partial(subject.clear, "big"))
    assert cleared == n


def memory(subject: Subject[C], recipients: Sequence[str], figures: Figures) -> None:
    """Bytes the queue keeps per queued message, beyond the content, recipient and sender it is given.

    Content and mail_from are one shared object, and the recipient strings exist before
    the measurement starts, so what remains is the queue's own: record, id, heap entry,
    index entries.
    """
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(subject, "big", recipients, SENDERS)
        gc.collect()
        figures.bytes_per_message = (tracemalloc.get_traced_memory()[0] - before) / len(recipients)
    finally:
        tracemalloc.stop()
    gc.collect()


def drain_rate(subject: Subject[C], recipients: Sequence[str]) -> float:
    """Fill one sender queue, then drain it; return the nanoseconds per message."""
    fill(subject, "drain", recipients, 1)
    gc.collect()
    spent, drained = timed(partial(drain, subject))
    assert drained == len(recipients)
    return spent / len(recipients)


def new_clock() -> ManualClock:
    """A clock that stands still: every message is due at once, no lease expires."""
    return ManualClock(START)


def measure(n: int, drained: int, quick: bool) -> tuple[Figures, Figures]:
    """Every workload on fresh queues, library then baseline, interleaved so that load on the
    machine falls on both alike; returns (library, baseline)."""
    recipients = [f"user{i}@example.com" for i in range(n)]
    repeats = 200 if quick else 1000
    lib, base = Figures(), Figures()
    # Memory first: a clear timed right after a fill traced by tracemalloc can be several times slower.
    memory(library(new_clock()), recipients, lib)
    memory(baseline(new_clock()), recipients, base)
    big_mailing(library(new_clock()), recipients, repeats, lib)
    big_mailing(baseline(new_clock()), recipients, repeats, base)
    lib_drains, base_drains = [], []
    for _ in range(1 if quick else 5):
        lib_drains.append(drain_rate(library(new_clock()), recipients[:drained]))
        base_drains.append(drain_rate(baseline(new_clock()), recipients[:drained]))
    # The best run of each: on a shared machine the others mostly measure the neighbours.
    lib.drain_ns_per_message = min(lib_drains)
    base.drain_ns_per_message = min(base_drains)
    return lib, base


# -- the report ---------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    unit: str
    library: float
    baseline: float
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float:
        return self.library / self.baseline if self.baseline else float("nan")


def rows(lib: Figures, base: Figures, n: int, drained: int) -> list[Row]:
    def per_second(ns_per_message: float) -> float:
        return 1e9 / ns_per_message if ns_per_message else 0.0

    drain_lib, drain_base = per_second(lib.drain_ns_per_message), per_second(base.drain_ns_per_message)
    us = 1e-3
    return [
        Row(
            f"enqueue_many, {n:,} msgs in batches of {BATCH}",
            "msg/s",
            per_second(lib.enqueue_ns_per_message),
            per_second(base.enqueue_ns_per_message),
        ),
        Row(
            f"drain {drained:,} msgs: claim {CLAIM_LIMIT} + report_many",
            "msg/s",
            drain_lib,
            drain_base,
            ">= 0.5x baseline",
            drain_lib >= 0.5 * drain_base,
        ),
        Row(
            f"metrics of the {n:,} mailing ({SENDERS} senders)",
            "µs",
            lib.metrics_ns * us,
            base.metrics_ns * us,
            "< 20 µs",
            lib.metrics_ns < 20_000,
        ),
        Row(
            f"freeze the {n:,} mailing",
            "µs",
            lib.freeze_ns * us,
            base.freeze_ns * us,
            "< 1000 µs",
            lib.freeze_ns < 1_000_000,
        ),
        Row(
            f"unfreeze the {n:,} mailing",
            "µs",
            lib.unfreeze_ns * us,
            base.unfreeze_ns * us,
            "< 1000 µs",
            lib.unfreeze_ns < 1_000_000,
        ),
        Row(
            f"clear the {n:,} mailing (one run)",
            "µs",
            lib.clear_ns * us,
            base.clear_ns * us,
            "< 1000 µs",
            lib.clear_ns < 1_000_000,
        ),
        Row(
            "memory per queued message, beyond content",
            "bytes",
            lib.bytes_per_message,
            base.bytes_per_message,
            "< 1024 bytes",
            lib.bytes_per_message < 1024,
        ),
    ]


def render(table: list[Row]) -> str:
    header = ["workload", "unit", "library", "baseline", "library/baseline", "target", "met"]
    body = [
        [
            row.workload,
            row.unit,
            f"{row.library:,.1f}" if row.library < 100 else f"{row.library:,.0f}",
            f"{row.baseline:,.1f}" if row.baseline < 100 else f"{row.baseline:,.0f}",
            f"{row.ratio:.2g}",
            row.target,
            "" if row.met is None else "yes" if row.met else "NO",
        ]
        for row in table
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = {2, 3, 4}

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def profile(n: int) -> None:
    """cProfile the library's enqueue_many and drain of ``n`` messages; print the costliest functions."""
    recipients = [f"user{i}@example.com" for i in range(n)]
    queue = library(new_clock())
    for name, work in [
        ("enqueue_many", partial(fill, queue, "drain", recipients, 1)),
        ("drain", partial(drain, queue)),
    ]:
        gc.collect()
        profiler = cProfile.Profile()
        profiler.runcall(work)
        print(f"\n## cProfile of the library: {name}, {n:,} messages, by own time")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the in-memory backend against a plain baseline.")
    parser.add_argument("--messages", type=int, default=1_000_000, help="size of the big mailing")
    parser.add_argument("--quick", action="store_true", help="a small run: 20,000 messages, fewer repeats")
    parser.add_argument("--profile", action="store_true", help="also cProfile enqueue_many and drain")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick and args.messages == parser.get_default("messages") else args.messages
    if n < SENDERS:
        parser.error(f"--messages must be at least {SENDERS}")
    drained = min(n, 200_000)

    began = time.perf_counter()
    lib, base = measure(n, drained, args.quick)
    print(
        f"senderqueue {importlib.metadata.version('senderqueue')}, memory backend, against a plain "
        f"dict + heapq queue. Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {dt.date.today().isoformat()}.\n"
    )
    print(render(rows(lib, base, n, drained)))
    print(
        "\nlibrary/baseline is the ratio of the two figures: for msg/s higher is better, for µs and bytes\n"
        f"lower is better. freeze, unfreeze: median of {200 if args.quick else 1000} calls; metrics: "
        f"median of {2000 if args.quick else 10000}; drain: best of {1 if args.quick else 5} runs. "
        f"Took {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.1f} at the end."
    )
    if args.profile:
        profile(drained)


if __name__ == "__main__":
    main()
