"""The tables of one namespace, and the versioned list of migrations that builds them.

Every table name carries the namespace (``sq_<namespace>_messages``), so namespaces
share a database and never see each other. A message stores only NEW, RETRIES,
SENDING or a verdict; FROZEN and cleared-DELETED are derived from its sender
queue's ``frozen`` flag and ``epoch``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Tables", "check_namespace", "tables"]

# Stored message states; FROZEN is never stored (the sender queue's flag says it).
NEW, RETRIES, SENDING, DELIVERED, FAILED, DELETED = 1, 2, 3, 4, 5, 6

_NAMESPACE = re.compile(r"[a-z0-9_]{1,40}")


def check_namespace(namespace: str) -> str:
    """A namespace is 1 to 40 of ``a-z 0-9 _``: it becomes part of table names."""
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must be 1 to 40 characters of a-z, 0-9 and _, not {namespace!r}")
    return namespace


_ID = sa.String(255)
# SQLite makes an INTEGER PRIMARY KEY the rowid: ordered, and free to allocate.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Tables:
    """The SQLAlchemy Core tables of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = prefix = f"sq_{namespace}_"
        self.metadata = metadata = sa.MetaData()
        self.meta = sa.Table(
            f"{prefix}meta",
            metadata,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(255), nullable=False),
        )
        self.mailings = sa.Table(
            f"{prefix}mailings",
            metadata,
            sa.Column("mailing", _ID, primary_key=True),
            sa.Column("frozen", sa.Boolean, nullable=False),
        )
        self.queues = sa.Table(
            f"{prefix}queues",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("mailing", _ID, nullable=False),
            sa.Column("sender", _ID, nullable=False),
            sa.Column("frozen", sa.Boolean, nullable=False),
            sa.Column("changed_at", sa.BigInteger, nullable=False),  # when `frozen` last changed
            sa.Column("epoch", sa.Integer, nullable=False),  # bumped by each clear
            sa.UniqueConstraint("mailing", "sender"),
            sa.Index(f"{prefix}queues_sender", "sender"),
        )
        # The counts of each sender queue, as the sum of its rows. SQLite has one writer at a time
        # and one row per queue (slot 0). On PostgreSQL a writer adds to a row no other writer
        # holds at that moment, and makes a new one if they all are held: the queue has as many
        # rows as it has seen concurrent writers, and writers do not wait for each other's commits.
        self.counts = sa.Table(
            f"{prefix}counts",
            metadata,
            sa.Column("queue_id", sa.Integer, primary_key=True),
            sa.Column("slot", sa.SmallInteger, primary_key=True),
            *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTS),
        )
        # clears(queue, epoch): the clear that ended that epoch, for the derived `updated_at`.
        self.clears = sa.Table(
            f"{prefix}clears",
            metadata,
            sa.Column("queue_id", sa.Integer, primary_key=True),
            sa.Column("epoch", sa.Integer, primary_key=True),
            sa.Column("cleared_at", sa.BigInteger, nullable=False),
        )
        ready = sa.text(f"state IN ({NEW}, {RETRIES})")
        sending = sa.text(f"state = {SENDING}")
        self.messages = sa.Table(
            f"{prefix}messages",
            metadata,
            # Enqueue order. The primary key on SQLite (the rowid); on PostgreSQL version 4 makes
            # ``id`` the primary key instead (see ``_v4``).
            sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
            sa.Column("id", _ID, nullable=False, unique=True),
            sa.Column("queue_id", sa.Integer, nullable=False),
            sa.Column("recipient", sa.String(254), nullable=False),
            sa.Column("mail_from", sa.String(254), nullable=False),
            sa.Column("state", sa.SmallInteger, nullable=False),
            sa.Column("claimed_from", sa.SmallInteger, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("due", sa.BigInteger, nullable=False),  # next attempt time
            sa.Column("epoch", sa.Integer, nullable=False),
            sa.Column("last_error", sa.Text),
            sa.Column("created_at", sa.BigInteger, nullable=False),
            sa.Column("updated_at", sa.BigInteger, nullable=False),
            sa.Column("token", sa.BigInteger),
            sa.Column("expires_at", sa.BigInteger),
            # Only queued messages are in the claim index: history never slows a claim down.
            # A cleared queue's old messages sit under an older epoch, outside the claim's range.
            sa.Index(
                f"{prefix}messages_ready",
                "queue_id",
                "epoch",
                "due",
                "seq",
                sqlite_where=ready,
                postgresql_where=ready,
            ),
            sa.Index(
                f"{prefix}messages_leases", "expires_at", sqlite_where=sending, postgresql_where=sending
            ),
        )
        # Content lives beside the message, keyed by its seq: claims and reports rewrite the
        # message row several times, and a row that carried the content would be copied each time.
        self.contents = sa.Table(
            f"{prefix}contents",
            metadata,
            sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
            sa.Column("content", sa.LargeBinary, nullable=False),
        )
        # Terminal messages by age, for purge: made by migration 2 in plain DDL, so that it stays
        # out of `metadata` (which migration 1 creates whole).
        self.terminal_index = f"{prefix}messages_terminal"


COUNTS = ("new", "retries", "sending", "delivered", "failed", "deleted")


@cache
def tables(namespace: str) -> Tables:
    """The tables of a namespace, built once per process."""
    return Tables(check_namespace(namespace))


def _v1(conn: Connection, t: Tables) -> None:
    """Version 1: the tables as declared above, with the claim and lease indexes.

    Later migrations inspect before they change: on a namespace this version made, the
    tables already have their latest shape.
    """
    t.metadata.create_all(conn, checkfirst=False)


def _v2(conn: Connection, t: Tables) -> None:
    """Version 2: an index of terminal messages by age, so purge does not scan the queue."""
    conn.execute(
        sa.text(
            f"CREATE INDEX {t.terminal_index} ON {t.messages.name} (updated_at) WHERE state >= {DELIVERED}"
        )
    )


def _v3(conn: Connection, t: Tables) -> None:
    """Version 3: content moves out of the message row, into its own table."""
    if "content" not in {column["name"] for column in sa.inspect(conn).get_columns(t.messages.name)}:
        return  # made by this code's version 1, which declares the contents table
    t.contents.create(conn, checkfirst=True)
    copy = f"INSERT INTO {t.contents.name} (seq, content) SELECT seq, content FROM {t.messages.name}"
    conn.execute(sa.text(copy))
    conn.execute(sa.text(f"ALTER TABLE {t.messages.name} DROP COLUMN content"))


def _v4(conn: Connection, t: Tables) -> None:
    """Version 4, PostgreSQL: the message id becomes the primary key.

    ``seq`` keeps the enqueue order and keys the contents, but no index of its own: every update
    of a message row (a claim, a report) writes a new row version into each index, and one index
    fewer took about 6% off a claim and a report of 100. On SQLite ``seq`` is the rowid, which
    costs nothing; the schema stays as it is there.
    """
    if conn.dialect.name != "postgresql":
        return
    m = t.messages.name
    inspector = sa.inspect(conn)
    primary = inspector.get_pk_constraint(m)
    if primary["constrained_columns"] == ["id"]:
        return
    names = [primary["name"]]
    names += [u["name"] for u in inspector.get_unique_constraints(m) if u["column_names"] == ["id"]]
    drops = [name for name in names if name]
    # Builds the id index anew under an exclusive lock of the table: once, on the first open.
    dropped = "".join(f"DROP CONSTRAINT {name}, " for name in drops)
    conn.execute(sa.text(f"ALTER TABLE {m} {dropped}ADD CONSTRAINT {m}_pkey PRIMARY KEY (id)"))


def _v5(conn: Connection, t: Tables) -> None:
    """Version 5: a sender queue's counts become the sum of its rows in ``counts``, one per slot.

    Up to version 4, PostgreSQL writers appended rows to a ``deltas`` table, which processes folded
    into the queue's one ``counts`` row; a read summed both. The deltas are folded in here, for
    the last time, and the table dropped.
    """
    c, deltas = t.counts.name, f"{t.prefix}deltas"
    inspector = sa.inspect(conn)
    if "slot" in {column["name"] for column in inspector.get_columns(c)}:
        return  # made by this code's version 1
    columns = ", ".join(COUNTS)
    old = f"{c}_v4"
    conn.execute(sa.text(f"ALTER TABLE {c} RENAME TO {old}"))
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ALTER INDEX {c}_pkey RENAME TO {old}_pkey"))
    t.counts.create(conn)
    base = f"SELECT queue_id, {columns} FROM {old}"
    had_deltas = inspector.has_table(deltas)
    if had_deltas:
        base += f" UNION ALL SELECT queue_id, {columns} FROM {deltas}"
    sums = ", ".join(f"CAST(SUM({name}) AS BIGINT)" for name in COUNTS)
    conn.execute(
        sa.text(
            f"INSERT INTO {c} (queue_id, slot, {columns}) "
            f"SELECT queue_id, 0, {sums} FROM ({base}) b GROUP BY queue_id"
        )
    )
    conn.execute(sa.text(f"DROP TABLE {old}"))
    if had_deltas:
        conn.execute(sa.text(f"DROP TABLE {deltas}"))


# What v6 moves out of a PostgreSQL message row: what never changes once the message is enqueued.
_ENVELOPE = ("id", "recipient", "mail_from", "created_at")


def _v6(conn: Connection, t: Tables) -> None:
    """Version 6, PostgreSQL: a narrow message row; the envelope moves beside the content.

    Each claim and report writes a new version of the message row and an entry in each of its
    indexes. The id, recipient, mail_from and creation time never change: they move to the
    ``contents`` row, written once, with the id's unique index; the message row keeps what
    claims and reports change, and ``seq`` becomes its primary key. A raw prototype of a claim
    and a report of 100 took 12% less time with ids in enqueue order, 25% less with random ids.
    SQLite updates a row in place and only the indexes whose columns change: it stays as it is.
    """
    if conn.dialect.name != "postgresql":
        return
    m, ct = t.messages.name, t.contents.name
    inspector = sa.inspect(conn)
    if "id" not in {column["name"] for column in inspector.get_columns(m)}:
        return
    primary = inspector.get_pk_constraint(m)["name"]
    statements = [
        f"ALTER TABLE {ct} ADD COLUMN id varchar(255), ADD COLUMN recipient varchar(254), "
        "ADD COLUMN mail_from varchar(254), ADD COLUMN created_at bigint",
        f"UPDATE {ct} SET id = m.id, recipient = m.recipient, mail_from = m.mail_from, "
        f"created_at = m.created_at FROM {m} m WHERE m.seq = {ct}.seq",
        f"ALTER TABLE {ct} "
        + ", ".join(f"ALTER COLUMN {column} SET NOT NULL" for column in _ENVELOPE)
        + f", ADD CONSTRAINT {ct}_id_key UNIQUE (id)",
        f"ALTER TABLE {m} DROP CONSTRAINT {primary}, "
        + ", ".join(f"DROP COLUMN {column}" for column in _ENVELOPE)
        + f", ADD CONSTRAINT {m}_pkey PRIMARY KEY (seq)",
    ]
    for statement in statements:
        conn.execute(sa.text(statement))


MIGRATIONS: list[Callable[[Connection, Tables], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
"""``MIGRATIONS[n]`` takes a namespace from schema version ``n`` to ``n + 1``."""
SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code reads and writes."""
