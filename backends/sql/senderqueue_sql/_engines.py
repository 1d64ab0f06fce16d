"""Engines from backend URLs: the driver settings each engine needs, shared within a process."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from senderqueue import InvalidArgument

__all__ = ["READ", "acquire", "autocommit", "parse_url", "prepare", "release", "writer_lock"]

READ = "senderqueue_read"
"""Execution option of a one-statement read: it runs in autocommit, without a transaction of its own."""

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_prepared: weakref.WeakSet[Engine] = weakref.WeakSet()
_writers: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_autocommit: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
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
    return engine


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
    with _lock:
        for key, (shared, users) in _shared.items():
            if shared is engine:
                _shared[key] = (shared, users - 1)
                if users == 1:
                    shared.dispose()
                    if shared in _autocommit:
                        _autocommit[shared].dispose()
                return


def _forget_in_child() -> None:
    """A forked child must not use its parent's pooled connections: it opens its own."""
    global _lock
    _lock = threading.Lock()
    for engine, _ in _shared.values():
        engine.dispose(close=False)
    for sibling in _autocommit.values():
        sibling.dispose(close=False)
    for engine in list(_writers):
        _writers[engine] = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
