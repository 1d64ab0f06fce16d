"""Engines from backend URLs: the driver settings each engine needs, shared within a process."""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from senderqueue import InvalidArgument

__all__ = [
    "READ",
    "KeptConnection",
    "acquire",
    "autocommit",
    "kept",
    "parse_url",
    "prepare",
    "release",
    "writer_lock",
]

T = TypeVar("T")

READ = "senderqueue_read"
"""Execution option of a one-statement read: it runs in autocommit, without a transaction of its own."""

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_prepared: weakref.WeakSet[Engine] = weakref.WeakSet()
_writers: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_autocommit: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_kept: weakref.WeakKeyDictionary[Engine, KeptConnection] = weakref.WeakKeyDictionary()
_inherited: list[Any] = []  # a forked child's copies of its parent's kept connections
_lock = threading.Lock()
_shared: dict[str, tuple[Engine, int]] = {}


def parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    """Split a backend URL into (SQLAlchemy URL, namespace, engine options)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    base, _, driver = scheme.partition("+")
    drivers = {"sqlite": ("", "pysqlite"), "postgresql": ("", "psycopg")}
    if base not in drivers or driver not in drivers[base]:
        raise InvalidArgument(
            f"{scheme}:// is not a SQL backend URL: use sqlite:///path or postgresql://… (psycopg 3)"
        )
    namespace = "main"
    options: dict[str, str] = {}
    passed = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "namespace":
            namespace = value
        elif key == "synchronous" and base == "sqlite":
            if value.upper() not in _SYNCHRONOUS:
                raise InvalidArgument(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {value!r}")
            options[key] = value.upper()
        else:
            passed.append((key, value))  # the driver's own options, such as sslmode
    if base == "sqlite" and parts.path in ("", "/", "/:memory:"):
        raise InvalidArgument("the SQL backend needs a SQLite file (sqlite:///path/queue.db), not memory")
    full = "sqlite+pysqlite" if base == "sqlite" else "postgresql+psycopg"
    query = f"?{urlencode(passed)}" if passed else ""
    return f"{full}://{parts.netloc}{parts.path}{query}", namespace, options


def writer_lock(engine: Engine) -> threading.Lock | None:
    """The lock a SQLite engine's writing threads take in turn, or None on PostgreSQL.

    SQLite lets one writer in at a time and makes the others poll with growing sleeps;
    threads of one process queue on this lock instead, so none of them starves.
    """
    return _writers.get(engine)


def prepare(engine: Engine, synchronous: str = "NORMAL") -> None:
    """Give a SQLite engine WAL and ``BEGIN IMMEDIATE`` writes; nothing to do on PostgreSQL."""
    if engine.dialect.name != "sqlite" or engine in _prepared:
        return
    _prepared.add(engine)
    _writers[engine] = threading.Lock()

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: object) -> None:
        # The driver's own transaction handling is switched off; "begin" below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A writer takes the write lock up front, so two writers never deadlock upgrading a read lock.
        # A read is one statement, atomic on its own in the driver's autocommit mode.
        if not conn.get_execution_options().get(READ):
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]


def _create(sa_url: str, options: dict[str, str]) -> Engine:
    if sa_url.startswith("sqlite"):
        engine = sa.create_engine(
            sa_url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=16
        )
        prepare(engine, options.get("synchronous", "NORMAL"))
        return engine
    # Last in, first out: a process that needs one connection at a time keeps using the same one,
    # whose server process has the tables' catalog entries and the driver's prepared statements
    # at hand (a first statement on a fresh connection costs milliseconds more).
    engine = sa.create_engine(sa_url, pool_size=8, max_overflow=16, pool_use_lifo=True)
    # Its own pool of autocommit connections: switching a pooled connection in and out of
    # autocommit costs more than the one-statement operations that want it.
    _autocommit[engine] = sa.create_engine(
        sa_url, pool_size=8, max_overflow=16, pool_use_lifo=True, isolation_level="AUTOCOMMIT"
    )
    _kept[engine] = KeptConnection(engine)
    return engine


class KeptConnection:
    """A driver connection in autocommit that an engine keeps for one-statement reads (PostgreSQL).

    A metrics read is one short statement; taking a connection from the pool and giving it back
    cost more than the statement itself under load. One thread at a time reads on it; the others
    go to the pool. A connection that fails is dropped, and a read whose connection had been
    lost (a restarted server) runs once more on a new one: a read changes nothing.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._connection: Any = None

    def run(self, work: Callable[[Any], T], otherwise: Callable[[], T]) -> T:
        """``work(connection)`` on the kept connection, or ``otherwise()`` if another thread has it."""
        if not self._lock.acquire(blocking=False):
            return otherwise()
        try:
            fresh = self._connection is None
            if fresh:
                self._connection = self._connect()
            try:
                return work(self._connection)
            except self._engine.dialect.loaded_dbapi.Error as error:
                lost = self._engine.dialect.is_disconnect(error, self._connection, None)
                self._discard()
                if not lost or fresh:
                    raise
            self._connection = self._connect()
            return work(self._connection)
        except BaseException:
            self._discard()  # failed or interrupted in the middle of a statement: not fit to keep
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the connection, if there is one (after the read in progress, if it ends soon)."""
        if self._lock.acquire(timeout=5):
            try:
                self._discard()
            finally:
                self._lock.release()

    def forget(self) -> None:
        """In a forked child: leave the parent's connection alone, open, and never use it."""
        self._lock = threading.Lock()
        if self._connection is not None:
            # Kept referenced: collected, it would only warn that it was never closed (psycopg
            # does not close a connection in another process than the one that opened it).
            _inherited.append(self._connection)
        self._connection = None

    def _connect(self) -> Any:
        dialect = self._engine.dialect
        args, kwargs = dialect.create_connect_args(self._engine.url)
        connection = dialect.connect(*args, **kwargs)
        connection.autocommit = True
        return connection

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()


def kept(engine: Engine) -> KeptConnection | None:
    """The connection kept for reads of an engine made from a URL (PostgreSQL), else None."""
    return _kept.get(engine)


def autocommit(engine: Engine) -> Engine:
    """An engine on the same database whose connections are in autocommit (PostgreSQL)."""
    return _autocommit.get(engine) or engine.execution_options(isolation_level="AUTOCOMMIT")


def acquire(sa_url: str, options: dict[str, str]) -> Engine:
    """The process's engine for this URL, made on first use; pair with :func:`release`."""
    key = f"{sa_url}#{sorted(options.items())}"
    with _lock:
        engine, users = _shared.get(key) or (_create(sa_url, options), 0)
        _shared[key] = (engine, users + 1)
        return engine


def release(engine: Engine) -> None:
    """One user less; the last one closes the pooled connections (the engine stays for reuse)."""
    last = None
    with _lock:
        for key, (shared, users) in _shared.items():
            if shared is engine:
                _shared[key] = (shared, users - 1)
                if users == 1:
                    shared.dispose()
                    if shared in _autocommit:
                        _autocommit[shared].dispose()
                    last = _kept.get(shared)
                break
    if last is not None:  # outside the lock: it may wait for a read in progress
        last.close()


def _forget_in_child() -> None:
    """A forked child must not use its parent's pooled connections: it opens its own."""
    global _lock
    _lock = threading.Lock()
    for engine, _ in _shared.values():
        engine.dispose(close=False)
    for sibling in _autocommit.values():
        sibling.dispose(close=False)
    for connection in _kept.values():
        connection.forget()
    for engine in list(_writers):
        _writers[engine] = threading.Lock()


def _close_kept() -> None:
    """At exit: close the kept connections this process opened, as a pool's would be."""
    for connection in list(_kept.values()):
        connection.close()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_close_kept)
