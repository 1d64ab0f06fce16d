"""``SQLBackend``: sender queues in SQLite or PostgreSQL, through SQLAlchemy 2 Core.

Like the memory backend, freeze and clear never touch messages: each sender queue
row has a ``frozen`` flag and a clear ``epoch``, and a message's effective state is
derived from them in queries and in :meth:`SQLBackend.get`. Every operation is one
transaction (on PostgreSQL a claim or report is one statement, run in autocommit; a
claim that finds expired leases of its sender settles them in a second one).
Every change that moves a message takes a share lock on its sender queue rows (in
id order), and freeze and clear take an exclusive one, so a freeze or clear sees
no claim or report half done and its counts are exact.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import re
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from senderqueue import (
    BackendError,
    Claim,
    DuplicateMessage,
    InvalidArgument,
    LeaseLost,
    Message,
    Metrics,
    NewMessage,
    RetryPolicy,
    Settlement,
    State,
    Trigger,
    UnknownMessage,
    leave_sending,
)

from . import _engines
from ._schema import (
    COUNTS,
    DELETED,
    DELIVERED,
    FAILED,
    MIGRATIONS,
    NEW,
    RETRIES,
    SCHEMA_VERSION,
    SENDING,
    Tables,
    check_namespace,
    tables,
)

__all__ = ["SQLBackend", "from_url"]

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_STATES = {NEW: State.NEW, RETRIES: State.RETRIES, SENDING: State.SENDING}
_STATES |= {DELIVERED: State.DELIVERED, FAILED: State.FAILED, DELETED: State.DELETED}
_CODES = {state: code for code, state in _STATES.items()}
_COUNTER = {NEW: "new", RETRIES: "retries", DELIVERED: "delivered", FAILED: "failed", DELETED: "deleted"}
_RETRYABLE = {"40P01", "40001"}  # deadlock detected, serialization failure: nothing was done; go again
_BATCH = 1000  # rows per settle statement: SQLite allows 32,766 bound values in one


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _time(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _destinations() -> dict[tuple[Trigger, bool], tuple[int, int, int]]:
    """Where each report takes a message, from the core's precedence (``leave_sending``).

    Keyed by (trigger, exhausted), the stored state if it was claimed from NEW, if claimed
    from RETRIES, and if its queue was cleared since. FROZEN is stored as the state it
    remembers: whether it shows as FROZEN is the queue's flag, read when the message is.
    """
    table = {}
    for trigger in (
        Trigger.DELIVER,
        Trigger.SOFT_BOUNCE,
        Trigger.HARD_BOUNCE,
        Trigger.RELEASE,
        Trigger.EXPIRE,
    ):
        for exhausted in (False, True):
            stored = []
            for claimed_from, cleared in ((State.NEW, False), (State.RETRIES, False), (State.NEW, True)):
                codes = set()
                for frozen in (False, True):
                    state, frozen_from = leave_sending(
                        trigger,
                        claimed_from=claimed_from,
                        cleared=cleared,
                        exhausted=exhausted,
                        frozen=frozen,
                    )
                    codes.add(_CODES[frozen_from or state])
                (code,) = codes  # freezing never changes what is stored, only what it shows as
                stored.append(code)
            table[trigger, exhausted] = (stored[0], stored[1], stored[2])
    return table


_DESTINATIONS = _destinations()
_SOFT_BOUNCE, _EXPIRE, _RELEASE = Trigger.SOFT_BOUNCE, Trigger.EXPIRE, Trigger.RELEASE


class _Leave:
    """One claim to take out of SENDING, with the next attempt time worked out in Python."""

    __slots__ = ("attempts", "created_at", "error", "id", "next_at", "place", "token", "trigger")

    def __init__(
        self,
        id: str,
        token: int,
        attempts: int,
        created_at: datetime,
        trigger: Trigger,
        error: str | None,
        place: str | None = None,
    ) -> None:
        self.id = id
        self.token = token
        self.place = place  # where the claim left the row (PostgreSQL's ctid), if known
        self.attempts = attempts
        self.created_at = created_at
        self.trigger = trigger
        self.error = error
        self.next_at: int | None = None

    def row(self, now: datetime, retry: RetryPolicy, micros: dict[datetime, int]) -> tuple[Any, ...]:
        """The statement's row for this claim; ``micros`` caches times already converted."""
        trigger = self.trigger
        exhausted = False
        if trigger is _SOFT_BOUNCE or trigger is _EXPIRE:
            next_at = retry.next_attempt(self.attempts, self.created_at, now, self.id)
            exhausted = next_at is None
            self.next_at = None if next_at is None else _us(next_at)
        dn, dr, dc = _DESTINATIONS[trigger, exhausted]
        created_at = micros.get(self.created_at)
        if created_at is None:
            created_at = micros[self.created_at] = _us(self.created_at)
        released = 1 if trigger is _RELEASE else 0
        lapsed = 1 if trigger is _EXPIRE else 0
        return (
            self.id,
            self.token,
            self.attempts,
            created_at,
            dn,
            dr,
            dc,
            self.next_at,
            self.error,
            released,
            self.place,
            lapsed,
        )


# A claim's token: the row's token and, on PostgreSQL, where the claim left the row
# ("@block.offset", its ctid), so that a report finds the row without an index.
# Numbers as the database spells them, without leading zeros: a token has one spelling only.
_TOKEN = re.compile(r"(0|[1-9]\d{0,18})(?:@(0|[1-9]\d{0,9})\.([1-9]\d{0,4}))?", re.ASCII)


def _token(claim: Claim) -> tuple[int, str | None] | None:
    """(token, ctid or None) of a claim this backend made; None for any other token."""
    found = _TOKEN.fullmatch(claim.token)
    if found is None:
        return None
    token, block, offset = found.groups()
    number = int(token)
    if number >= 2**63:
        return None
    if block is None:
        return number, None
    # Only a block of 10 digits or an offset of 5 can be out of a ctid's range.
    if (len(block) == 10 and int(block) >= 2**32) or (len(offset) == 5 and int(offset) >= 2**16):
        return None
    return number, f"({block},{offset})"


_log = logging.getLogger("senderqueue.sql")
_DUE_SEQ = operator.itemgetter(7, 0)  # a claim's rows go out in (due, seq) order


class SQLBackend:
    """Sender queues in one namespace of a SQLite or PostgreSQL database.

    ``SenderQueue.open("sqlite:///queue.db")`` and ``open("postgresql://…")`` make one
    through :func:`from_url`; ``SQLBackend(engine, namespace="tenant1")`` takes an
    SQLAlchemy engine of your own (``sqlite+pysqlite`` or ``postgresql+psycopg``).
    The namespace's tables are created, or migrated, on first use.

    Args:
        engine: the database. A SQLite engine gets WAL and ``BEGIN IMMEDIATE`` writes.
        namespace: 1 to 40 of ``a-z 0-9 _``; namespaces of one database never see each other.
    """

    def __init__(self, engine: Engine, *, namespace: str = "main") -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise InvalidArgument(f"the SQL backend runs on SQLite or PostgreSQL, not {engine.dialect.name}")
        try:
            check_namespace(namespace)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        _engines.prepare(engine)
        self._writer = _engines.writer_lock(engine)
        self.engine = engine
        self.namespace = namespace
        self._pg = engine.dialect.name == "postgresql"
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        # Every read, and on PostgreSQL every one-statement change, runs in autocommit: that
        # saves the BEGIN and COMMIT round trips.
        if engine.dialect.name == "postgresql":
            self._reader = self._autocommit = _engines.autocommit(engine)
        else:
            self._reader = self._autocommit = engine.execution_options(**{_engines.READ: True})
        self._kept = _engines.kept(engine)  # PostgreSQL, an engine made from a URL: reads skip the pool
        self._t = tables(namespace)
        self._sql = _Statements(self._t, engine.dialect)
        self._shared = False
        self._closed = False
        self._names: dict[int, tuple[str, str]] = {}  # sender queue id -> (mailing, sender); never change
        self._ensure_schema()

    @classmethod
    def from_url(cls, url: str) -> SQLBackend:
        """The factory behind ``sqlite://`` and ``postgresql://``; engines are shared within a process."""
        sa_url, namespace, options = _engines.parse_url(url)
        try:
            check_namespace(namespace)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        engine = _engines.acquire(sa_url, options)
        try:
            backend = cls(engine, namespace=namespace)
        except BaseException:
            _engines.release(engine)
            raise
        backend._shared = True
        return backend

    # -- plumbing -------------------------------------------------------------------

    def _run(
        self,
        work: Callable[[Connection], T],
        *,
        read: bool = False,
        single: bool = False,
    ) -> T:
        """Run ``work`` in one transaction; driver errors become ``BackendError``.

        ``single``: the work is one statement, a transaction of its own; on PostgreSQL it runs
        in autocommit, which saves the BEGIN and COMMIT round trips.
        """
        return self._attempt(lambda: self._once(work, read, single))

    def _hot(self, work: Callable[[_Driver], T], *, single: bool = False) -> T:
        """Run ``work`` on the driver's own connection in one transaction (claims and reports).

        The transaction is begun and ended on the driver as well; errors as in :meth:`_run`.
        """
        return self._attempt(lambda: self._once_hot(work, single))

    def _once(self, work: Callable[[Connection], T], read: bool, single: bool) -> T:
        lock = None if read else self._writer
        if read or (single and self._pg):
            with (self._reader if read else self._autocommit).connect() as conn:
                return work(conn)
        if lock is None:
            with self.engine.begin() as conn:
                return work(conn)
        with lock, self.engine.begin() as conn:
            return work(conn)

    def _once_hot(self, work: Callable[[_Driver], T], single: bool) -> T:
        if self._pg and not single:
            return self._once(lambda conn: work(self._driver(conn)), False, False)
        engine = self._autocommit if self._pg else self.engine
        with self._writer or contextlib.nullcontext(), self._pooled(engine) as driver:
            if self._pg:
                return work(driver)  # one statement in autocommit
            driver.raw.execute("BEGIN IMMEDIATE")
            try:
                result = work(driver)
                driver.raw.execute("COMMIT")
                return result
            except self._errors as error:
                lost = engine.dialect.is_disconnect(cast(Any, error), driver.raw, None)
                if not lost and driver.raw.in_transaction:
                    driver.raw.execute("ROLLBACK")
                raise
            except BaseException:
                if driver.raw.in_transaction:
                    driver.raw.execute("ROLLBACK")
                raise

    def _read(self, work: Callable[[_Driver], T]) -> T:
        """Run a one-statement read on the driver, outside a transaction; errors as in :meth:`_run`."""

        def pooled() -> T:
            with self._pooled(self._reader) as driver:
                return work(driver)

        if self._kept is None:
            return self._attempt(pooled)
        sql = self._sql.driver_sql
        kept = self._kept
        return self._attempt(lambda: kept.run(lambda raw: work(_Driver(raw, sql, True)), pooled))

    @contextlib.contextmanager
    def _pooled(self, engine: Engine) -> Iterator[_Driver]:
        """A pooled connection as a driver, without a SQLAlchemy ``Connection`` around it.

        That wrapper costs about 0.14 ms a call on PostgreSQL, on the hot paths and the metrics.
        On PostgreSQL the connection runs in autocommit (every caller runs one statement), and
        goes back to the pool as it came. A connection that failed by disconnecting is dropped,
        never handed out again.
        """
        proxied = engine.raw_connection()
        raw: Any = proxied.driver_connection
        lent = False  # a caller's engine: its connections are in transactions until one is lent
        try:
            if self._pg and not raw.autocommit:
                raw.autocommit = True
                lent = True
            yield _Driver(raw, self._sql.driver_sql, self._pg)
        except self._errors as error:
            if engine.dialect.is_disconnect(cast(Any, error), raw, None):
                proxied.invalidate()
            raise
        finally:
            if lent and proxied.is_valid:
                try:
                    raw.autocommit = False
                except self._errors:  # interrupted in the middle of a statement: not fit to lend again
                    proxied.invalidate()
            proxied.close()  # back to the pool

    def _driver(self, conn: Connection) -> _Driver:
        return _Driver(conn.connection.driver_connection, self._sql.driver_sql, self._pg)

    def _attempt(self, once: Callable[[], T]) -> T:
        for attempt in range(8):
            try:
                result = once()
            except self._errors as error:  # from the hot path, which bypasses SQLAlchemy
                if getattr(error, "sqlstate", None) in _RETRYABLE and attempt < 7:
                    continue
                raise BackendError(f"the database failed: {error}") from error
            except exc.IntegrityError:
                raise BackendError("the database refused the change") from None
            except exc.DBAPIError as error:
                code = getattr(error.orig, "sqlstate", None)
                if code in _RETRYABLE and attempt < 7:
                    continue
                raise BackendError(f"the database failed: {error.orig}") from error
            except exc.SQLAlchemyError as error:
                raise BackendError(f"the database failed: {error}") from error
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_schema(self) -> None:
        key = (self.engine.url.render_as_string(hide_password=False), self.namespace)
        if key in _READY:
            return

        def work(conn: Connection) -> None:
            t = self._t
            if self._pg:
                # Two processes opening a new namespace at once: one creates, the other waits and sees it.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": t.prefix})
            version = 0
            if sa.inspect(conn).has_table(t.meta.name):
                found = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == "schema_version"))
                version = int(found.scalar_one())
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"namespace {self.namespace!r} has schema version {version}; this senderqueue-sql "
                    f"knows up to {SCHEMA_VERSION}: upgrade it"
                )
            for migrate in MIGRATIONS[version:]:
                migrate(conn, t)
            if version == 0:
                conn.execute(t.meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif version < SCHEMA_VERSION:
                conn.execute(
                    t.meta.update().where(t.meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
                )

        self._run(work)
        _READY.add(key)

    def schema_version(self) -> int:
        """The schema version stored in the namespace."""
        meta = self._t.meta
        query = sa.select(meta.c.value).where(meta.c.key == "schema_version")
        return int(self._run(lambda conn: conn.execute(query).scalar_one(), read=True))

    def _count(self, db: _Driver, changes: dict[int, Counter[str]]) -> None:
        """Add ``changes`` to the sender queues' counts, in the caller's transaction."""
        rows = [
            {"queue_id": queue_id, **{name: change[name] for name in COUNTS}}
            for queue_id, change in sorted(changes.items())
            if any(change.values())
        ]
        if rows:
            db.many(self._sql.add_counts, rows)

    def _sums(self, db: _Driver, queue_ids: Sequence[int]) -> dict[int, Counter[str]]:
        """The counts of these sender queues, in one statement (one snapshot)."""
        rows = db.rows(self._sql.sums, {"ids": json.dumps(list(queue_ids))})
        return {row[0]: Counter(dict(zip(COUNTS, map(int, row[1:]), strict=True))) for row in rows}

    def _queues(
        self, conn: Connection, pairs: Sequence[tuple[str, str]], now: int
    ) -> dict[tuple[str, str], Any]:
        """The sender queue rows of ``pairs``, made if missing, share-locked in id order."""
        t = self._t
        q = t.queues
        where = sa.tuple_(q.c.mailing, q.c.sender).in_(pairs)
        known = {(r.mailing, r.sender) for r in conn.execute(sa.select(q.c.mailing, q.c.sender).where(where))}
        missing = [pair for pair in pairs if pair not in known]
        if missing:
            insert = postgresql.insert if self._pg else sqlite.insert
            mailings = sorted({mailing for mailing, _ in missing})
            conn.execute(
                insert(t.mailings).on_conflict_do_nothing(),
                [{"mailing": m, "frozen": False} for m in mailings],
            )
            # The mailing row is locked before its queue rows, as freeze does, so neither waits on the other.
            query = sa.select(t.mailings.c.mailing, t.mailings.c.frozen).where(
                t.mailings.c.mailing.in_(mailings)
            )
            locked = conn.execute(query.order_by(t.mailings.c.mailing).with_for_update(read=True))
            frozen = {row.mailing: row.frozen for row in locked}
            for mailing, sender in missing:
                made = conn.execute(
                    insert(q)
                    .values(mailing=mailing, sender=sender, frozen=frozen[mailing], changed_at=now, epoch=0)
                    .on_conflict_do_nothing()
                    .returning(q.c.id)
                ).scalar()
                if made is not None:
                    conn.execute(t.counts.insert().values(queue_id=made, slot=0, **dict.fromkeys(COUNTS, 0)))
        query = sa.select(q.c.id, q.c.mailing, q.c.sender, q.c.epoch, q.c.frozen).where(where)
        rows = conn.execute(query.order_by(q.c.id).with_for_update(read=True)).all()
        return {(row.mailing, row.sender): row for row in rows}

    # -- changes --------------------------------------------------------------------

    def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> list[str]:
        at = _us(now)
        pairs = list(dict.fromkeys((m.mailing, m.sender) for m in messages))
        ids = [m.message_id for m in messages]

        def work(conn: Connection) -> list[str]:
            queues = self._queues(conn, pairs, at)
            rows = []
            added: dict[int, Counter[str]] = defaultdict(Counter)
            for message in messages:
                queue = queues[message.mailing, message.sender]
                added[queue.id]["new"] += 1
                rows.append((message.message_id, queue.id, message.recipient, message.mail_from, queue.epoch))
            db = self._driver(conn)
            # One statement for the batch, in order (seq is enqueue order); a taken id inserts nothing.
            params: dict[str, Any] = {"rows": json.dumps(rows), "now": at}
            if self._pg:  # the contents go in the same statement
                params["contents"] = [message.content for message in messages]
                if len(db.rows(self._sql.enqueue, params)) < len(rows):
                    raise _Taken
            else:
                made = {id: seq for seq, id in db.rows(self._sql.enqueue, params)}
                if len(made) < len(rows):
                    raise _Taken
                seqs = [made[message.message_id] for message in messages]
                db.many(
                    self._sql.add_contents,
                    [
                        {"seq": seq, "content": message.content}
                        for seq, message in zip(seqs, messages, strict=True)
                    ],
                )
            self._count(db, added)
            return [str(i) for i in ids]

        try:
            return self._run(work)
        except _Taken:
            pass
        # Rolled back: find which id was taken (it may have been taken by a concurrent enqueue).
        found = self._read(lambda db: db.rows(self._sql.taken, {"ids": json.dumps(ids)}))
        taken = {id for (id,) in found}
        raise DuplicateMessage(next((str(i) for i in ids if i in taken), str(ids[0])))

    def claim(
        self, sender: str, limit: int, lease: timedelta, now: datetime, retry: RetryPolicy
    ) -> list[Claim]:
        at = _us(now)
        params = {"sender": sender, "now": at, "limit": limit, "expires": _us(now + lease)}

        params["batch"] = secrets.randbits(62)  # token = batch + seq: fresh for every claim
        if not self._pg:
            return self._hot(lambda db: self._claims(db, self._claim_sqlite(db, params, now, retry), at))
        # One statement claims, counts, and says whether the sender has expired leases. Settling
        # them after the claim changes nothing it could take: an expired lease's message is due
        # again only after a backoff, later than now.
        result = self._hot(lambda db: db.rows(self._sql.claim_pg, params), single=True)
        # The claimed, with their content, then their sender queue's mailing (so that nothing
        # is left to read once the claim is made) and whether the sender has leases that expired.
        rows = []
        names = self._names
        for row in result:
            if row[0] is not None:
                names.setdefault(row[2], (row[-2], sender))
                rows.append(row[:-2])
        claims = self._claims(None, rows, at)
        if result and result[0][-1]:

            def expire(db: _Driver) -> None:
                expired = db.rows(self._sql.expired_of_sender, params)
                self._settle(db, [self._expiry(row) for row in expired], now, retry)

            try:
                self._hot(expire)
            except BackendError as failure:
                # The claim is made: the call says what it did. The leases stay expired, for the
                # next claim or expire_leases() to settle.
                _log.warning(
                    "claim for sender %r made %d claims, then stopped: %s", sender, len(claims), failure
                )
        return claims

    def _claim_sqlite(
        self, db: _Driver, params: dict[str, Any], now: datetime, retry: RetryPolicy
    ) -> list[Any]:
        # One look at the sender's queues (id, epoch, frozen, first lease expiry, a message due)
        # says which are ready and whether any lease ran out.
        queues = db.rows(self._sql.sender_queues, params)
        if any(expiry is not None and expiry <= params["now"] for _, _, _, expiry, _ in queues):
            expired = db.rows(self._sql.expired_of_sender, params)
            self._settle(db, [self._expiry(row) for row in expired], now, retry)
        ready = [(id, epoch) for id, epoch, frozen, _, due in queues if due and not frozen]
        if not ready:
            return []
        branches = {f"q{n}": id for n, (id, _) in enumerate(ready)}
        branches |= {f"e{n}": epoch for n, (_, epoch) in enumerate(ready)}
        rows = db.rows(self._sql.claim_sqlite(len(ready)), params | branches)
        if not rows:
            return []
        found = db.rows(self._sql.contents, {"seqs": json.dumps([row[0] for row in rows])})
        contents: dict[int, bytes] = dict(found)
        return [(*row, contents[row[0]]) for row in rows]

    def _learn_names(self, db: _Driver, rows: list[Any]) -> None:
        """Read the (mailing, sender) of the sender queues of ``rows`` this process has not seen."""
        unknown = {row[2] for row in rows} - self._names.keys()
        if unknown:  # a sender queue's names never change: each process reads them once
            found = db.rows(self._sql.names, {"ids": json.dumps(sorted(unknown))})
            self._names.update((id, (mailing, sender)) for id, mailing, sender in found)

    def _claims(self, db: _Driver | None, rows: list[Any], now: int) -> list[Claim]:
        """Claims of the claimed ``rows``; on SQLite (``db`` given) also learn names and count.

        A row is the claim statement's returned columns (the token as its text), then the content.
        """
        if not rows:
            return []
        if db is not None:  # PostgreSQL counted in the claim statement itself
            self._learn_names(db, rows)
            counts: dict[int, Counter[str]] = defaultdict(Counter)
            for row in rows:
                counts[row[2]][_COUNTER[row[5]]] -= 1
                counts[row[2]]["sending"] += 1
            self._count(db, counts)
        rows.sort(key=_DUE_SEQ)
        names = self._names
        claims = []
        updated_at = _time(now)
        times: dict[int, datetime] = {}  # a batch shares few distinct times
        known = times.get
        sending = State.SENDING
        for (
            _,
            id,
            queue_id,
            recipient,
            mail_from,
            _,
            attempts,
            due,
            error,
            created_at,
            token,
            expires_at,
            content,
        ) in rows:
            mailing, sender = names[queue_id]
            message = Message(
                id=id,
                mailing=mailing,
                sender=sender,
                recipient=recipient,
                mail_from=mail_from,
                content=content if type(content) is bytes else bytes(content),
                state=sending,
                frozen_from=None,
                attempts=attempts,
                next_attempt_at=known(due) or times.setdefault(due, _time(due)),
                last_error=error,
                created_at=known(created_at) or times.setdefault(created_at, _time(created_at)),
                updated_at=updated_at,
            )
            expires = known(expires_at) or times.setdefault(expires_at, _time(expires_at))
            claims.append(Claim(message=message, token=token, expires_at=expires))
        return claims

    @staticmethod
    def _expiry(row: Any) -> _Leave:
        id, token, attempts, created_at = row
        return _Leave(id, token, attempts, _time(created_at), Trigger.EXPIRE, "lease expired")

    def _settle(
        self, db: _Driver, leaves: Sequence[_Leave], now: datetime, retry: RetryPolicy
    ) -> list[bool | None]:
        """Take each claim out of SENDING if it still holds; return which did, in order.

        ``None``: found, but moved by a concurrent change before it could be settled (PostgreSQL).
        """
        at = _us(now)
        # A message named twice is settled in order: its second report goes in a later statement.
        rounds: list[list[int]] = [list(range(len(leaves)))]
        if len({leave.id for leave in leaves}) < len(leaves):
            rounds = []
            seen: Counter[str] = Counter()
            for index, leave in enumerate(leaves):
                n = seen[leave.id]
                seen[leave.id] += 1
                if n == len(rounds):
                    rounds.append([])
                rounds[n].append(index)
        done: list[bool | None] = [False] * len(leaves)
        for indexes in rounds:
            for start in range(0, len(indexes), _BATCH):
                chunk = [leaves[i] for i in indexes[start : start + _BATCH]]
                micros: dict[datetime, int] = {}
                rows = [leave.row(now, retry, micros) for leave in chunk]
                statement, params = self._sql.settle(rows, at)
                settled = db.rows(statement, params)  # (id, queue_id, state)
                if not self._pg:  # PostgreSQL counts in the same statement
                    counts: dict[int, Counter[str]] = defaultdict(Counter)
                    for _, queue_id, state in settled:
                        counts[queue_id][_COUNTER[state]] += 1
                        counts[queue_id]["sending"] -= 1
                    self._count(db, counts)
                ids = {id for id, _, state in settled if state is not None}
                moved = {id for id, _, state in settled if state is None}
                for i in indexes[start : start + _BATCH]:
                    id = leaves[i].id
                    done[i] = True if id in ids else None if id in moved else False
        return done

    def settle(
        self, settlements: Sequence[Settlement], now: datetime, retry: RetryPolicy
    ) -> list[LeaseLost | None]:
        leaves: list[_Leave] = []
        positions: list[int | None] = []
        for settlement in settlements:
            claim = settlement.claim
            parsed = _token(claim)
            if parsed is None:
                positions.append(None)
                continue
            positions.append(len(leaves))
            message = claim.message
            token, place = parsed
            leaves.append(
                _Leave(
                    message.id,
                    token,
                    message.attempts,
                    message.created_at,
                    settlement.trigger,
                    settlement.error,
                    place,
                )
            )
        done = self._settle_hot(leaves, now, retry) if leaves else []
        moved = [i for i, settled in enumerate(done) if settled is None]
        if moved:
            # A renewal moved these rows while the report looked at them: their claims still held.
            # Settled again, they are found where they are now.
            again = [leaves[i] for i in moved]
            for leave in again:
                leave.place = None
            try:
                redone = self._settle_hot(again, now, retry)
            except BackendError as failure:  # the first statement is committed: say what it did
                _log.warning("report settled %d claims, then stopped: %s", done.count(True), failure)
                redone = [False] * len(again)
            for i, settled in zip(moved, redone, strict=True):
                done[i] = settled
        return [
            None if position is not None and done[position] else LeaseLost(s.claim.message.id)
            for s, position in zip(settlements, positions, strict=True)
        ]

    def _settle_hot(self, leaves: list[_Leave], now: datetime, retry: RetryPolicy) -> list[bool | None]:
        # One statement, in autocommit on PostgreSQL, unless a message is named twice or the batch
        # needs several statements: then one transaction.
        single = len(leaves) <= _BATCH and len({leave.id for leave in leaves}) == len(leaves)
        return self._hot(lambda db: self._settle(db, leaves, now, retry), single=single)

    def renew(self, claim: Claim, lease: timedelta, now: datetime) -> Claim:
        parsed = _token(claim)
        token = None if parsed is None else parsed[0]
        expires_at = now + lease
        params = {"id": claim.message.id, "token": token, "expires": _us(expires_at)}
        if token is None or not self._run(
            lambda conn: conn.execute(self._sql.renew, params).rowcount, single=True
        ):
            raise LeaseLost(claim.message.id)
        return Claim(message=claim.message, token=claim.token, expires_at=expires_at)

    def expire_leases(self, now: datetime, retry: RetryPolicy) -> int:
        def work(db: _Driver) -> int:
            expired = db.rows(self._sql.expired, {"now": _us(now)})
            return self._settle(db, [self._expiry(row) for row in expired], now, retry).count(True)

        return self._hot(work)

    def _set_frozen(self, mailing: str, sender: str | None, frozen: bool, now: datetime) -> int:
        at = _us(now)
        params = {"mailing": mailing, "sender": sender, "frozen": frozen, "was": not frozen, "now": at}

        def work(conn: Connection) -> int:
            db = self._driver(conn)
            if sender is None:
                db.rows(self._sql.set_mailing, params)  # later sender queues of the mailing start so
            else:
                self._queues(conn, [(mailing, sender)], at)  # it can be frozen before it has mail
            # On PostgreSQL the rows are locked exclusively (in id order) first: the update waits for
            # every claim and report in flight on these queues, and the count after it sees them all.
            ids = [row[0] for row in db.rows(self._sql.flip, params)]
            if not ids:
                return 0
            return sum(s["new"] + s["retries"] for s in self._sums(db, ids).values())

        return self._run(work)

    def freeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        return self._set_frozen(mailing, sender, True, now)

    def unfreeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        return self._set_frozen(mailing, sender, False, now)

    def clear(self, mailing: str, sender: str | None, now: datetime) -> int:
        locked = {"mailing": mailing, "sender": sender}
        at = _us(now)

        if self._pg:
            # Two statements: the lock waits for claims and reports in flight; the second, with a
            # snapshot taken after it, sees their counts and writes epoch, clear and counts at once.
            def work_pg(conn: Connection) -> int:
                db = self._driver(conn)
                ids = [row[0] for row in db.rows(self._sql.lock_queues, locked)]
                if not ids:
                    return 0
                rows = db.rows(self._sql.clear_pg, {"ids": ids, "now": at})
                return sum(cleared for _, cleared in rows)

            return self._run(work_pg)

        def work(conn: Connection) -> int:
            db = self._driver(conn)
            queues = db.rows(self._sql.lock_queues, locked)  # SQLite: the writer holds the database
            if not queues:
                return 0
            sums = self._sums(db, [id for id, _ in queues])
            moved = 0
            changes: dict[int, Counter[str]] = {}
            ended = []
            for id, epoch in queues:
                s = sums[id]
                cleared = s["new"] + s["retries"]
                # A new epoch also marks the SENDING ones as cleared since their claim.
                if cleared or s["sending"]:
                    moved += cleared
                    changes[id] = Counter(new=-s["new"], retries=-s["retries"], deleted=cleared)
                    ended.append({"queue_id": id, "epoch": epoch, "cleared_at": at})
            if ended:
                db.rows(self._sql.bump_epochs, {"ids": json.dumps(list(changes))})
                db.many(self._sql.add_clear, ended)
                self._count(db, changes)
            return moved

        return self._run(work)

    def purge(self, older_than: datetime) -> int:
        params = {"before": _us(older_than)}

        def work(conn: Connection) -> int:
            if self._pg:
                gone = conn.execute(self._sql.purge_pg, params).all()
            else:
                gone = conn.execute(self._sql.purge_count, params).all()
                conn.execute(self._sql.purge_contents, params)
                conn.execute(self._sql.purge_terminal, params)
                conn.execute(self._sql.purge_cleared, params)
            counts: dict[int, Counter[str]] = defaultdict(Counter)
            for queue_id, state, n in gone:
                counts[queue_id][_COUNTER[state]] -= n
            self._count(self._driver(conn), counts)
            return sum(n for _, _, n in gone)

        return self._run(work)

    # -- reads ----------------------------------------------------------------------

    def _metrics(self, mailing: str, sender: str | None) -> dict[str, Metrics]:
        params = {"mailing": mailing, "sender": sender}
        rows = self._read(lambda db: db.rows(self._sql.metrics, params))
        result = {}
        for sender, frozen, *counts in rows:
            new, retries, sending, delivered, failed, deleted = map(int, counts)
            result[sender] = Metrics.of_sender_queue(
                frozen=bool(frozen),
                new=new,
                retries=retries,
                sending=sending,
                delivered=delivered,
                failed=failed,
                deleted=deleted,
            )
        return result

    def metrics(self, mailing: str, sender: str | None) -> Metrics:
        total = Metrics()
        for metrics in self._metrics(mailing, sender).values():
            total += metrics
        return total

    def metrics_by_sender(self, mailing: str) -> dict[str, Metrics]:
        return self._metrics(mailing, None)

    def get(self, message_id: str) -> Message:
        row = self._run(lambda conn: conn.execute(self._sql.get, {"id": message_id}).first(), read=True)
        if row is None:
            raise UnknownMessage(message_id)
        state = _STATES[row.state]
        frozen_from = None
        updated_at = row.updated_at
        if row.state in (NEW, RETRIES):
            if row.epoch != row.queue_epoch:
                state, updated_at = State.DELETED, row.cleared_at
            else:
                updated_at = max(updated_at, row.changed_at)
                if row.frozen:
                    state, frozen_from = State.FROZEN, state
        return Message(
            id=row.id,
            mailing=row.mailing,
            sender=row.sender,
            recipient=row.recipient,
            mail_from=row.mail_from,
            content=bytes(row.content),
            state=state,
            frozen_from=frozen_from,
            attempts=row.attempts,
            next_attempt_at=_time(row.due),
            last_error=row.last_error,
            created_at=_time(row.created_at),
            updated_at=_time(updated_at),
        )

    # -- life -----------------------------------------------------------------------

    def close(self) -> None:
        """Give the connections back; an engine made from a URL closes them when its last user does."""
        if self._closed:
            return
        self._closed = True
        if self._shared:
            _engines.release(self.engine)

    def destroy(self) -> None:
        """Drop the namespace's tables and everything in them."""

        def work(conn: Connection) -> None:
            self._t.metadata.drop_all(conn)

        self._run(work)
        _READY.discard((self.engine.url.render_as_string(hide_password=False), self.namespace))


_READY: set[tuple[str, str]] = set()
"""(database URL, namespace) pairs whose schema this process has checked."""


class _Taken(Exception):
    """An id of the batch is taken: roll the enqueue back."""


class _Driver:
    """The DB-API connection under a SQLAlchemy one, for the statements claims and reports run.

    Those few fixed statements run many times a second; on the driver they skip SQLAlchemy's
    work per execution (about 50 µs a statement and as much again per transaction, a third of
    a claim and report of 100 messages on SQLite). Rows come back as plain tuples.
    """

    __slots__ = ("options", "pg", "raw", "sql")

    def __init__(self, raw: Any, sql: Callable[[sa.TextClause], str], pg: bool) -> None:
        self.raw = raw
        self.sql = sql
        self.pg = pg
        # PostgreSQL sends results in binary: a claim's contents arrive as they are, not in hex
        # at twice their size, to be decoded (a claim of 100 messages of 5 KB: 0.4 ms less).
        self.options = {"binary": True} if pg else {}

    def rows(self, statement: sa.TextClause, params: dict[str, Any]) -> list[Any]:
        """Execute; the rows it returns, if any."""
        cursor = self.raw.execute(self.sql(statement), params, **self.options)
        if self.pg:  # psycopg's description builds an object per column: ask the result itself
            result = cursor.pgresult
            return cursor.fetchall() if result is not None and result.nfields else []
        return cursor.fetchall() if cursor.description is not None else []

    def many(self, statement: sa.TextClause, rows: list[dict[str, Any]]) -> None:
        """Execute once per row of parameters."""
        self.raw.cursor().executemany(self.sql(statement), rows)


def from_url(url: str) -> SQLBackend:
    """Make a :class:`SQLBackend` from ``sqlite:///path`` or ``postgresql://…`` (``?namespace=NAME``)."""
    return SQLBackend.from_url(url)


class _Statements:
    """The namespace's hand-written statements, for the shapes Core alone would not give."""

    def __init__(self, t: Tables, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self.pg = pg = dialect.name == "postgresql"
        m, q, c = t.messages.name, t.queues.name, t.counts.name
        cl, ct = t.clears.name, t.contents.name
        self.m, self.q, self.c, self.ct = m, q, c, ct
        if pg:
            self.add_counts = sa.text(
                self.tally(
                    "VALUES (CAST(:queue_id AS int), "
                    + ", ".join(f"CAST(:{name} AS bigint)" for name in COUNTS)
                    + ")"
                )
            )
        else:
            # SQLite has one writer at a time, and one counts row per sender queue.
            self.add_counts = sa.text(
                f"UPDATE {c} SET "
                + ", ".join(f"{name} = {name} + :{name}" for name in COUNTS)
                + " WHERE queue_id = :queue_id AND slot = 0"
            )
        summed = ", ".join(f"CAST(SUM(c.{n}) AS BIGINT) AS {n}" for n in COUNTS)
        # A sender queue's counts: the sum of its rows.
        self.metrics = sa.text(
            f"SELECT q.sender, q.frozen, {summed} FROM {q} q JOIN {c} c ON c.queue_id = q.id "
            "WHERE q.mailing = :mailing AND (:sender IS NULL OR q.sender = :sender) "
            "GROUP BY q.id, q.sender, q.frozen ORDER BY q.id"
        ).bindparams(sa.bindparam("sender", type_=sa.String))
        # The envelope (id, recipient, mail_from, created_at): in the message row on SQLite; beside
        # the content on PostgreSQL since schema 6, where the message row keeps only what changes.
        e = "ct" if pg else "m"
        self.get = sa.text(
            f"SELECT {e}.id, q.mailing, q.sender, {e}.recipient, {e}.mail_from, ct.content, m.state, "
            f"m.attempts, m.due, m.last_error, {e}.created_at, m.updated_at, m.epoch, "
            f"q.epoch AS queue_epoch, q.frozen, q.changed_at, cl.cleared_at "
            f"FROM {m} m JOIN {q} q ON q.id = m.queue_id "
            f"JOIN {ct} ct ON ct.seq = m.seq "
            f"LEFT JOIN {cl} cl ON cl.queue_id = m.queue_id AND cl.epoch = m.epoch WHERE {e}.id = :id"
        )
        lease = f"{e}.id, m.token, m.attempts, {e}.created_at FROM {m} m" + (
            f" JOIN {ct} ct ON ct.seq = m.seq" if pg else ""
        )
        self.expired = sa.text(
            f"SELECT {lease} WHERE m.state = {SENDING} AND m.expires_at <= :now ORDER BY m.expires_at, m.seq"
        )
        # The elements of a JSON array parameter, as text.
        elements = "json_array_elements_text(CAST(:ids AS json))" if pg else "json_each(:ids)"
        self.taken = sa.text(f"SELECT id FROM {ct if pg else m} WHERE id IN (SELECT value FROM {elements})")
        self.renew = sa.text(
            f"UPDATE {m} SET expires_at = :expires WHERE "
            + (f"seq = (SELECT seq FROM {ct} WHERE id = :id)" if pg else "id = :id")
            + f" AND token = :token AND state = {SENDING}"
        )
        # A message due in a queue's current epoch: a probe of the claim index, so that a claim
        # passes over the sender's queues with nothing to send (every mailing it ever sent) at the
        # cost of one index lookup each, and locks and reads only the others.
        has_due = (
            f"EXISTS (SELECT 1 FROM {m} WHERE queue_id = q.id AND epoch = q.epoch "
            f"AND state IN ({NEW}, {RETRIES}) AND due <= :now)"
        )
        self.sender_queues = sa.text(
            f"SELECT id, epoch, frozen, (SELECT min(expires_at) FROM {m} WHERE queue_id = q.id "
            f"AND state = {SENDING}) AS expiry, {has_due} AS due FROM {q} q WHERE sender = :sender"
        )
        self.expired_of_sender = sa.text(
            f"SELECT {lease} WHERE m.state = {SENDING} AND m.expires_at <= :now "
            f"AND m.queue_id IN (SELECT id FROM {q} WHERE sender = :sender) ORDER BY m.expires_at, m.seq"
        )
        # What a claim returns of each row. The token comes as the claim's token text: on
        # PostgreSQL with where the claim left the row ("@block.offset" of its ctid), so that a
        # report finds the row by address.
        token = (
            f"{m}.token || '@' || translate(CAST({m}.ctid AS text), ',()', '.')"
            if pg
            else "CAST(token AS text)"
        )
        self.returned = (
            f"{m}.seq, {m}.id, {m}.queue_id, {m}.recipient, {m}.mail_from, {m}.claimed_from, "
            f"{m}.attempts, {m}.due, {m}.last_error, {m}.created_at, {token} AS token, {m}.expires_at"
        )
        # PostgreSQL: what the claim's update returns of the row; the envelope and content are
        # read beside it, in the same order of columns.
        changed = (
            f"{m}.seq, {m}.queue_id, {m}.claimed_from, {m}.attempts, {m}.due, {m}.last_error, "
            f"{token} AS token, {m}.expires_at"
        )
        # Content never changes: a claim reads it beside the rows it took (SQLite).
        self.contents = sa.text(
            f"SELECT seq, content FROM {ct} WHERE seq IN (SELECT value FROM json_each(:seqs))"
        )
        listed = f"SELECT CAST(value AS int) FROM {elements}"
        self.names = sa.text(f"SELECT id, mailing, sender FROM {q} WHERE id IN ({listed})")
        self.claimed = (
            f"state = {SENDING}, claimed_from = {m}.state, attempts = {m}.attempts + 1, "
            f"token = :batch + {m}.seq, expires_at = :expires, updated_at = :now"
        )
        ready = f"state IN ({NEW}, {RETRIES}) AND due <= :now"
        counted = ", ".join(
            [
                f"-count(*) FILTER (WHERE claimed_from = {NEW})",
                f"-count(*) FILTER (WHERE claimed_from = {RETRIES})",
                "count(*), 0, 0, 0",
            ]
        )
        # One statement: lock the sender's unfrozen queues that have a message due (share), take
        # the oldest due of each queue's current epoch from the claim index, skipping rows other
        # workers hold, merge, count.
        self.claim_pg = sa.text(
            f"WITH qs AS (SELECT id, epoch, mailing FROM {q} q WHERE sender = :sender AND NOT frozen "
            f"AND {has_due} ORDER BY id FOR SHARE), "
            "pick AS (SELECT p.tid, p.seq FROM qs CROSS JOIN LATERAL "
            f"(SELECT ctid AS tid, seq, due FROM {m} WHERE queue_id = qs.id AND epoch = qs.epoch AND {ready} "
            "ORDER BY due, seq LIMIT :limit FOR UPDATE SKIP LOCKED) p ORDER BY p.due, p.seq LIMIT :limit), "
            # The picked rows are locked: their physical address stays theirs until the update.
            f"upd AS (UPDATE {m} SET {self.claimed} FROM pick "
            f"WHERE {m}.ctid = pick.tid AND {m}.seq = pick.seq "
            f"RETURNING {changed}), "
            f"ins AS ({self.tally(f'SELECT queue_id, {counted} FROM upd GROUP BY queue_id')}) "
            "SELECT upd.seq, e.id, upd.queue_id, e.recipient, e.mail_from, upd.claimed_from, upd.attempts, "
            "upd.due, upd.last_error, e.created_at, upd.token, upd.expires_at, e.content, "
            "(SELECT mailing FROM qs WHERE qs.id = upd.queue_id) AS mailing, probe.expired "
            f"FROM (SELECT count(*) AS expired FROM {m} WHERE state = {SENDING} AND expires_at <= :now "
            f"AND queue_id IN (SELECT id FROM {q} WHERE sender = :sender)) probe LEFT JOIN upd ON true "
            # LATERAL: one lookup of the contents' primary key per claimed row, whatever the planner
            # believes of the tables' sizes.
            "LEFT JOIN LATERAL (SELECT id, recipient, mail_from, created_at, content "
            f"FROM {ct} WHERE seq = upd.seq) e ON true"
        )
        self._claim_sqlite: dict[int, sa.TextClause] = {}
        self._driver_sql: dict[sa.TextClause, str] = {}
        # Enqueue: the batch as one JSON parameter, [id, queue_id, recipient, mail_from, epoch] each.
        if pg:
            given = (
                "SELECT value ->> 0 AS id, CAST(value ->> 1 AS int) AS queue_id, value ->> 2 AS recipient, "
                "value ->> 3 AS mail_from, CAST(value ->> 4 AS int) AS epoch, n "
                "FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS r(value, n)"
            )
        else:
            given = (
                "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 "
                "FROM json_each(:rows) ORDER BY key"
            )
        if pg:
            # The envelopes and contents first, each taking the next seq in the batch's order (a
            # volatile output is computed after the sort); a taken id inserts nothing. Then the
            # message rows of those that went in.
            self.enqueue = sa.text(
                f"WITH g AS ({given}), "
                "c AS (SELECT content, n FROM unnest(CAST(:contents AS bytea[])) "
                "WITH ORDINALITY AS u(content, n)), "
                f"e AS (INSERT INTO {ct} (seq, id, recipient, mail_from, created_at, content) "
                f"SELECT nextval('{m}_seq_seq'), g.id, g.recipient, g.mail_from, :now, c.content "
                "FROM g JOIN c ON c.n = g.n ORDER BY g.n ON CONFLICT (id) DO NOTHING RETURNING seq, id) "
                f"INSERT INTO {m} (seq, queue_id, epoch, state, claimed_from, attempts, due, updated_at) "
                f"SELECT e.seq, g.queue_id, g.epoch, {NEW}, {NEW}, 0, :now, :now "
                f"FROM e JOIN g ON g.id = e.id RETURNING {m}.seq"
            )
        else:
            self.enqueue = sa.text(
                f"INSERT INTO {m} (id, queue_id, recipient, mail_from, epoch, state, claimed_from, "
                f"attempts, due, created_at, updated_at) "
                f"SELECT g.*, {NEW}, {NEW}, 0, :now, :now, :now FROM ({given}) g "
                # WHERE: SQLite would read the ON of ON CONFLICT as a join's.
                "WHERE true ON CONFLICT (id) DO NOTHING RETURNING seq, id"
            )
        self.add_contents = sa.text(f"INSERT INTO {ct} (seq, content) VALUES (:seq, :content)")  # SQLite
        of_mailing = "mailing = :mailing AND (:sender IS NULL OR sender = :sender)"
        for_update = " FOR UPDATE" if pg else ""  # SQLite: the writer holds the whole database
        self.lock_queues = sa.text(
            f"SELECT id, epoch FROM {q} WHERE {of_mailing} ORDER BY id{for_update}"
        ).bindparams(sa.bindparam("sender", type_=sa.String))
        mailings = t.mailings.name
        self.set_mailing = sa.text(
            f"INSERT INTO {mailings} (mailing, frozen) VALUES (:mailing, :frozen) "
            "ON CONFLICT (mailing) DO UPDATE SET frozen = excluded.frozen"
        )
        self.flip = sa.text(
            f"UPDATE {q} SET frozen = :frozen, changed_at = :now WHERE "
            + (
                f"id IN (SELECT id FROM {q} WHERE {of_mailing} AND frozen = :was ORDER BY id FOR UPDATE)"
                if pg
                else f"{of_mailing} AND frozen = :was"
            )
            + " RETURNING id"
        ).bindparams(sa.bindparam("sender", type_=sa.String))
        self.bump_epochs = sa.text(f"UPDATE {q} SET epoch = epoch + 1 WHERE id IN ({listed})")
        self.add_clear = sa.text(
            f"INSERT INTO {cl} (queue_id, epoch, cleared_at) VALUES (:queue_id, :epoch, :cleared_at)"
        )
        self.sums = sa.text(
            f"SELECT c.queue_id, {summed} FROM {c} c WHERE c.queue_id IN ({listed}) GROUP BY c.queue_id"
        )
        # A queue with nothing queued or sending keeps its epoch: there is nothing to mark.
        self.clear_pg = sa.text(
            f"WITH qs AS (SELECT id, epoch FROM {q} WHERE id = ANY(CAST(:ids AS int[]))), "
            f"s AS (SELECT qs.id, qs.epoch, {summed} FROM qs JOIN {c} c ON c.queue_id = qs.id "
            "GROUP BY qs.id, qs.epoch), "
            "hit AS (SELECT * FROM s WHERE new + retries + sending > 0), "
            f"bump AS (UPDATE {q} SET epoch = {q}.epoch + 1 FROM hit WHERE {q}.id = hit.id), "
            f"ended AS (INSERT INTO {cl} (queue_id, epoch, cleared_at) SELECT id, epoch, :now FROM hit), "
            f"counted AS ({self.tally('SELECT id, -new, -retries, 0, 0, 0, new + retries FROM hit')}) "
            "SELECT id AS queue_id, new + retries AS cleared FROM hit"
        )
        # SQLite: count first, then delete; PostgreSQL counts what it deleted in the same statement.
        terminal = f"state >= {DELIVERED} AND updated_at < :before"
        cleared = (
            f"state IN ({NEW}, {RETRIES}) AND (queue_id, epoch) IN "
            f"(SELECT queue_id, epoch FROM {cl} WHERE cleared_at < :before)"
        )
        self.purge_pg = sa.text(
            f"WITH gone AS (DELETE FROM {m} WHERE ({terminal}) OR ({cleared}) "
            f"RETURNING seq, queue_id, "
            f"CASE WHEN state >= {DELIVERED} THEN state ELSE {DELETED} END AS state), "
            f"dropped AS (DELETE FROM {ct} WHERE seq IN (SELECT seq FROM gone)) "
            "SELECT queue_id, state, count(*) FROM gone GROUP BY queue_id, state"
        )
        self.purge_count = sa.text(
            f"SELECT queue_id, state, count(*) FROM {m} WHERE {terminal} GROUP BY queue_id, state "
            f"UNION ALL SELECT queue_id, {DELETED}, count(*) FROM {m} WHERE {cleared} GROUP BY queue_id"
        )
        self.purge_contents = sa.text(
            f"DELETE FROM {ct} WHERE seq IN (SELECT seq FROM {m} WHERE {terminal} "
            f"UNION ALL SELECT seq FROM {m} WHERE {cleared})"
        )
        self.purge_terminal = sa.text(f"DELETE FROM {m} WHERE {terminal}")
        self.purge_cleared = sa.text(f"DELETE FROM {m} WHERE {cleared}")

    def driver_sql(self, statement: sa.TextClause) -> str:
        """The statement as the driver takes it: ``:name`` on SQLite, ``%(name)s`` on PostgreSQL."""
        if not self.pg:
            return statement.text
        sql = self._driver_sql.get(statement)
        if sql is None:
            sql = self._driver_sql[statement] = str(statement.compile(dialect=self.dialect))
        return sql

    def claim_sqlite(self, queues: int) -> sa.TextClause:
        """The claim over ``queues`` sender queues: the oldest due of each, merged (SQLite)."""
        statement = self._claim_sqlite.get(queues)
        if statement is None:
            m = self.m
            ready = f"state IN ({NEW}, {RETRIES}) AND due <= :now"
            if queues <= 64:
                branches = " UNION ALL ".join(
                    f"SELECT * FROM (SELECT seq, due FROM {m} WHERE queue_id = :q{n} AND epoch = :e{n} "
                    f"AND {ready} ORDER BY due, seq LIMIT :limit)"
                    for n in range(queues)
                )
                pick = f"SELECT seq FROM ({branches}) ORDER BY due, seq LIMIT :limit"
            else:  # past SQLite's compound-select limit: one scan of the sender's ready messages
                pairs = ", ".join(f"(:q{n}, :e{n})" for n in range(queues))
                pick = (
                    f"SELECT seq FROM {m} WHERE (queue_id, epoch) IN (VALUES {pairs}) AND {ready} "
                    "ORDER BY due, seq LIMIT :limit"
                )
            statement = sa.text(
                f"UPDATE {m} SET {self.claimed} WHERE seq IN ({pick}) RETURNING {self.returned}"
            )
            self._claim_sqlite[queues] = statement
        return statement

    _COLUMNS = ("mid", "tok", "att", "crt", "dn", "dr", "dc", "nxt", "err", "rel", "loc", "lap")
    _TYPES = (
        "text",
        "bigint",
        "int",
        "bigint",
        "smallint",
        "smallint",
        "smallint",
        "bigint",
        "text",
        "int",
        "tid",
        "int",
    )

    def tally(self, source: str) -> str:
        """PostgreSQL: the INSERT that adds ``source``'s rows (a queue id, then COUNTS) to the counts.

        Each is added to the first of its queue's rows that no other transaction holds, or to a
        new row when all are held, so a writer does not wait for another's commit (unless two
        make the same new row at once). A queue gets as many rows as it has seen writers at once;
        a read sums them.
        """
        c = self.c
        slot = (
            f"COALESCE((SELECT slot FROM {c} WHERE queue_id = s.queue_id ORDER BY slot LIMIT 1 "
            f"FOR UPDATE SKIP LOCKED), (SELECT max(slot) + 1 FROM {c} WHERE queue_id = s.queue_id), 0)"
        )
        return (
            f"INSERT INTO {c} (queue_id, slot, {', '.join(COUNTS)}) "
            f"SELECT s.queue_id, {slot}, {', '.join(f's.{n}' for n in COUNTS)} "
            f"FROM ({source}) AS s (queue_id, {', '.join(COUNTS)}) ORDER BY s.queue_id "
            "ON CONFLICT (queue_id, slot) DO UPDATE SET "
            + ", ".join(f"{n} = {c}.{n} + excluded.{n}" for n in COUNTS)
        )

    def settle(self, rows: list[tuple[Any, ...]], now: int) -> tuple[sa.TextClause, dict[str, Any]]:
        """The statement that settles ``rows`` (one per claim, no message twice), and its parameters."""
        return self._settle_statement, {"rows": json.dumps(rows), "now": now}

    @functools.cached_property
    def _settle_statement(self) -> sa.TextClause:
        m, q, ct = self.m, self.q, self.ct
        # One JSON parameter: a fixed statement whatever the batch size, and on PostgreSQL far
        # cheaper to send than ten arrays (the driver dumps arrays element by element).
        if self.pg:
            fields = ", ".join(
                f"CAST(value ->> {n} AS {t}) AS {name}"
                for n, (name, t) in enumerate(zip(self._COLUMNS, self._TYPES, strict=True))
            )
            # jsonb: parsed once; each ->> on a json value parses its text again.
            given = f"i AS (SELECT {fields} FROM jsonb_array_elements(CAST(:rows AS jsonb)))"
        else:
            fields = ", ".join(f"value ->> {n} AS {name}" for n, name in enumerate(self._COLUMNS))
            given = f"i AS (SELECT {fields} FROM json_each(:rows))"
        # A message whose queue was cleared since its claim (its epoch is behind) leaves as DELETED.
        # A message has a token only while it is SENDING (every way out sets it to NULL), so the
        # token alone says the claim still holds.
        if self.pg:
            # Each claim is looked up on its own: at the physical address its claim left the row
            # (the token says where) or, if the row has moved since (a renewal, VACUUM FULL),
            # through the id's index beside the content; the envelope there must be the claim's
            # (id and creation time); the row is then updated by that address. A plan that
            # stays the same whatever the planner believes about the table's size (right after a
            # bulk enqueue, before autovacuum has analyzed it, it would otherwise hash-join a full
            # scan). The conditions are repeated on the updated row, so that a concurrent change
            # is re-checked; a row that a concurrent change (a renewal) moved after it was found
            # is not updated, and the statement returns it without a state, for the caller to
            # settle once more. The sender queues are share-locked (in id order), so that a clear
            # or freeze is never half seen.
            given += (
                f", t AS (SELECT i.*, x.tid, x.queue_id FROM i CROSS JOIN LATERAL ("
                f"(SELECT r.ctid AS tid, r.queue_id FROM {m} r JOIN {ct} e ON e.seq = r.seq "
                "WHERE r.ctid = i.loc AND r.token = i.tok AND e.id = i.mid AND e.created_at = i.crt) "
                f"UNION ALL (SELECT r.ctid, r.queue_id FROM {ct} e JOIN {m} r ON r.seq = e.seq "
                "WHERE e.id = i.mid AND e.created_at = i.crt AND r.token = i.tok) LIMIT 1) x), "
                f"lq AS (SELECT id, epoch FROM {q} WHERE id IN (SELECT queue_id FROM t) "
                "ORDER BY id FOR SHARE)"
            )
            x, epoch = "t", "lq.epoch"
            joined = f"FROM t, lq WHERE {m}.ctid = t.tid AND lq.id = {m}.queue_id"
            checked, settled = "", f"t.mid AS id, {m}.queue_id, {m}.state"
        else:
            # SQLite holds the whole database for the writer: the epoch is simply read, row by row.
            x, epoch = "i", f"(SELECT epoch FROM {q} WHERE id = {m}.queue_id)"
            joined = f"FROM i WHERE {m}.id = i.mid"
            checked, settled = f"AND {m}.created_at = i.crt ", f"{m}.id, {m}.queue_id, {m}.state"
        update = (
            f"UPDATE {m} SET "
            f"state = CASE WHEN {m}.epoch <> {epoch} THEN {x}.dc "
            f"WHEN {m}.claimed_from = {NEW} THEN {x}.dn ELSE {x}.dr END, "
            f"due = CASE WHEN {m}.epoch = {epoch} AND {x}.nxt IS NOT NULL THEN {x}.nxt ELSE {m}.due END, "
            f"attempts = {m}.attempts - {x}.rel, last_error = COALESCE({x}.err, {m}.last_error), "
            f"token = NULL, expires_at = NULL, updated_at = :now {joined} AND {m}.token = {x}.tok "
            # A lease settled as expired must still be expired: renewed since it was read, it holds.
            f"AND {m}.attempts = {x}.att AND ({x}.lap = 0 OR {m}.expires_at <= :now) "
            f"{checked}RETURNING {settled}"
        )
        head = f"WITH {given}"
        if not self.pg:
            return sa.text(f"{head} {update}")
        counted = ", ".join(
            [
                f"count(*) FILTER (WHERE state = {NEW})",
                f"count(*) FILTER (WHERE state = {RETRIES})",
                "-count(*)",
            ]
            + [f"count(*) FILTER (WHERE state = {s})" for s in (DELIVERED, FAILED, DELETED)]
        )
        return sa.text(
            f"{head}, upd AS ({update}), "
            f"ins AS ({self.tally(f'SELECT queue_id, {counted} FROM upd GROUP BY queue_id')}) "
            "SELECT id, queue_id, state FROM upd "
            "UNION ALL SELECT mid, NULL, NULL FROM t WHERE mid NOT IN (SELECT id FROM upd)"
        )
