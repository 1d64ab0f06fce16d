"""What only the SQL backend promises: many processes, crashes, lost connections, namespaces, schema."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import sqlalchemy as sa
from senderqueue_sql import SCHEMA_VERSION, SQLBackend
from senderqueue_sql._backend import _Driver
from senderqueue_sql._schema import tables

import senderqueue as sq
from senderqueue.testing import ManualClock

SQL = [
    pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
    pytest.param("postgresql", marks=pytest.mark.postgresql, id="postgresql"),
]
CONTENT = b"Subject: hi\r\n\r\nHello.\r\n"
FAST_RETRY = sq.RetryPolicy(
    min_backoff=timedelta(milliseconds=1), max_backoff=timedelta(milliseconds=4), max_attempts=1000
)
START = datetime(2030, 1, 1, tzinfo=UTC)


def message(mailing: str, sender: str, n: int, message_id: str | None = None) -> sq.NewMessage:
    return sq.NewMessage(
        mailing=mailing,
        sender=sender,
        recipient=f"r{n}@example.com",
        content=CONTENT,
        mail_from="news@shop.example",
        message_id=message_id,
    )


def fill(queue: sq.SenderQueue, cells: list[tuple[str, str]], count: int) -> list[str]:
    ids = [f"{cells[n % len(cells)][0]}-{n}" for n in range(count)]
    for start in range(0, count, 1000):
        queue.enqueue_many(
            message(*cells[n % len(cells)], n, message_id=ids[n])
            for n in range(start, min(start + 1000, count))
        )
    return ids


@pytest.fixture
def url(backend_url: str) -> Iterator[str]:
    """A URL with a namespace of its own; the namespace is dropped afterwards."""
    separator = "&" if "?" in backend_url else "?"
    namespaced = f"{backend_url}{separator}namespace=t{uuid.uuid4().hex[:12]}"
    yield namespaced
    backend = sq.SenderQueue.open(namespaced).backend
    assert isinstance(backend, SQLBackend)
    backend.destroy()
    backend.close()


def spawn(target: Callable[..., None], *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


# -- work done in other processes (module level, so that spawn can import it) -------------


def drain_worker(url: str, sender: str, out: str, stop_when_empty: list[str]) -> None:
    """Claim and deliver until the mailings have nothing queued; write the ids delivered to ``out``."""
    queue = sq.SenderQueue.open(url, retry=FAST_RETRY)
    rnd = random.Random(out)
    delivered: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        claims = queue.claim(sender, rnd.randint(50, 150), lease=timedelta(minutes=10))
        if not claims:
            stopped = Path(out + ".stop").exists()
            if stopped and all(queue.metrics(m).total == 0 for m in stop_when_empty):
                break
            time.sleep(0.002)
            continue
        reports: list[tuple[sq.Claim, sq.Outcome]] = []
        for claim in claims:
            soft = rnd.random() < 0.05
            reports.append((claim, sq.SoftBounce(code=451, text="busy") if soft else sq.Delivered(code=250)))
        for (claim, outcome), lost in zip(reports, queue.report_many(reports), strict=True):
            assert lost is None, lost
            if isinstance(outcome, sq.Delivered):
                delivered.append(claim.message.id)
    Path(out).write_text("\n".join(delivered))
    queue.close()


def claim_and_hang(url: str, ready: str) -> None:
    """Claim 50 messages on a short lease, say so, then wait to be killed."""
    queue = sq.SenderQueue.open(url)
    claims = queue.claim("s1", 50, lease=timedelta(seconds=30))
    Path(ready).write_text(str(len(claims)))
    time.sleep(600)


# -- tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_url", SQL, indirect=True)
class TestSQLBackend:
    @pytest.mark.slow
    @pytest.mark.parametrize("operator", [False, True], ids=["plain", "freeze-unfreeze-clear"])
    def test_four_processes_drain_each_message_exactly_once(
        self, url: str, tmp_path: Path, operator: bool
    ) -> None:
        queue = sq.SenderQueue.open(url, retry=FAST_RETRY)
        cells = [("m1", "s1"), ("m2", "s1"), ("m1", "s2"), ("m2", "s2")]
        ids = fill(queue, cells, 20_000)
        outs = [str(tmp_path / f"worker{n}") for n in range(4)]
        if not operator:
            for out in outs:
                Path(out + ".stop").touch()
        workers = [spawn(drain_worker, url, f"s{n % 2 + 1}", out, ["m1", "m2"]) for n, out in enumerate(outs)]
        rnd = random.Random(7)
        if operator:
            for _ in range(200):
                mailing = rnd.choice(["m1", "m2"])
                sender = rnd.choice([None, "s1", "s2"])
                action = rnd.choices(["freeze", "unfreeze", "clear"], weights=[10, 10, 1])[0]
                getattr(queue, action)(mailing, sender)
                books = queue.metrics("m1") + queue.metrics("m2")
                assert books.delivered + books.deleted + books.total == len(ids), books
                assert books.failed == 0
                time.sleep(0.005)
            for mailing in ("m1", "m2"):
                queue.unfreeze(mailing)
            for out in outs:
                Path(out + ".stop").touch()
        for worker in workers:
            worker.join(300)
            assert worker.exitcode == 0
        delivered = [i for out in outs for i in Path(out).read_text().split("\n") if i]
        assert len(delivered) == len(set(delivered)), "a message was delivered twice"
        books = queue.metrics("m1") + queue.metrics("m2")
        assert books.total == 0
        assert books.delivered == len(delivered)
        assert books.delivered + books.deleted == len(ids)
        if not operator:
            assert sorted(delivered) == sorted(ids)
        for message_id in random.Random(1).sample(ids, 200):
            state = queue.get(message_id).state
            assert state is (sq.State.DELIVERED if message_id in set(delivered) else sq.State.DELETED)
        queue.close()

    @pytest.mark.slow
    def test_a_killed_workers_claims_are_retried_after_the_lease(self, url: str, tmp_path: Path) -> None:
        queue = sq.SenderQueue.open(url)
        ids = fill(queue, [("m1", "s1")], 80)
        ready = tmp_path / "ready"
        worker = spawn(claim_and_hang, url, str(ready))
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.read_text() == "50"
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        assert queue.metrics("m1") == sq.Metrics(new=30, sending=50)
        # A clock past the lease and the backoff stands in for waiting.
        clock = ManualClock(datetime.now(UTC) + timedelta(hours=1))
        later = sq.SenderQueue.open(url, clock=clock)
        assert later.expire_leases() == 50
        clock.advance(timedelta(hours=1))
        claims = later.claim("s1", 100)
        assert sorted(c.message.id for c in claims) == sorted(ids)
        assert sorted(c.message.attempts for c in claims) == [1] * 30 + [2] * 50
        assert not any(later.report_many([(c, sq.Delivered()) for c in claims]))
        assert later.metrics("m1") == sq.Metrics(delivered=80)
        later.close()
        queue.close()

    def test_namespaces_never_see_each_other(self, new_backend: Callable[[], sq.Backend]) -> None:
        one = sq.SenderQueue(new_backend(), clock=ManualClock(START))
        two = sq.SenderQueue(new_backend(), clock=ManualClock(START))
        one.enqueue_many([message("m1", "s1", 0, message_id="same")])
        assert two.metrics("m1") == sq.Metrics()
        with pytest.raises(sq.UnknownMessage):
            two.get("same")
        assert two.claim("s1", 10) == []
        two.enqueue_many([message("m1", "s1", 1, message_id="same")])
        two.freeze("m1")
        assert one.metrics("m1") == sq.Metrics(new=1)
        assert two.metrics("m1") == sq.Metrics(frozen=1)
        assert one.get("same").recipient == "r0@example.com"

    def test_open_finds_the_backend_and_an_engine_makes_one_too(self, url: str) -> None:
        queue = sq.SenderQueue.open(url)
        assert isinstance(queue.backend, SQLBackend)
        queue.enqueue_many([message("m1", "s1", 0, message_id="x")])
        engine = sa.create_engine(queue.backend.engine.url)
        typed = sq.SenderQueue(SQLBackend(engine, namespace=queue.backend.namespace))
        assert typed.get("x").state is sq.State.NEW
        typed.close()
        engine.dispose()
        queue.close()

    def test_a_callers_engine_gets_its_connection_back_as_it_lent_it(self, url: str) -> None:
        """Claims, reports and metrics run on the engine's pooled connection in autocommit; what
        they did is committed, and the connection returns to the pool in a transaction again."""
        namespace = url.rpartition("namespace=")[2]
        sa_url = sq.SenderQueue.open(url).backend.engine.url  # type: ignore[attr-defined]
        engine = sa.create_engine(sa_url, pool_size=1, max_overflow=0)  # one connection, lent each time
        queue = sq.SenderQueue(SQLBackend(engine, namespace=namespace))
        queue.enqueue_many([message("m1", "s1", n) for n in range(3)])
        claims = queue.claim("s1", 3)
        assert queue.report_many([(claims[0], sq.Delivered())]) == [None]
        assert queue.metrics("m1") == sq.Metrics(sending=2, delivered=1)
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            if engine.dialect.name == "postgresql":
                assert raw.autocommit is False
                conn.execute(sa.text("CREATE TEMPORARY TABLE lent (n int)"))
                conn.rollback()  # the caller's transaction, rolled back: nothing of it stays
                assert conn.execute(sa.text("SELECT to_regclass('pg_temp.lent')")).scalar() is None
        elsewhere = sq.SenderQueue.open(url)  # another engine sees what the lent connection committed
        assert elsewhere.metrics("m1") == sq.Metrics(sending=2, delivered=1)
        assert elsewhere.get(claims[0].message.id).state is sq.State.DELIVERED
        elsewhere.close()
        queue.close()
        engine.dispose()

    def test_a_bad_namespace_or_url_is_rejected(self, backend_url: str) -> None:
        with pytest.raises(sq.InvalidArgument):
            sq.SenderQueue.open(f"{backend_url}?namespace=Robert'); DROP TABLE")
        with pytest.raises(sq.InvalidArgument):
            sq.SenderQueue.open("sqlite://")

    def test_an_older_schema_is_migrated_and_a_newer_one_refused(self, backend_url: str) -> None:
        namespace = f"t{uuid.uuid4().hex[:12]}"
        t = tables(namespace)
        url = f"{backend_url}?namespace={namespace}"
        engine = sa.create_engine(url.split("?")[0].replace("postgresql://", "postgresql+psycopg://"))
        queue = sq.SenderQueue(SQLBackend(engine, namespace=namespace))
        queue.enqueue_many([message("m1", "s1", 0, message_id="old")])
        m, ct = t.messages.name, t.contents.name
        blob = sa.LargeBinary().compile(dialect=engine.dialect)
        pg = engine.dialect.name == "postgresql"
        c, deltas = t.counts.name, f"{t.prefix}deltas"
        columns = "new, retries, sending, delivered, failed, deleted"
        # Back to the shape version 1 left: no terminal index, content in the message row, seq
        # the primary key, one counts row per sender queue and, on PostgreSQL, deltas beside it
        # (here the queue's one new message is a delta, not yet folded in) and the envelope in
        # the message row.
        with engine.begin() as conn:
            if pg:
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {m} ADD COLUMN id varchar(255), ADD COLUMN recipient varchar(254), "
                        "ADD COLUMN mail_from varchar(254), ADD COLUMN created_at bigint"
                    )
                )
                conn.execute(
                    sa.text(
                        f"UPDATE {m} SET id = e.id, recipient = e.recipient, mail_from = e.mail_from, "
                        f"created_at = e.created_at FROM {ct} e WHERE e.seq = {m}.seq"
                    )
                )
                primary = f"ADD CONSTRAINT {m}_pkey PRIMARY KEY (id)"
                conn.execute(sa.text(f"ALTER TABLE {m} DROP CONSTRAINT {m}_pkey, {primary}"))
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {ct} DROP COLUMN id, DROP COLUMN recipient, DROP COLUMN mail_from, "
                        "DROP COLUMN created_at"
                    )
                )
            conn.execute(sa.text(f"ALTER TABLE {c} RENAME TO {c}_now"))
            if pg:
                conn.execute(sa.text(f"ALTER INDEX {c}_pkey RENAME TO {c}_now_pkey"))
            big = "BIGINT NOT NULL"
            conn.execute(
                sa.text(
                    f"CREATE TABLE {c} (queue_id INTEGER PRIMARY KEY, new {big}, retries {big}, "
                    f"sending {big}, delivered {big}, failed {big}, deleted {big})"
                )
            )
            conn.execute(sa.text(f"INSERT INTO {c} SELECT queue_id, {columns} FROM {c}_now"))
            conn.execute(sa.text(f"DROP TABLE {c}_now"))
            if pg:
                conn.execute(
                    sa.text(
                        f"CREATE TABLE {deltas} (id BIGSERIAL PRIMARY KEY, queue_id INTEGER NOT NULL, "
                        f"new {big}, retries {big}, sending {big}, "
                        f"delivered {big}, failed {big}, deleted {big})"
                    )
                )
                conn.execute(sa.text(f"UPDATE {c} SET new = new - 1"))
                conn.execute(
                    sa.text(
                        f"INSERT INTO {deltas} ({columns}, queue_id) "
                        f"SELECT 1, 0, 0, 0, 0, 0, queue_id FROM {c}"
                    )
                )
            if pg:
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {m} DROP CONSTRAINT {m}_pkey, ADD PRIMARY KEY (seq), ADD UNIQUE (id)"
                    )
                )
            conn.execute(sa.text(f"DROP INDEX {t.terminal_index}"))
            conn.execute(sa.text(f"ALTER TABLE {m} ADD COLUMN content {blob}"))
            copy = f"UPDATE {m} SET content = (SELECT content FROM {ct} WHERE {ct}.seq = {m}.seq)"
            conn.execute(sa.text(copy))
            conn.execute(sa.text(f"DROP TABLE {ct}"))
            conn.execute(t.meta.update().values(value="1"))
        from senderqueue_sql import _backend

        _backend._READY.clear()  # as a fresh process would
        backend = SQLBackend(engine, namespace=namespace)
        assert backend.schema_version() == SCHEMA_VERSION == 6
        inspector = sa.inspect(engine)
        assert t.terminal_index in {i["name"] for i in inspector.get_indexes(m)}
        assert "content" not in {column["name"] for column in inspector.get_columns(m)}
        assert inspector.get_pk_constraint(m)["constrained_columns"] == ["seq"]
        assert inspector.get_pk_constraint(c)["constrained_columns"] == ["queue_id", "slot"]
        assert not inspector.has_table(deltas)
        if pg:  # the envelope and the id's unique index are beside the content, the message row narrow
            assert not inspector.get_unique_constraints(m)
            assert not {"id", "recipient", "mail_from", "created_at"} & {
                column["name"] for column in inspector.get_columns(m)
            }
            assert [u["column_names"] for u in inspector.get_unique_constraints(ct)] == [["id"]]
        assert backend.get("old").content == CONTENT
        queue = sq.SenderQueue(backend)
        assert queue.metrics("m1") == sq.Metrics(new=1)
        (claim,) = queue.claim("s1", 1)
        with pytest.raises(sq.DuplicateMessage):
            queue.enqueue_many([message("m1", "s1", 1, message_id="old")])
        assert queue.report_many([(claim, sq.Delivered())]) == [None]
        assert queue.metrics("m1") == sq.Metrics(delivered=1)
        with engine.begin() as conn:
            conn.execute(t.meta.update().values(value=str(SCHEMA_VERSION + 1)))
        _backend._READY.clear()
        with pytest.raises(sq.BackendError, match="schema version 7"):
            SQLBackend(engine, namespace=namespace)
        backend.destroy()
        engine.dispose()

    def test_history_stays_out_of_the_claim_index_and_purge_removes_it(self, url: str) -> None:
        clock = ManualClock(START)
        queue = sq.SenderQueue.open(url, clock=clock)
        fill(queue, [("m1", "s1")], 500)
        while claims := queue.claim("s1", 100):
            queue.report_many([(c, sq.Delivered()) for c in claims])
        (fresh,) = queue.enqueue_many([message("m1", "s1", 9)])
        backend = queue.backend
        assert isinstance(backend, SQLBackend)
        t = tables(backend.namespace)
        ready = sa.text("state IN (1, 2)")
        with backend.engine.connect() as conn:
            # The claim index holds only queued messages: the 500 delivered ones are not in it.
            counted = sa.select(sa.func.count()).select_from(t.messages).where(ready)
            assert conn.execute(counted).scalar() == 1
            explain = "EXPLAIN QUERY PLAN " if backend.engine.dialect.name == "sqlite" else "EXPLAIN "
            claim_pick = (
                f"SELECT seq FROM {t.messages.name} WHERE queue_id = 1 AND epoch = 0 "
                "AND state IN (1, 2) AND due <= 0 ORDER BY due, seq LIMIT 100"
            )
            if backend.engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table would be scanned anyway
            plan = " ".join(str(row) for row in conn.exec_driver_sql(explain + claim_pick))
            assert f"{t.prefix}messages_ready" in plan
        clock.advance(timedelta(days=1))
        assert queue.purge(timedelta(hours=1)) == 500
        assert queue.metrics("m1") == sq.Metrics(new=1)
        with backend.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(t.messages)).scalar() == 1
        assert queue.claim("s1")[0].message.id == fresh
        queue.close()

    def test_a_report_finds_its_row_where_the_claim_left_it_or_by_id(self, url: str) -> None:
        """On PostgreSQL a token says where the claim left the row; a row moved since (a renewal)
        is found by its id, a place that names another row or none changes nothing, and a token
        of another shape or spelling (a leading zero) is a lost lease."""
        queue = sq.SenderQueue.open(url, clock=ManualClock(START))
        pg = url.startswith("postgresql")
        try:
            fill(queue, [("m1", "s1")], 7)
            claims = queue.claim("s1", 7)
            assert all(("@" in c.token) is pg for c in claims)
            renewed = queue.renew(claims[0])  # the row moves (a new row version on PostgreSQL)
            number = [c.token.partition("@")[0] for c in claims]
            elsewhere = attrs.evolve(claims[1], token=f"{number[1]}@0.1")  # another row's place
            nowhere = attrs.evolve(claims[2], token=f"{number[2]}@4294967295.65535")
            too_far = attrs.evolve(claims[3], token=f"{number[3]}@4294967296.1")
            no_place = attrs.evolve(claims[4], token=number[4])
            garbled = attrs.evolve(claims[5], token=f"{number[5]}@\u0663.1")  # an Arabic-Indic 3
            _, at, place = claims[6].token.partition("@")
            padded = attrs.evolve(claims[6], token=f"{number[6]}@0{place}" if at else f"{number[6]}@00.1")
            reported = (renewed, elsewhere, nowhere, too_far, no_place, garbled, padded)
            results = queue.report_many([(c, sq.Delivered()) for c in reported])
            lost = [type(r) is sq.LeaseLost for r in results]
            assert lost == [False, False, False, True, False, True, True]
            assert queue.metrics("m1") == sq.Metrics(sending=3, delivered=4)
            assert queue.report_many([(claims[n], sq.Delivered()) for n in (3, 5, 6)]) == [None] * 3
        finally:
            queue.close()

    def test_a_claim_says_what_it_did_when_settling_expired_leases_fails(self, url: str) -> None:
        """On PostgreSQL the claim commits first and the expired leases are settled after it: if
        that fails, the claims made are returned and the leases wait for the next claim. On
        SQLite both are one transaction: the claim fails whole, and nothing changes."""
        clock = ManualClock(START)
        queue = sq.SenderQueue.open(url, clock=clock)
        try:
            fill(queue, [("m1", "s1")], 2)
            (held,) = queue.claim("s1", 1, lease=timedelta(seconds=1))
            clock.advance(timedelta(seconds=2))
            backend = queue.backend
            assert isinstance(backend, SQLBackend)
            expired_of_sender = backend._sql.expired_of_sender
            backend._sql.expired_of_sender = sa.text("SELECT * FROM no_such_table")  # settling fails
            try:
                if url.startswith("postgresql"):
                    (made,) = queue.claim("s1", 5)
                    assert made.message.id != held.message.id
                    assert queue.metrics("m1") == sq.Metrics(sending=2)
                else:
                    with pytest.raises(sq.BackendError):
                        queue.claim("s1", 5)
                    assert queue.metrics("m1") == sq.Metrics(new=1, sending=1)
            finally:
                backend._sql.expired_of_sender = expired_of_sender
            assert queue.expire_leases() == 1
            assert queue.get(held.message.id).state is sq.State.RETRIES
        finally:
            queue.close()

    def test_an_unreachable_database_is_a_backend_error(self, backend_url: str, tmp_path: Path) -> None:
        if backend_url.startswith("sqlite"):
            bad = f"sqlite:///{tmp_path}/no/such/dir/queue.db"
        else:
            bad = "postgresql://postgres@127.0.0.1:1/test"
        with pytest.raises(sq.BackendError):
            sq.SenderQueue.open(bad)


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
def test_writers_never_wait_on_each_others_counts(url: str) -> None:
    """PostgreSQL: while another transaction holds a sender queue's counts rows, every change
    counts in a row of its own instead of waiting, and the sums stay exact."""
    queue = sq.SenderQueue.open(url, clock=ManualClock(START))
    backend = queue.backend
    assert isinstance(backend, SQLBackend)
    counts = backend._t.counts.name

    def rows() -> int:
        with backend.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {counts}")).scalar_one())

    fill(queue, [("m1", "s1"), ("m1", "s2")], 10)
    assert rows() == 2  # one per sender queue
    done = threading.Event()

    def changes() -> None:
        queue.enqueue_many([message("m1", "s1", 10, "late-1"), message("m1", "s2", 11, "late-2")])
        claims = queue.claim("s1", 3)
        queue.report_many([(claims[0], sq.Delivered()), (claims[1], sq.SoftBounce(code=451, text="busy"))])
        assert queue.freeze("m1") == 10
        assert queue.clear("m1", "s2") == 6
        done.set()

    holder = psycopg.connect(str(backend.engine.url.set(drivername="postgresql")))
    try:
        holder.execute(f"SELECT * FROM {counts} FOR UPDATE")  # held until the rollback below
        worker = threading.Thread(target=changes)
        worker.start()
        worker.join(timeout=60)
        assert done.is_set(), "a change waited for the transaction that holds the counts rows"
    finally:
        holder.rollback()
        holder.close()
    assert queue.metrics("m1") == sq.Metrics(frozen=4, sending=1, delivered=1, deleted=6)
    assert rows() == 4  # each sender queue got a second row
    assert queue.unfreeze("m1") == 4
    (claim,) = queue.claim("s1", 1)
    assert queue.report_many([(claim, sq.Delivered())]) == [None]
    assert queue.metrics("m1") == sq.Metrics(new=2, retries=1, sending=1, delivered=2, deleted=6)
    assert rows() == 4  # nothing held: the first row again
    queue.close()


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
def test_a_claim_leaves_the_senders_queues_without_work_alone(url: str) -> None:
    """PostgreSQL: a claim locks only the sender's queues that have a message due, so a
    transaction holding the queue of a drained mailing does not hold the sender's claims up."""
    queue = sq.SenderQueue.open(url, clock=ManualClock(START))
    backend = queue.backend
    assert isinstance(backend, SQLBackend)
    fill(queue, [("old", "s1")], 1)
    (claim,) = queue.claim("s1", 1)
    assert queue.report_many([(claim, sq.Delivered())]) == [None]
    fill(queue, [("new", "s1")], 3)
    claimed: list[sq.Claim] = []
    holder = psycopg.connect(str(backend.engine.url.set(drivername="postgresql")))
    try:
        q = backend._t.queues.name
        holder.execute(f"SELECT * FROM {q} WHERE mailing = 'old' FOR UPDATE")  # as a clear would
        worker = threading.Thread(target=lambda: claimed.extend(queue.claim("s1", 5)))
        worker.start()
        worker.join(timeout=60)
        assert len(claimed) == 3, "the claim waited for the drained mailing's queue"
    finally:
        holder.rollback()
        holder.close()
    assert queue.metrics("new") == sq.Metrics(sending=3)
    queue.close()


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
def test_a_report_that_meets_a_renewal_of_its_claim_settles_it(url: str) -> None:
    """PostgreSQL: a renewal moves the message row; a report whose statement found the row before
    the renewal committed still settles the claim (it used to answer LeaseLost, leaving the message
    SENDING until its lease ran out, to be sent again)."""
    queue = sq.SenderQueue.open(url, clock=ManualClock(START))
    backend = queue.backend
    assert isinstance(backend, SQLBackend)
    fill(queue, [("m1", "s1")], 2)
    claims = queue.claim("s1", 2)
    holder = psycopg.connect(str(backend.engine.url.set(drivername="postgresql")))
    reported: list[list[sq.LeaseLost | None]] = []
    try:
        token = int(claims[0].token.partition("@")[0])
        # What renew() does, held uncommitted while the report's statement starts.
        holder.execute(
            f"UPDATE {backend._t.messages.name} SET expires_at = expires_at + 1 WHERE token = %s", (token,)
        )
        worker = threading.Thread(
            target=lambda: reported.append(queue.report_many([(c, sq.Delivered()) for c in claims]))
        )
        worker.start()
        time.sleep(0.5)
    finally:
        holder.commit()
        holder.close()
    worker.join(timeout=60)
    assert reported == [[None, None]]
    assert queue.metrics("m1") == sq.Metrics(delivered=2)
    with pytest.raises(sq.LeaseLost):
        queue.deliver(claims[0])
    queue.close()


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
def test_expiring_leases_leaves_a_lease_renewed_since_it_was_read(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: expire_leases reads the expired leases, then settles them; a renewal committed
    in between holds (it used to be undone, and the renewed claim lost)."""
    clock = ManualClock(START)
    queue = sq.SenderQueue.open(url, clock=clock)
    fill(queue, [("m1", "s1")], 1)
    (claim,) = queue.claim("s1", 1, lease=timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))
    renewed: list[sq.Claim] = []
    settle = SQLBackend._settle

    def renew_first(self: SQLBackend, *args: Any) -> Any:
        if not renewed:  # from another connection, committed before the settle runs
            lease = timedelta(minutes=10)
            worker = threading.Thread(target=lambda: renewed.append(queue.renew(claim, lease)))
            worker.start()
            worker.join(timeout=60)
        return settle(self, *args)

    monkeypatch.setattr(SQLBackend, "_settle", renew_first)
    assert queue.expire_leases() == 0
    monkeypatch.undo()
    assert queue.metrics("m1") == sq.Metrics(sending=1)
    queue.deliver(renewed[0])
    assert queue.get(claim.message.id).state is sq.State.DELIVERED
    queue.close()


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
def test_reads_keep_a_connection_that_outlives_a_restart_and_a_fork(url: str) -> None:
    """PostgreSQL: reads run on a connection the engine keeps. One whose server process is gone
    is replaced without an error; a forked child opens its own and leaves its parent's alone."""
    queue = sq.SenderQueue.open(url)
    backend = queue.backend
    assert isinstance(backend, SQLBackend)
    assert backend._kept is not None
    kept = backend._kept

    def server_pid() -> int:
        return kept.run(lambda raw: int(raw.info.backend_pid), lambda: -1)

    fill(queue, [("m1", "s1")], 3)
    assert queue.metrics("m1") == sq.Metrics(new=3)
    first = server_pid()
    with psycopg.connect(str(backend.engine.url.set(drivername="postgresql")), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (first,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert queue.metrics("m1") == sq.Metrics(new=3)  # on a new connection, without an error
    second = server_pid()
    assert second != first
    with (
        warnings.catch_warnings()
    ):  # Python 3.12+ warns that the test runner has threads: the child uses none
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover (the child's result is its exit status)
        status = 1
        try:
            status = 0 if queue.metrics("m1") == sq.Metrics(new=3) and server_pid() not in (-1, second) else 1
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child read on its parent's connection or failed"
    assert server_pid() == second  # the parent's connection is alive and still its own
    assert queue.metrics("m1") == sq.Metrics(new=3)
    queue.close()


@pytest.mark.parametrize("backend_url", [SQL[1]], indirect=True)
class TestLostConnection:
    """``pg_terminate_backend`` mid-operation: a ``BackendError``, and no partial effect."""

    @pytest.fixture
    def queue(self, url: str) -> Iterator[sq.SenderQueue]:
        queue = sq.SenderQueue.open(url, clock=ManualClock(START))
        yield queue
        queue.close()

    @staticmethod
    def kill_at(queue: sq.SenderQueue, marker: str, when: str = "after") -> Callable[[], None]:
        """Terminate the connection ``when`` ("before" or "after") it runs a statement containing ``marker``.

        A one-statement operation (claim, report_many on PostgreSQL) is its own transaction:
        it is cut before it runs. The others are cut after one of their statements.
        """
        backend = queue.backend
        assert isinstance(backend, SQLBackend)
        armed = [True]

        def kill(connection: Any, statement: str) -> None:
            if armed[0] and marker in statement and f"sq_{backend.namespace}_" in statement:
                armed[0] = False
                pid = connection.info.backend_pid
                with psycopg.connect(
                    str(backend.engine.url.set(drivername="postgresql")), autocommit=True
                ) as k:
                    k.execute("SELECT pg_terminate_backend(%s)", (pid,))

        def after(conn: sa.Connection, cursor: Any, statement: str, *_: object) -> None:
            kill(cursor.connection, statement)

        # Claims and reports run on the driver, below SQLAlchemy's events.
        rows = _Driver.rows

        def driver_rows(self: _Driver, statement: sa.TextClause, params: dict[str, Any]) -> list[Any]:
            if when == "before":
                kill(self.raw, self.sql(statement))
            result = rows(self, statement, params)
            if when == "after":
                kill(self.raw, self.sql(statement))
            return result

        event = f"{when}_cursor_execute"
        # On every engine: the backend keeps a second pool, in autocommit, for one-statement work.
        sa.event.listen(sa.Engine, event, after)
        _Driver.rows = driver_rows  # type: ignore[method-assign]

        def undo() -> None:
            sa.event.remove(sa.Engine, event, after)
            _Driver.rows = rows  # type: ignore[method-assign]

        return undo

    def test_enqueue(self, queue: sq.SenderQueue) -> None:
        undo = self.kill_at(queue, "INSERT INTO sq_")
        try:
            with pytest.raises(sq.BackendError):
                queue.enqueue_many([message("m1", "s1", n, message_id=f"id{n}") for n in range(10)])
        finally:
            undo()
        assert queue.metrics("m1") == sq.Metrics()
        with pytest.raises(sq.UnknownMessage):
            queue.get("id0")
        assert queue.enqueue_many([message("m1", "s1", 0, message_id="id0")]) == ["id0"]

    def test_claim_and_report(self, queue: sq.SenderQueue) -> None:
        ids = fill(queue, [("m1", "s1")], 5)
        undo = self.kill_at(queue, "FOR UPDATE SKIP LOCKED", "before")
        try:
            with pytest.raises(sq.BackendError):
                queue.claim("s1", 5)
        finally:
            undo()
        assert queue.metrics("m1") == sq.Metrics(new=5)
        assert [queue.get(i).attempts for i in ids] == [0] * 5
        claims = queue.claim("s1", 5)
        undo = self.kill_at(queue, "token = NULL", "before")  # the settle statement
        try:
            with pytest.raises(sq.BackendError):
                queue.report_many([(c, sq.Delivered()) for c in claims])
        finally:
            undo()
        assert queue.metrics("m1") == sq.Metrics(sending=5)
        assert not any(queue.report_many([(c, sq.Delivered()) for c in claims]))
        assert queue.metrics("m1") == sq.Metrics(delivered=5)

    def test_clear(self, queue: sq.SenderQueue) -> None:
        fill(queue, [("m1", "s1"), ("m1", "s2")], 6)
        undo = self.kill_at(queue, "INSERT INTO sq_")  # the clears row, after the epoch moved on
        try:
            with pytest.raises(sq.BackendError):
                queue.clear("m1")
        finally:
            undo()
        assert queue.metrics("m1") == sq.Metrics(new=6)
        assert queue.clear("m1") == 6
