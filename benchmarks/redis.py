"""Measure the Redis backend against peers and a raw redis-py + Lua queue, on one Redis.

Run ``python benchmarks/redis.py`` (a few minutes at the default size; ``--messages`` and
``--drain`` scale it down). Every subject runs in this process against the same Redis
(``--url``, database 9 by default), one after the other, each in its own namespace or
queue, all removed at the end.

Workloads, as in ``benchmarks/memory.py``:

* enqueue_many: the big mailing (``--messages``) in batches of 1,000 over 4 sender queues;
* drain: one sender queue of ``--drain`` messages, claim 100 + report them all delivered,
  until empty (``--runs`` alternating runs of the library and raw Lua, median of each; the
  library also with ``batch=0``, one script per call, to show what shorter scripts cost);
* metrics of the big mailing, idle and while 4 worker processes drain another mailing (median,
  p90, p99; and with ``batch=0``), with a PING between two reads: what any command waits for
  while Redis is that busy; again while 4 ``SenderWorker`` processes (concurrency 20, a
  ``FakeSMTPTransport`` that answers at once) drain it, as an application's workers would; and
  PINGs alone while 4 processes drain raw Lua queues, the same shape by hand: the wait that load
  sets on this machine, whoever implements it;
* freeze, unfreeze and clear of the big mailing;
* memory per queued message: ``INFO memory`` before and after the big mailing.

Peers, driven as their documentation drives them, with the same 1,000-byte payload per job:

* rq: ``Queue.enqueue_many`` in one pipeline per 1,000 jobs; drained by a burst
  ``SimpleWorker`` (no fork per job) running a no-op function.
* saq: ``Queue.enqueue`` of 1,000 jobs at a time (it has no batch enqueue), drained by a
  burst ``Worker`` (default concurrency, 10) running a no-op coroutine.
* raw: the same shape as the library written by hand with redis-py and Lua: a hash and a
  content string per message, a sorted set per sender queue by (next attempt, enqueue order),
  counters per sender queue, tokens and a lease set; no validation, no lifecycle checks, no
  retry policy, no frozen flag or clear epoch, tuples instead of attrs objects.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

# Run as a script, this file's folder comes first on sys.path and its name would hide redis-py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import redis  # noqa: E402

import senderqueue as sq  # noqa: E402

if TYPE_CHECKING:
    from saq.types import Context

BATCH = 1000
CLAIM_LIMIT = 100
SENDERS = 4
CONTENT = b"Subject: hello\r\n\r\n" + b"x" * 1000
MAIL_FROM = "news@shop.example"
LEASE = timedelta(minutes=5)
DELIVERED = sq.Delivered(code=250, text="ok")


def noop(*_: object) -> None:
    """The job the rq worker runs."""


async def async_noop(_: Context, **__: object) -> None:
    """The job the saq worker runs."""


def batches(mailing: str, count: int, senders: int, tag: str = "") -> Iterator[list[sq.NewMessage]]:
    """The messages of a mailing, ``BATCH`` at a time, round-robin over ``senders``."""
    for start in range(0, count, BATCH):
        yield [
            sq.NewMessage(
                mailing=mailing,
                sender=f"s{i % senders}",
                recipient=f"user{i}@example.com",
                content=CONTENT,
                mail_from=MAIL_FROM,
                message_id=f"{tag}{i}" if tag else None,
            )
            for i in range(start, min(start + BATCH, count))
        ]


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds else 0.0


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


# -- the library ----------------------------------------------------------------------


def library_fill(queue: sq.SenderQueue, mailing: str, count: int, senders: int) -> float:
    """Seconds spent in enqueue_many."""
    spent = 0.0
    for batch in batches(mailing, count, senders):
        spent += timed(lambda b=batch: queue.enqueue_many(b))  # type: ignore[misc]
    return spent


def library_drain(queue: sq.SenderQueue, sender: str = "s0") -> int:
    done = 0
    while claims := queue.claim(sender, CLAIM_LIMIT, LEASE):
        assert not any(queue.report_many([(claim, DELIVERED) for claim in claims]))
        done += len(claims)
    return done


def library_drain_rate(url: str, count: int, options: str = "") -> float:
    """msg/s of one drain of a fresh sender queue of ``count`` messages (``options``: more URL query)."""
    fresh = sq.SenderQueue.open(f"{url}?namespace=bench-drain-{uuid.uuid4().hex[:8]}{options}")
    try:
        library_fill(fresh, "drain", count, 1)
        return per_second(count, timed(lambda: library_drain(fresh)))
    finally:
        fresh.backend.destroy()  # type: ignore[attr-defined]
        fresh.close()


DRAINER = r"""
import sys
from datetime import timedelta
import senderqueue as sq
queue = sq.SenderQueue.open(sys.argv[1])
delivered = sq.Delivered(code=250)
print("ready", flush=True)
while claims := queue.claim(sys.argv[2], 100, timedelta(minutes=5)):
    queue.report_many([(c, delivered) for c in claims])
"""


SENDER_WORKER = r"""
import sys
import senderqueue as sq
queue = sq.SenderQueue.open(sys.argv[1])
worker = sq.SenderWorker(queue, sq.FakeSMTPTransport(), sender=sys.argv[2], concurrency=20)
print("ready", flush=True)
worker.run_until_idle()
"""


def metrics_under_load(
    url: str, queue: sq.SenderQueue, count: int, client: redis.Redis, drainer: str = DRAINER
) -> tuple[list[float], list[float]]:
    """Latencies (seconds) of the metrics of a mailing while 4 worker processes drain it, and of
    PINGs sent between them: what any command waits for under the same load.

    ``drainer`` is the workers' code: a tight claim and report loop, or ``SENDER_WORKER``.
    """
    library_fill(queue, "busy", count, SENDERS)
    workers = [
        subprocess.Popen([sys.executable, "-c", drainer, url, f"s{n}"], stdout=subprocess.PIPE, text=True)
        for n in range(SENDERS)
    ]
    for worker in workers:
        assert worker.stdout is not None
        worker.stdout.readline()
    samples: list[float] = []
    pings: list[float] = []
    try:
        while all(w.poll() is None for w in workers):
            samples.append(timed(lambda: queue.metrics("busy")))
            time.sleep(0.001)
            pings.append(timed(client.ping))
            time.sleep(0.001)
    finally:
        for worker in workers:
            worker.wait(timeout=600)
            if worker.stdout is not None:
                worker.stdout.close()
    return samples, pings


RAW_DRAINER = r"""
import importlib.util, sys
import redis
spec = importlib.util.spec_from_file_location("redis_benchmark", sys.argv[1])
bench = sys.modules["redis_benchmark"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
raw = bench.RawQueue(redis.Redis.from_url(sys.argv[2]), sys.argv[3])
print("ready", flush=True)
raw.drain()
"""


def pings_under_raw_load(redis_url: str, client: redis.Redis, count: int) -> list[float]:
    """Latencies (seconds) of PINGs while 4 processes drain raw Lua queues of ``count`` in all."""
    queues = [RawQueue(client, uuid.uuid4().hex[:8]) for _ in range(SENDERS)]
    try:
        for raw in queues:
            raw.fill(count // SENDERS)
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", RAW_DRAINER, os.path.abspath(__file__), redis_url, raw.name],
                stdout=subprocess.PIPE,
                text=True,
            )
            for raw in queues
        ]
        for worker in workers:
            assert worker.stdout is not None
            worker.stdout.readline()
        pings: list[float] = []
        try:
            while all(w.poll() is None for w in workers):
                pings.append(timed(client.ping))
                time.sleep(0.001)
        finally:
            for worker in workers:
                worker.wait(timeout=600)
                if worker.stdout is not None:
                    worker.stdout.close()
        if any(worker.returncode for worker in workers):
            raise RuntimeError("a raw Lua worker failed")
        return pings
    finally:
        for raw in queues:
            raw.destroy()


# -- raw redis-py + Lua ------------------------------------------------------------------

RAW_ENQUEUE = """
local q, now, seq = KEYS[1], ARGV[1], redis.call('INCRBY', KEYS[1] .. ':seq', (#ARGV - 1) / 4)
seq = seq - (#ARGV - 1) / 4
for i = 2, #ARGV, 4 do
  local id = ARGV[i]
  seq = seq + 1
  redis.call('HSET', q .. ':m:' .. id, 'st', 'n', 'a', 0, 'rc', ARGV[i + 1], 'mf', ARGV[i + 2], 'na', now)
  redis.call('SET', q .. ':b:' .. id, ARGV[i + 3])
  redis.call('ZADD', q .. ':z', now, string.format('%016d', seq) .. id)
end
redis.call('HINCRBY', q .. ':q', 'n', (#ARGV - 1) / 4)
"""
RAW_CLAIM = """
local q, now, limit, expires = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local due = redis.call('ZRANGEBYSCORE', q .. ':z', '-inf', now, 'LIMIT', 0, limit)
local token = redis.call('INCRBY', q .. ':tok', #due) - #due
local out = {}
for _, member in ipairs(due) do
  redis.call('ZREM', q .. ':z', member)
  local id = string.sub(member, 17)
  local r = redis.call('HMGET', q .. ':m:' .. id, 'a', 'rc', 'mf')
  token = token + 1
  redis.call('HSET', q .. ':m:' .. id, 'st', 's', 'a', r[1] + 1, 't', token, 'x', expires)
  redis.call('ZADD', q .. ':l', expires, id)
  out[#out + 1] = id
  out[#out + 1] = token
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
  out[#out + 1] = redis.call('GET', q .. ':b:' .. id)
end
redis.call('HINCRBY', q .. ':q', 'n', 0 - #due)  -- not -0: HINCRBY refuses it
redis.call('HINCRBY', q .. ':q', 'sd', #due)
return out
"""
RAW_REPORT = """
local q, now, out, done = KEYS[1], ARGV[1], {}, 0
for i = 2, #ARGV, 2 do
  local key = q .. ':m:' .. ARGV[i]
  local r = redis.call('HMGET', key, 'st', 't')
  if r[1] == 's' and r[2] == ARGV[i + 1] then
    redis.call('HSET', key, 'st', 'd', 'ua', now)
    redis.call('HDEL', key, 't', 'x')
    redis.call('ZREM', q .. ':l', ARGV[i])
    redis.call('ZADD', q .. ':done', now, ARGV[i])
    done = done + 1
    out[#out + 1] = 0
  else
    out[#out + 1] = 1
  end
end
redis.call('HINCRBY', q .. ':q', 'sd', 0 - done)
redis.call('HINCRBY', q .. ':q', 'd', done)
return out
"""


class RawQueue:
    """One sender queue by hand: the baseline for enqueue, drain and memory."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.name = name
        self.key = "{raw-" + name + "}"
        self.enqueue_script = client.register_script(RAW_ENQUEUE)
        self.claim_script = client.register_script(RAW_CLAIM)
        self.report_script = client.register_script(RAW_REPORT)

    @staticmethod
    def now() -> int:
        return time.time_ns() // 1000

    def fill(self, count: int) -> float:
        spent = 0.0
        for batch in batches("raw", count, 1, tag="r"):
            started = time.perf_counter()
            args: list[str | bytes | int] = [self.now()]
            for m in batch:
                args += [m.message_id or "", m.recipient, m.mail_from, m.content]
            self.enqueue_script(keys=[self.key], args=args)
            spent += time.perf_counter() - started
        return spent

    def drain(self) -> int:
        done = 0
        while True:
            now = self.now()
            reply = self.claim_script(keys=[self.key], args=[now, CLAIM_LIMIT, now + 300_000_000])
            if not reply:
                return done
            claims = [tuple(reply[i : i + 5]) for i in range(0, len(reply), 5)]
            args: list[bytes | int] = [self.now()]
            for claim in claims:
                args += [claim[0], claim[1]]
            assert not any(self.report_script(keys=[self.key], args=args))
            done += len(claims)

    def destroy(self) -> None:
        keys = list(self.client.scan_iter(match=self.key + "*", count=10_000))
        for start in range(0, len(keys), 1000):
            self.client.unlink(*keys[start : start + 1000])


# -- peers ----------------------------------------------------------------------------


def rq_figures(url: str, count: int) -> tuple[float, float]:
    """(enqueue msg/s, drain msg/s) of rq."""
    from rq import Queue, SimpleWorker

    connection = redis.Redis.from_url(url)
    queue = Queue(f"bench-{uuid.uuid4().hex[:8]}", connection=connection)
    try:
        spent = 0.0
        for start in range(0, count, BATCH):
            started = time.perf_counter()
            with connection.pipeline() as pipe:
                queue.enqueue_many(
                    [
                        Queue.prepare_data(noop, args=(f"user{i}@example.com", CONTENT), result_ttl=0)
                        for i in range(start, min(start + BATCH, count))
                    ],
                    pipeline=pipe,
                )
                pipe.execute()
            spent += time.perf_counter() - started
        assert queue.count == count
        worker = SimpleWorker([queue], connection=connection)
        drain = timed(lambda: worker.work(burst=True, logging_level="WARNING"))
        assert queue.count == 0
        connection.unlink(worker.key, "rq:clean_groups")  # what rq's worker leaves behind
        return per_second(count, spent), per_second(count, drain)
    finally:
        queue.empty()  # type: ignore[no-untyped-call]
        queue.delete(delete_jobs=True)
        connection.close()


def saq_figures(url: str, count: int) -> tuple[float, float]:
    """(enqueue msg/s, drain msg/s) of saq, or zeros if it cannot run here."""
    from saq import Queue, Worker

    async def run() -> tuple[float, float]:
        queue = Queue.from_url(url, name=f"bench-{uuid.uuid4().hex[:8]}")
        await queue.connect()
        try:
            started = time.perf_counter()
            for start in range(0, count, BATCH):
                await asyncio.gather(
                    *(
                        queue.enqueue("async_noop", rcpt=f"user{i}@example.com", content=CONTENT.decode())
                        for i in range(start, min(start + BATCH, count))
                    )
                )
            enqueue = time.perf_counter() - started
            # Burst mode stops only after a dequeue has waited dequeue_timeout in vain: time until the
            # last job is done instead, then let the worker stop.
            worker = Worker(queue, functions=[async_noop], burst=True, dequeue_timeout=0.2)
            started = time.perf_counter()
            running = asyncio.create_task(worker.start())
            while await queue.count("incomplete"):
                await asyncio.sleep(0.002)
            drain = time.perf_counter() - started
            await running
            info = await queue.info()
            assert info["queued"] == 0, info
            return per_second(count, enqueue), per_second(count, drain)
        finally:
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"saq:*{queue.name}*", count=10_000))
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start : start + 1000])
            client.close()
            await queue.disconnect()

    return asyncio.run(run())


# -- the run --------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    unit: str
    figures: dict[str, float] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None


def fmt(value: float) -> str:
    if value != value or value == 0:  # nan or not run
        return "—"
    if value < 10:
        return f"{value:.2f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def render(rows: Sequence[Row], subjects: Sequence[str]) -> str:
    header = ["workload", "unit", *subjects, "target", "met"]
    body = [
        [
            row.workload,
            row.unit,
            *(fmt(row.figures.get(s, 0.0)) for s in subjects),
            row.target,
            "" if row.met is None else "yes" if row.met else "NO",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = set(range(2, 2 + len(subjects)))

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the Redis backend against rq, saq and raw Lua.")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/9", help="the Redis to use")
    parser.add_argument("--messages", type=int, default=1_000_000, help="size of the big mailing")
    parser.add_argument("--drain", type=int, default=20_000, help="messages drained by each subject")
    parser.add_argument("--runs", type=int, default=5, help="drain runs of the library and raw Lua")
    parser.add_argument("--peer-drain", type=int, default=2_000, help="messages drained by rq and saq")
    parser.add_argument("--busy", type=int, default=200_000, help="messages drained while metrics are read")
    parser.add_argument("--repeats", type=int, default=200, help="calls timed for freeze/unfreeze/metrics")
    args = parser.parse_args(argv)
    n, drained = args.messages, args.drain
    began = time.perf_counter()
    loads = [os.getloadavg()[0]]

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {what}", file=sys.stderr, flush=True)

    client = redis.Redis.from_url(args.url)
    url = f"{args.url}?namespace=bench-{uuid.uuid4().hex[:8]}"
    queue = sq.SenderQueue.open(url)
    raw = RawQueue(client, uuid.uuid4().hex[:8])
    rows: list[Row] = []
    try:
        # enqueue + memory of the big mailing
        before = used_memory(client)
        enqueue = library_fill(queue, "big", n, SENDERS)
        library_bytes = (used_memory(client) - before) / n
        before = used_memory(client)
        progress("enqueue of the raw queue")
        raw_enqueue = raw.fill(n)
        raw_bytes = (used_memory(client) - before) / n
        raw.destroy()
        progress("freeze, unfreeze and clear")
        # freeze / unfreeze / clear of the big mailing
        assert queue.freeze("big") == n
        assert queue.unfreeze("big") == n
        freezes, unfreezes = [], []
        for _ in range(args.repeats):
            freezes.append(timed(lambda: queue.freeze("big")))
            unfreezes.append(timed(lambda: queue.unfreeze("big")))
        idle = [timed(lambda: queue.metrics("big")) for _ in range(args.repeats * 5)]
        clear = timed(lambda: queue.clear("big"))
        assert queue.metrics("big").deleted == n
        progress("drain")
        # Alternating runs, median of each: on a busy machine one run of each can land far apart.
        # batch=0 (one script per call) shows what the default's shorter scripts cost.
        library_rates, raw_rates, whole_rates = [], [], []
        for _ in range(args.runs):
            library_rates.append(library_drain_rate(args.url, drained))
            raw.fill(drained)
            raw_rates.append(per_second(drained, timed(raw.drain)))
            raw.destroy()
            whole_rates.append(library_drain_rate(args.url, drained, "&batch=0"))
        library_rate, raw_rate = statistics.median(library_rates), statistics.median(raw_rates)
        ratios = [f"{lib / raw:.2f}" for lib, raw in zip(library_rates, raw_rates, strict=True)]
        progress(f"drain runs (msg/s): library {library_rates}, raw {raw_rates}; ratios {ratios}")
        progress(f"drain runs with batch=0 (msg/s): {whole_rates}")
        loads.append(os.getloadavg()[0])
        rq_enqueue, rq_rate = rq_figures(args.url, args.peer_drain)
        progress("saq")
        saq_enqueue, saq_rate = saq_figures(args.url, args.peer_drain)
        progress("metrics while 4 workers drain")
        busy, pings = metrics_under_load(url, queue, args.busy, client)
        progress("metrics while 4 workers drain with batch=0")
        busy_whole, pings_whole = metrics_under_load(url + "&batch=0", queue, args.busy, client)
        progress("metrics while 4 SenderWorkers drain")
        busy_workers, pings_workers = metrics_under_load(url, queue, args.busy, client, SENDER_WORKER)
        progress("PING while 4 raw Lua workers drain")
        pings_raw = pings_under_raw_load(args.url, client, args.busy)
        loads.append(os.getloadavg()[0])
    finally:
        queue.backend.destroy()  # type: ignore[attr-defined]
        queue.close()
        raw.destroy()
    best_peer = max(rq_rate, saq_rate)
    p90 = statistics.quantiles(busy, n=10)[8] if len(busy) >= 10 else max(busy)
    p99 = statistics.quantiles(busy, n=100)[98] if len(busy) >= 100 else max(busy)
    p90_whole = statistics.quantiles(busy_whole, n=10)[8] if len(busy_whole) >= 10 else max(busy_whole)
    ms = 1e3
    rows = [
        Row(
            f"enqueue_many, {n:,} msgs (peers {args.peer_drain:,}) in batches of {BATCH}",
            "msg/s",
            {
                "senderqueue": per_second(n, enqueue),
                "raw Lua": per_second(n, raw_enqueue),
                "rq": rq_enqueue,
                "saq": saq_enqueue,
            },
        ),
        Row(
            f"drain {drained:,} msgs (peers {args.peer_drain:,}): claim {CLAIM_LIMIT} + report_many, median",
            "msg/s",
            {"senderqueue": library_rate, "raw Lua": raw_rate, "rq": rq_rate, "saq": saq_rate},
            ">= 2x best peer, >= 0.5x raw",
            library_rate >= 2 * best_peer and library_rate >= 0.5 * raw_rate,
        ),
        Row(
            "  the same with batch=0 (one script per call), median",
            "msg/s",
            {"senderqueue": statistics.median(whole_rates)},
        ),
        Row(
            f"metrics of the {n:,} mailing ({SENDERS} senders), idle, median",
            "ms",
            {"senderqueue": statistics.median(idle) * ms},
        ),
        Row(
            f"metrics while 4 worker processes drain {args.busy:,} msgs, median",
            "ms",
            {"senderqueue": statistics.median(busy) * ms},
            "< 1 ms",
            statistics.median(busy) < 1e-3,
        ),
        Row(f"metrics while 4 worker processes drain, p90 of {len(busy):,}", "ms", {"senderqueue": p90 * ms}),
        Row(
            f"metrics while 4 worker processes drain, p99 of {len(busy):,}",
            "ms",
            {"senderqueue": p99 * ms},
        ),
        Row(
            "  PING (the floor: any command's wait under that load), median",
            "ms",
            {"senderqueue": statistics.median(pings) * ms},
        ),
        Row(
            "  the same with batch=0 (one script per call), median",
            "ms",
            {"senderqueue": statistics.median(busy_whole) * ms},
        ),
        Row(
            "  PING under the batch=0 load, median",
            "ms",
            {"senderqueue": statistics.median(pings_whole) * ms},
        ),
        Row("  the same with batch=0, p90", "ms", {"senderqueue": p90_whole * ms}),
        Row(
            "metrics while 4 SenderWorkers (concurrency 20, fake SMTP) drain, median",
            "ms",
            {"senderqueue": statistics.median(busy_workers) * ms},
        ),
        Row(
            "  PING under the SenderWorkers' load, median",
            "ms",
            {"senderqueue": statistics.median(pings_workers) * ms},
        ),
        Row(
            "  PING while 4 raw Lua workers drain (the same shape by hand), median",
            "ms",
            {"raw Lua": statistics.median(pings_raw) * ms},
        ),
        Row(
            f"freeze the {n:,} mailing, median",
            "ms",
            {"senderqueue": statistics.median(freezes) * ms},
            "< 5 ms",
            statistics.median(freezes) < 5e-3,
        ),
        Row(f"unfreeze the {n:,} mailing, median", "ms", {"senderqueue": statistics.median(unfreezes) * ms}),
        Row(f"clear the {n:,} mailing", "ms", {"senderqueue": clear * ms}, "< 5 ms", clear < 5e-3),
        Row(
            "Redis memory per queued message (INFO used_memory)",
            "bytes",
            {"senderqueue": library_bytes, "raw Lua": raw_bytes},
        ),
        Row(
            f"  of which beyond the {len(CONTENT):,}-byte content",
            "bytes",
            {"senderqueue": library_bytes - len(CONTENT), "raw Lua": raw_bytes - len(CONTENT)},
        ),
    ]
    server = client.info("server")
    print(
        f"senderqueue-redis on Redis {server['redis_version']}, redis-py {redis.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average (1 min) at start, after the drain runs, after the "
        f"metrics under load: {', '.join(f'{load:.1f}' for load in loads)}.\n"
    )
    print(render(rows, ["senderqueue", "raw Lua", "rq", "saq"]))
    print(f"\nTook {time.perf_counter() - began:.0f} s.")
    client.close()


if __name__ == "__main__":
    main()
