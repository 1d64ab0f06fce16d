"""Measure the SQL backend on SQLite and PostgreSQL against its peers and a raw-driver baseline.

Run ``python benchmarks/sql.py`` (a few minutes; ``--messages 100000`` for a quicker run).
On each engine, in the same run:

* senderqueue: enqueue_many in batches of 1,000; drain = claim 100 + report_many until empty
  (``--runs`` rounds in which the library, the raw baseline and each peer drain a fresh queue
  in turn; the median of each, and every round's ratios printed); metrics of a mailing while
  4 worker processes drain it (on PostgreSQL with a ``SELECT 1`` between two reads: the wait any
  statement meets under that load); freeze, unfreeze and clear of a mailing of ``--messages`` messages.
* raw: the same shape written straight on the driver (sqlite3, psycopg): executemany insert,
  a one-statement batch claim (``UPDATE … WHERE id IN (SELECT … LIMIT 100) RETURNING``, with
  ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and a one-statement batch ack.
* peers: persist-queue (SQLiteAckQueue) and litequeue on SQLite, pgqueuer on PostgreSQL, each
  through its own API with its own defaults, at its best batch size (the SQLite peers have no
  batch calls, and persist-queue commits every put, get and ack: it runs on ``--peer-messages``).

PostgreSQL comes from ``SENDERQUEUE_POSTGRESQL_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
pgqueuer installs its schema in that database for the run and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psycopg

import senderqueue as sq

BATCH = 1000
CLAIM = 100
WARM_CLEARS = 12  # clears of small mailings before the big one is timed
CONTENT = b"Subject: hello\r\n\r\n" + b"x" * 1000
PG_URL = os.environ.get("SENDERQUEUE_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test")


def messages(mailing: str, count: int, senders: int = 1) -> list[list[sq.NewMessage]]:
    return [
        [
            sq.NewMessage(
                mailing=mailing,
                sender=f"s{i % senders}",
                recipient=f"user{i}@example.com",
                content=CONTENT,
                mail_from="news@shop.example",
            )
            for i in range(start, min(start + BATCH, count))
        ]
        for start in range(0, count, BATCH)
    ]


@dataclass
class Result:
    """Rates in messages per second, times in microseconds."""

    enqueue: float = 0.0
    drain: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else float("nan")


# -- senderqueue ------------------------------------------------------------------------


def drain_worker(url: str, sender: str) -> None:
    """One of the 4 processes draining while metrics are read."""
    queue = sq.SenderQueue.open(url)
    while claims := queue.claim(sender, CLAIM):
        queue.report_many([(claim, sq.Delivered()) for claim in claims])
    queue.close()


def senderqueue_drain(url: str, count: int) -> Result:
    """Enqueue ``count`` messages on a fresh sender queue and drain them."""
    result = Result()
    queue = sq.SenderQueue.open(url)
    batches = messages("drain", count)
    started = time.perf_counter()
    for batch in batches:
        queue.enqueue_many(batch)
    result.enqueue = rate(count, time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    while claims := queue.claim("s0", CLAIM):
        queue.report_many([(claim, sq.Delivered()) for claim in claims])
        done += len(claims)
    result.drain = rate(done, time.perf_counter() - started)
    assert done == count
    destroy = getattr(queue.backend, "destroy", None)
    if destroy is not None:
        destroy()
    queue.close()
    return result


def alternate(runs: int, subjects: dict[str, Callable[[int], Result]]) -> dict[str, Result]:
    """``runs`` rounds in which every subject drains once, in turn; the median of each.

    On a shared machine two runs far apart can see different machines: taking turns gives
    every subject the same conditions. Each round's ratio of the first subject to the others
    is printed too.
    """
    results: dict[str, list[Result]] = {name: [] for name in subjects}
    for n in range(runs):
        for name, run in subjects.items():
            results[name].append(run(n))
    first, *others = subjects
    for name in others:
        pairs = zip(results[first], results[name], strict=True)
        ratios = " ".join(f"{a.drain / b.drain:.2f}" for a, b in pairs)
        print(f"  drain, {first} / {name}, round by round: {ratios}", flush=True)
    return {
        name: Result(
            enqueue=statistics.median(r.enqueue for r in rounds),
            drain=statistics.median(r.drain for r in rounds),
        )
        for name, rounds in results.items()
    }


def senderqueue_run(url: str, drained: int, big: int) -> Result:
    """Metrics under load, freeze, unfreeze and clear (the drain is measured by :func:`alternate`)."""
    result = Result()
    queue = sq.SenderQueue.open(url)

    # Metrics while 4 processes drain a mailing of 4 senders.
    for batch in messages("busy", max(drained, 20_000), senders=4):
        queue.enqueue_many(batch)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=drain_worker, args=(url, f"s{n}")) for n in range(4)]
    for worker in workers:
        worker.start()
    samples: list[float] = []
    pings: list[float] = []  # PostgreSQL: a SELECT 1 between two reads, what any statement waits for
    probe = psycopg.connect(PG_URL, autocommit=True) if url.startswith("postgresql") else None
    while queue.metrics("busy").total == queue.metrics("busy").new:  # wait until they are at work
        time.sleep(0.01)
    while any(worker.is_alive() for worker in workers) and len(samples) < 5000:
        started = time.perf_counter()
        queue.metrics("busy")
        samples.append(time.perf_counter() - started)
        time.sleep(0.001)
        if probe is not None:
            started = time.perf_counter()
            probe.execute("SELECT 1").fetchall()
            pings.append(time.perf_counter() - started)
            time.sleep(0.001)
    for worker in workers:
        worker.join()
    result.extra["metrics under load, median µs"] = statistics.median(samples) * 1e6
    result.extra["metrics under load, p99 µs"] = statistics.quantiles(samples, n=100)[98] * 1e6
    if probe is not None:
        probe.close()
        result.extra["a SELECT 1 under the same load, median µs"] = statistics.median(pings) * 1e6

    # Freeze, unfreeze and clear of a big mailing.
    for batch in messages("big", big, senders=4):
        queue.enqueue_many(batch)
    assert queue.freeze("big") == big
    assert queue.unfreeze("big") == big
    backend = queue.backend
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.dialect.name == "sqlite":
        # The million inserts wait in the WAL; fold them into the database now, or the next
        # commit that crosses the checkpoint threshold (whichever is timed) pays for them.
        with engine.execution_options(senderqueue_read=True).connect() as conn:  # outside a transaction
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    elif engine is not None:
        # The same on PostgreSQL: write the million inserts' pages out, and vacuum their tables
        # as autovacuum soon would, so that neither competes with what is timed.
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            for table in backend._t.metadata.sorted_tables:  # type: ignore[attr-defined]
                conn.execute(f"VACUUM (ANALYZE) {table.name}")
    freezes, unfreezes = [], []
    for _ in range(20):
        started = time.perf_counter()
        queue.freeze("big")
        freezes.append(time.perf_counter() - started)
        started = time.perf_counter()
        queue.unfreeze("big")
        unfreezes.append(time.perf_counter() - started)
    result.extra["freeze, median µs"] = statistics.median(freezes) * 1e6
    result.extra["unfreeze, median µs"] = statistics.median(unfreezes) * 1e6
    # Clears of small mailings first, as a long-running process has made before: the driver
    # prepares a statement on its 6th execution and the server caches its plan after 5 more; until
    # then a clear costs 1-3 ms more on PostgreSQL (the freezes above warmed theirs).
    for n in range(WARM_CLEARS):
        queue.enqueue_many(messages(f"warm{n}", 8, senders=4)[0])
        assert queue.clear(f"warm{n}") == 8
    started = time.perf_counter()
    assert queue.clear("big") == big
    result.extra["clear µs"] = (time.perf_counter() - started) * 1e6
    destroy = getattr(backend, "destroy", None)
    if destroy is not None:
        destroy()
    queue.close()
    return result


# -- the raw baseline -------------------------------------------------------------------


def raw_sqlite(path: str, count: int) -> Result:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE raw (id INTEGER PRIMARY KEY, sender TEXT, recipient TEXT, content BLOB, "
        "state INTEGER, due INTEGER, token INTEGER)"
    )
    conn.execute("CREATE INDEX raw_ready ON raw (sender, due, id) WHERE state = 0")
    result = Result()
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO raw (sender, recipient, content, state, due) VALUES ('s0', ?, ?, 0, 0)",
            [(f"user{i}@example.com", CONTENT) for i in range(start, min(start + BATCH, count))],
        )
        conn.execute("COMMIT")
    result.enqueue = rate(count, time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "UPDATE raw SET state = 1, token = ? WHERE id IN (SELECT id FROM raw WHERE sender = 's0' "
            "AND state = 0 AND due <= 1 ORDER BY due, id LIMIT ?) RETURNING id, recipient, content",
            (done, CLAIM),
        ).fetchall()
        conn.execute("COMMIT")
        if not rows:
            break
        conn.execute("BEGIN IMMEDIATE")
        ids = [row[0] for row in rows]
        conn.execute(f"UPDATE raw SET state = 2 WHERE id IN ({','.join('?' * len(ids))})", ids)
        conn.execute("COMMIT")
        done += len(rows)
    result.drain = rate(done, time.perf_counter() - started)
    conn.close()
    return result


def raw_postgresql(url: str, count: int) -> Result:
    table = f"raw_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(
        f"CREATE TABLE {table} (id bigserial PRIMARY KEY, sender text, recipient text, content bytea, "
        "state smallint, due bigint, token bigint)"
    )
    conn.execute(f"CREATE INDEX ON {table} (sender, due, id) WHERE state = 0")
    result = Result()
    try:
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {table} (sender, recipient, content, state, due) "
                    "VALUES ('s0', %s, %s, 0, 0)",
                    [(f"user{i}@example.com", CONTENT) for i in range(start, min(start + BATCH, count))],
                )
        result.enqueue = rate(count, time.perf_counter() - started)
        started = time.perf_counter()
        done = 0
        while True:
            rows = conn.execute(
                f"UPDATE {table} SET state = 1, token = %s WHERE id IN (SELECT id FROM {table} "
                "WHERE sender = 's0' AND state = 0 AND due <= 1 ORDER BY due, id LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING id, recipient, content",
                (done, CLAIM),
            ).fetchall()
            if not rows:
                break
            conn.execute(f"UPDATE {table} SET state = 2 WHERE id = ANY(%s)", ([row[0] for row in rows],))
            done += len(rows)
        result.drain = rate(done, time.perf_counter() - started)
    finally:
        conn.execute(f"DROP TABLE {table}")
        conn.close()
    return result


# -- peers ------------------------------------------------------------------------------


def persist_queue(path: str, count: int) -> Result:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(path, multithreading=False, auto_commit=True)
    result = Result()
    started = time.perf_counter()
    for i in range(count):  # no batch put
        queue.put({"recipient": f"user{i}@example.com", "content": CONTENT})
    result.enqueue = rate(count, time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    while True:
        items = []
        for _ in range(CLAIM):  # no batch get: 100 gets, then 100 acks
            item = queue.get(block=False) if queue.size else None
            if item is None:
                break
            items.append(item)
        if not items:
            break
        for item in items:
            queue.ack(item)
        done += len(items)
    result.drain = rate(done, time.perf_counter() - started)
    assert done == count, done
    queue.close()
    return result


def litequeue_run(path: str, count: int) -> Result:
    from litequeue import LiteQueue  # type: ignore[import-untyped]

    queue = LiteQueue(path)
    result = Result()
    started = time.perf_counter()
    for i in range(count):  # no batch put
        queue.put(f"user{i}@example.com")
    result.enqueue = rate(count, time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    while True:
        popped = [message for message in (queue.pop() for _ in range(CLAIM)) if message is not None]
        if not popped:
            break
        for message in popped:
            queue.done(message.message_id)
        done += len(popped)
    result.drain = rate(done, time.perf_counter() - started)
    assert done == count, done
    queue.close()
    return result


def pgqueuer_run(url: str, count: int) -> Result:
    from pgqueuer.domain.types import QueueEntrypoint, QueueManagerId
    from pgqueuer.queries import EntrypointExecutionParameter, Queries

    async def run() -> Result:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        queries = Queries.from_psycopg_connection(conn)
        result = Result()
        try:
            await queries.install()
            started = time.perf_counter()
            for start in range(0, count, BATCH):
                size = min(BATCH, count - start)
                await queries.enqueue(["send"] * size, [CONTENT] * size, [0] * size)
            result.enqueue = rate(count, time.perf_counter() - started)
            started = time.perf_counter()
            done = 0
            manager = QueueManagerId(uuid.uuid4())
            send = QueueEntrypoint("send")
            while jobs := await queries.dequeue(
                batch_size=CLAIM,
                entrypoints={send: EntrypointExecutionParameter(concurrency_limit=0)},
                queue_manager_id=manager,
                global_concurrency_limit=None,
                heartbeat_timeout=dt.timedelta(seconds=30),
            ):
                await queries.log_jobs([(job, "successful", None) for job in jobs])
                done += len(jobs)
            result.drain = rate(done, time.perf_counter() - started)
            assert done == count, done
        finally:
            await queries.uninstall()
            await conn.close()
        return result

    return asyncio.run(run())


# -- the report -------------------------------------------------------------------------


def in_turn(run: Callable[[str, int], Result], path: str, count: int) -> Callable[[int], Result]:
    """``run`` on a fresh ``path`` each round (``{}`` in it becomes the round's number)."""
    return lambda n: run(path.format(n), count)


def measure(name: str, run: Callable[[], Result]) -> Result:
    started = time.perf_counter()
    result = run()
    print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--messages", type=int, default=1_000_000, help="size of the mailing frozen and cleared"
    )
    parser.add_argument("--drain", type=int, default=20_000, help="messages enqueued and drained per subject")
    parser.add_argument(
        "--peer-messages", type=int, default=2_000, help="messages per peer (persist-queue commits each one)"
    )
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=5, help="rounds of drains, every subject taking its turn")
    args = parser.parse_args()
    began = time.perf_counter()
    drained, big = args.drain, args.messages
    tables: list[str] = []
    for engine in args.engines.split(","):
        print(f"{engine}:", flush=True)
        few = args.peer_messages if engine == "sqlite" else drained
        with tempfile.TemporaryDirectory() as tmp:
            if engine == "sqlite":
                # The drains first: after a million-message mailing the disk is busy for a while.
                drains = alternate(
                    args.runs,
                    {
                        "senderqueue": lambda n: senderqueue_drain(f"sqlite:///{tmp}/drain{n}.db", drained),
                        "raw": lambda n: raw_sqlite(f"{tmp}/raw{n}.db", drained),
                        "persist-queue (SQLiteAckQueue)": in_turn(persist_queue, f"{tmp}/persist{{}}", few),
                        "litequeue": in_turn(litequeue_run, f"{tmp}/lite{{}}.db", few),
                    },
                )
                ours = measure(
                    "senderqueue", partial(senderqueue_run, f"sqlite:///{tmp}/sq.db", drained, big)
                )
            else:
                pg = f"{PG_URL}?namespace=bench{uuid.uuid4().hex[:8]}"
                drains = alternate(
                    args.runs,
                    {
                        "senderqueue": lambda n: senderqueue_drain(
                            f"{PG_URL}?namespace=drain{uuid.uuid4().hex[:8]}", drained
                        ),
                        "raw": lambda n: raw_postgresql(PG_URL, drained),
                        "pgqueuer": lambda n: pgqueuer_run(PG_URL, drained),
                    },
                )
                ours = measure("senderqueue", partial(senderqueue_run, pg, drained, big))
        raw = drains.pop("raw")
        mine = drains.pop("senderqueue")
        peers = drains
        ours.enqueue, ours.drain = mine.enqueue, mine.drain
        best = max(peer.drain for peer in peers.values())
        lines = [
            f"**{engine}**: drain of {drained:,} messages ({few:,} for the peers), median of "
            f"{args.runs} rounds in which each subject runs once, in turn; "
            f"a mailing of {big:,} for freeze, unfreeze and clear",
            "",
            "| subject | enqueue_many msg/s | drain msg/s | drain vs senderqueue |",
            "|---|---:|---:|---:|",
            f"| senderqueue | {ours.enqueue:,.0f} | {ours.drain:,.0f} | 1.00 |",
            f"| raw driver, same shape | {raw.enqueue:,.0f} | {raw.drain:,.0f} "
            f"| {raw.drain / ours.drain:.2f} |",
        ]
        lines += [
            f"| {name} | {peer.enqueue:,.0f} | {peer.drain:,.0f} | {peer.drain / ours.drain:.2f} |"
            for name, peer in peers.items()
        ]
        lines += ["", "| senderqueue | figure | target | met |", "|---|---:|---|---|"]
        checks: list[tuple[str, float, str, bool | None]] = [
            ("drain / best peer", ours.drain / best, ">= 2", ours.drain >= 2 * best),
            ("drain / raw baseline", ours.drain / raw.drain, ">= 0.5", ours.drain >= 0.5 * raw.drain),
        ]
        for key, value in ours.extra.items():
            target = "< 1000 µs" if key.startswith("metrics") and "median" in key else ""
            target = "< 5000 µs" if key.startswith(("freeze", "clear")) else target
            met = value < (1000 if "metrics" in key else 5000) if target else None
            checks.append((key, value, target, met))
        for key, value, target, met in checks:
            shown = f"{value:.2f}" if value < 100 else f"{value:,.0f}"
            lines.append(f"| {key} | {shown} | {target} | {'' if met is None else 'yes' if met else 'NO'} |")
        table = "\n".join(lines)
        print("\n" + table + "\n", flush=True)
        tables.append(table)
    print(
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, "
        f"{dt.date.today().isoformat()}. Took {time.perf_counter() - began:.0f} s."
    )
    Path(tempfile.gettempdir(), "senderqueue-sql-bench.md").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
