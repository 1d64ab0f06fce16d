"""The Redis backend: sender queues in Redis (or Redis Cluster), changed by short atomic Lua scripts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.retry import Retry

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
    UnknownMessage,
)

from ._scripts import LAYOUT, SCRIPTS, STATES, LuaScript

__all__ = ["DEFAULT_BATCH", "RedisBackend", "key_prefix"]

Client: TypeAlias = "redis.Redis | RedisCluster"

_log = logging.getLogger("senderqueue.redis")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_PURGE_BATCH = 200  # messages forgotten per script (about 1 ms), so a big purge never blocks Redis for long
DEFAULT_BATCH = 20
"""Messages a script claims or expires at most, unless ``batch=`` says otherwise.

Redis runs one script at a time, so every other client (a metrics read, another worker) may wait
for the longest one; at 20 messages a script holds Redis for about 0.13 ms. A larger claim or
expiry is a sequence of such scripts, as even as can be, each atomic on its own; a report is
always one script.
"""
_NO_LIMIT = 2**31  # a batch this large is no limit (and a larger count is not an integer to Redis's Lua)
_OPTIONS = ("namespace", "cluster", "batch")  # our own URL query options; the rest go to redis-py


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // _US


def _time(us: bytes | int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _score_time(us: bytes) -> datetime:
    """A time a claim read as a sorted-set score: Redis 7.2+ may spell a round one ``1.7e+15``.

    Scores are integers below 2**53, so the float is exact.
    """
    return _EPOCH + timedelta(microseconds=int(float(us)))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _even(total: int, most: int) -> int:
    """The size of the fewest equal parts of ``total``, none over ``most``: (100, 37) -> 34."""
    parts = -(-total // most)
    return -(-total // parts) if parts else most


def key_prefix(namespace: str) -> str:
    """The prefix of every key of a namespace: ``sq:{<namespace>}:``.

    The braces make the namespace the Redis Cluster hash tag, so all its keys share one
    slot; the namespace is percent-encoded, so no namespace can close the tag early or
    spell another's prefix.
    """
    return "sq:{" + quote(namespace, safe="") + "}:"


def _policy_arguments(retry: RetryPolicy) -> tuple[str | int, ...]:
    return (
        retry.min_backoff // _US,
        retry.max_backoff // _US,
        retry.max_attempts,
        retry.max_lifetime // _US,
        repr(retry.jitter),
        str(retry.seed),
    )


_clients_lock = threading.Lock()
_clients: dict[str, tuple[Client, int]] = {}  # URL less our options -> (client, backends using it)


def _acquire(base: str, cluster: bool | None) -> Client:
    """The process's client for a URL, made on first use: opening a backend costs no connection."""
    with _clients_lock:
        found = _clients.get(base)
        if found is not None:
            _clients[base] = (found[0], found[1] + 1)
            return found[0]
        client = _connect(base, cluster)
        _clients[base] = (client, 1)
        return client


def _release(base: str) -> None:
    """One backend fewer uses the URL's client; the last one closes its connections."""
    with _clients_lock:
        client, users = _clients[base]
        if users > 1:
            _clients[base] = (client, users - 1)
            return
        del _clients[base]
    client.close()


def _connect(base: str, cluster: bool | None) -> Client:
    # No automatic retry: a script whose reply was lost may have run, and running it again
    # would enqueue or settle twice. The caller sees BackendError and decides.
    no_retry = Retry(NoBackoff(), 0)
    try:
        if cluster is None:
            probe = redis.Redis.from_url(base, retry=no_retry)
            try:
                cluster = bool(probe.info("cluster").get("cluster_enabled"))
            finally:
                probe.close()
        if cluster:
            return RedisCluster.from_url(base, retry=no_retry)
        return redis.Redis.from_url(base, retry=no_retry)
    except RedisError as error:
        raise BackendError(f"cannot connect to Redis at {base}: {error}") from error


def _split_url(url: str) -> tuple[str, str, bool | None, int]:
    """(URL for redis-py, namespace, cluster: True, False or None to ask the server, batch)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise InvalidArgument(f"{url!r} is not a redis:// or rediss:// URL")
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = dict(q for q in query if q[0] in _OPTIONS)
    namespace = options.get("namespace", "default")
    if not namespace:
        raise InvalidArgument("namespace must not be empty")
    cluster: bool | None = None
    if "cluster" in options:
        flag = options["cluster"].lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidArgument(f"cluster={options['cluster']!r}: use true or false")
        cluster = flag in ("true", "1", "yes")
    batch = options.get("batch", str(DEFAULT_BATCH))
    if not (batch.isascii() and batch.isdigit()):  # "²" is a digit to isdigit(), not to int()
        raise InvalidArgument(f"batch={batch!r}: use a whole number, 0 for no limit")
    rest = urlencode([q for q in query if q[0] not in _OPTIONS])
    return urlunsplit(parts._replace(query=rest)), namespace, cluster, int(batch)


def _rows(reply: list[Any]) -> list[list[Any]]:
    """A claim script's reply, 10 fields a message."""
    return [reply[i : i + 10] for i in range(0, len(reply), 10)]


class _ClaimMaker:
    """Makes the claims of a claim call from its scripts' rows and their contents."""

    def __init__(self, sender: str, now: datetime, expires_at: datetime) -> None:
        self.sender, self.now, self.expires_at = sender, now, expires_at
        self.claims: list[Claim] = []
        self.times: dict[bytes, datetime] = {}  # a batch enqueued together shares its times

    def _time(self, score: bytes) -> datetime:
        moment = self.times.get(score)
        if moment is None:
            moment = self.times[score] = _score_time(score)
        return moment

    def add(self, rows: list[list[Any]], contents: list[bytes | None]) -> None:
        for row, content in zip(rows, contents, strict=True):
            if content is None:
                # Purged since its claim: the lease had expired, been settled and the message
                # forgotten, so this claim was lost already.
                continue
            message_id, mailing, _, attempts, due, recipient, mail_from, error, created, token = row
            message = Message(
                id=message_id.decode(),
                mailing=mailing.decode(),
                sender=self.sender,
                recipient=recipient.decode(),
                mail_from=mail_from.decode(),
                content=content,
                state=State.SENDING,
                frozen_from=None,
                attempts=attempts,
                next_attempt_at=self._time(due),
                last_error=_text(error),
                created_at=self._time(created),
                updated_at=self.now,
            )
            self.claims.append(Claim(message=message, token=token.decode(), expires_at=self.expires_at))


class RedisBackend:
    """Sender queues in Redis or Redis Cluster, shared by any number of processes.

    ``SenderQueue.open("redis://host:6379/0?namespace=shop")`` makes one from a URL
    (``?cluster=true`` or ``false`` skips asking the server whether it is a cluster;
    ``?batch=N`` sets :attr:`batch`); ``RedisBackend(client, namespace="shop")`` wraps a
    ``redis.Redis`` or ``redis.cluster.RedisCluster`` you made (with ``decode_responses=False``,
    the default).

    Every key of a namespace carries the namespace as its hash tag (see :func:`key_prefix`),
    so each script runs on one slot, atomic on a single server and on a cluster.

    Attributes:
        client: the redis-py client.
        namespace: the namespace; queues of different namespaces never see each other.
        batch: the most messages one script claims or expires (:data:`DEFAULT_BATCH`); a
            larger claim or expiry runs as several scripts, each atomic on its own, so that no
            client waits long behind one, and returns what they did. 0: one script per call,
            however large. A report is one script whatever its size.
    """

    def __init__(
        self,
        client: Client,
        namespace: str = "default",
        *,
        batch: int = DEFAULT_BATCH,
        _shared_url: str | None = None,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise InvalidArgument("the Redis client must return bytes: make it with decode_responses=False")
        if not namespace:
            raise InvalidArgument("namespace must not be empty")
        if type(batch) is not int or batch < 0:  # not a bool either
            raise InvalidArgument(f"batch must be a whole number, 0 for no limit, not {batch!r}")
        self.client = client
        self.namespace = namespace
        self.batch = batch
        # What a script is given: "no limit" is a very large one, and Redis takes no larger count.
        self._batch = min(batch or _NO_LIMIT, _NO_LIMIT)
        self._prefix = key_prefix(namespace)
        self._anchor = self._prefix + "seq"  # KEYS[1] of every script: routes it to the namespace's slot
        self._shared_url = _shared_url
        self._closed = False
        # A client made from a URL for one Redis is driven through its pool directly (see _execute).
        self._pool: ConnectionPool | None = None
        if _shared_url is not None and isinstance(client, redis.Redis):
            self._pool = client.connection_pool
        self._policy_args: tuple[RetryPolicy, tuple[str | int, ...]] | None = None
        self._layout_known = False  # checked by the first script: opening costs no connection

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """The factory behind ``redis://`` and ``rediss://``; one client per URL is shared in a process."""
        base, namespace, cluster, batch = _split_url(url)
        client = _acquire(base, cluster)
        return cls(client, namespace, batch=batch, _shared_url=base)

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except RedisError as error:
            raise BackendError(f"Redis failed: {type(error).__name__}: {error}") from error

    def _policy(self, retry: RetryPolicy) -> tuple[str | int, ...]:
        """The policy as script arguments; a queue passes the same one every time."""
        cached = self._policy_args
        if cached is None or cached[0] is not retry:
            cached = self._policy_args = (retry, _policy_arguments(retry))
        return cached[1]

    def _execute(self, *command: str | int | bytes) -> Any:
        """Send one command and return its reply (RedisError if it fails).

        A client this backend made from a URL, for one Redis, is driven through its connection
        pool: redis-py's command path (retries, hooks, metrics) costs more per call than a small
        script does in Redis, and all of it is off for these clients anyway.
        """
        pool = self._pool
        if pool is None:
            return self.client.execute_command(*command)  # type: ignore[no-untyped-call]
        connection = pool.get_connection()
        try:
            connection.send_command(*command)  # type: ignore[no-untyped-call]
            return connection.read_response()
        except ResponseError:
            raise  # an error reply: the connection is still in step
        except BaseException:
            # A reply may be on its way: never reuse this connection.
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(connection)

    def _check_layout(self) -> None:
        """Refuse a namespace written in another key layout (see ``LAYOUT``); mark a new one."""
        found = None
        self._layout_known = True  # the layout script runs through _run too
        try:
            found = int(self._run(SCRIPTS["layout"], LAYOUT))
        finally:
            self._layout_known = found == LAYOUT
        if found != LAYOUT:
            raise BackendError(
                f"namespace {self.namespace!r} holds keys of layout {found}, and this senderqueue-redis "
                f"reads layout {LAYOUT}: drain it with the version that wrote it, or destroy() it"
            )

    def _run(self, script: LuaScript, *args: str | int | bytes) -> Any:
        if not self._layout_known:
            self._check_layout()
        with self._translated():
            try:
                return self._execute(*self._script_call(script, *args))
            except NoScriptError:
                # NOSCRIPT means it did not run (the cache was flushed, or Redis restarted): run it
                # by its source, which also caches it, whatever another client flushes meanwhile.
                return self._execute(*self._script_call(script, *args, by_source=True))

    # -- changes --------------------------------------------------------------------

    def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> list[str]:
        """Store the batch in one script: all of it, or none if an id is taken."""
        args: list[str | int | bytes] = [_us(now), len(messages)]
        ids: list[str] = []
        for message in messages:
            message_id: str = message.message_id  # type: ignore[assignment]  # set by the core
            ids.append(message_id)
            args += [
                message_id,
                message.mailing,
                message.sender,
                message.recipient,
                message.mail_from,
                message.content,
            ]
        reply = self._run(SCRIPTS["enqueue"], *args)
        if reply[0] == b"dup":
            raise DuplicateMessage(reply[1].decode())
        return ids

    def claim(
        self, sender: str, limit: int, lease: timedelta, now: datetime, retry: RetryPolicy
    ) -> list[Claim]:
        """Settle the sender's expired leases, then claim its oldest due messages.

        Expired leases are settled :attr:`batch` to a script (whatever ``limit``), until none is
        left; the last of those scripts goes on to claim. A script claims at most :attr:`batch`
        messages (oldest first, atomically); a larger ``limit`` takes them a batch at a time until
        it has ``limit`` or none is left. If Redis fails after the first batch, the call returns
        the claims already made (fewer than ``limit``, as a claim may), so that what it did is
        what it says. The contents never change and are keyed by enqueue seq (so what is read is
        always the claimed message's own): they are read natively (MGET), each batch's in the
        round trip of the next script, while the messages of the batch before are made.
        """
        expires_at = now + lease
        head = (_us(now), sender)
        tail = (_us(expires_at), *self._policy(retry))
        size = _even(limit, self._batch)
        want = min(limit, size)
        reply: Any = -1
        settled = False  # a batch of expired leases
        while reply == -1:  # -1: it settled a batch of expired leases, and more may be left
            try:
                reply = self._run(SCRIPTS["claim"], *head, want, *tail, self._batch)
            except BackendError as failure:
                if not settled:
                    raise
                _log.warning("claim for sender %r settled expired leases, then stopped: %s", sender, failure)
                return []
            settled = True
        made = _ClaimMaker(sender, now, expires_at)
        unread = _rows(reply)  # claimed rows whose contents are not read yet
        taken = len(unread)
        more = taken == want < limit
        try:
            if self._pool is None:
                while more:
                    want = min(limit - taken, size)
                    batch = _rows(self._run(SCRIPTS["claim"], *head, want, *tail, 0))
                    unread += batch
                    taken += len(batch)
                    more = len(batch) == want and taken < limit
            else:
                self._claim_pipelined(made, unread, limit, size, head, tail)
        except BackendError as failure:
            if not (made.claims or unread):
                raise
            got = len(made.claims) + len(unread)
            _log.warning("claim for sender %r stopped after %d messages: %s", sender, got, failure)
        if unread:
            try:
                with self._translated():
                    made.add(unread, self._execute(*self._content_keys(unread)))
            except BackendError as failure:
                # Claimed, but their contents could not be read: they come back when their lease
                # expires, as after a crashed worker (or a claim whose reply was lost).
                if not made.claims:
                    raise BackendError(
                        f"{failure} ({len(unread)} messages were claimed before the failure: they "
                        "come back when their lease expires, as after a crashed worker)"
                    ) from failure
                _log.warning(
                    "claim for sender %r returns %d claims; %d more are held until their lease expires: %s",
                    sender,
                    len(made.claims),
                    len(unread),
                    failure,
                )
        return made.claims

    def _claim_pipelined(
        self,
        made: _ClaimMaker,
        unread: list[list[Any]],
        limit: int,
        size: int,
        head: tuple[int, str],
        tail: tuple[str | int, ...],
    ) -> None:
        """Claim batch after batch on one connection, each batch's contents read in the round trip
        of the next script. ``unread`` holds the claimed rows whose contents are not read yet,
        also when this fails."""
        assert self._pool is not None
        pool = self._pool
        taken = len(unread)
        more = taken < limit and taken == min(limit, size)
        script = SCRIPTS["claim"]
        with self._translated():
            connection = pool.get_connection()
            try:
                while more:
                    want = min(limit - taken, size)
                    args = (*head, want, *tail, 0)
                    commands = [self._content_keys(unread), self._script_call(script, *args)]
                    packed = connection.pack_commands(commands)  # type: ignore[no-untyped-call]
                    connection.send_packed_command(packed)  # type: ignore[no-untyped-call]
                    made.add(unread, connection.read_response())
                    unread.clear()
                    try:
                        reply = connection.read_response()
                    except NoScriptError:  # flushed meanwhile: it did not run
                        by_source = self._script_call(script, *args, by_source=True)
                        connection.send_command(*by_source)  # type: ignore[no-untyped-call]
                        reply = connection.read_response()
                    batch = _rows(reply)
                    unread += batch
                    taken += len(batch)
                    more = len(batch) == want and taken < limit
            except BaseException:
                # Replies may be on their way: never reuse this connection.
                connection.disconnect()  # type: ignore[no-untyped-call]
                raise
            finally:
                pool.release(connection)

    def _script_call(
        self, script: LuaScript, *args: str | int | bytes, by_source: bool = False
    ) -> tuple[str | int | bytes, ...]:
        """The command that runs ``script`` on the namespace's slot: by SHA, or by its source."""
        if by_source:
            return ("EVAL", script.source, 1, self._anchor, self._prefix, *args)
        return ("EVALSHA", script.sha, 1, self._anchor, self._prefix, *args)

    def _content_keys(self, rows: list[list[Any]]) -> tuple[str, ...]:
        """MGET of the content keys that claimed rows name by seq."""
        key = self._prefix + "b:"
        return ("MGET", *[key + str(row[2]) for row in rows])

    def settle(
        self, settlements: Sequence[Settlement], now: datetime, retry: RetryPolicy
    ) -> list[LeaseLost | None]:
        """Settle the claims in one script: all of them, atomically, whatever :attr:`batch` says."""
        args: list[str | int | bytes] = [_us(now), *self._policy(retry)]
        for claim, trigger, error in settlements:
            # A Trigger is a str: its value goes to Redis as it is.
            args += (claim.message.id, claim.token, trigger, "" if error is None else "=" + error)
        reply = self._run(SCRIPTS["settle"], *args)
        return [
            LeaseLost(settled.claim.message.id) if lost else None
            for settled, lost in zip(settlements, reply, strict=True)
        ]

    def renew(self, claim: Claim, lease: timedelta, now: datetime) -> Claim:
        """Extend a valid claim's lease; raises ``LeaseLost``."""
        expires_at = now + lease
        if not self._run(SCRIPTS["renew"], claim.message.id, claim.token, _us(expires_at)):
            raise LeaseLost(claim.message.id)
        return Claim(message=claim.message, token=claim.token, expires_at=expires_at)

    def expire_leases(self, now: datetime, retry: RetryPolicy) -> int:
        """Settle every sender's expired leases, :attr:`batch` to a script."""
        policy = self._policy(retry)
        return self._repeat("expiry of leases", SCRIPTS["expire"], _us(now), *policy, self._batch)

    def freeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Set the frozen flag of the sender queue(s), and of the mailing if no sender is named."""
        moved: int = self._run(SCRIPTS["set_frozen"], _us(now), mailing, sender or "", "1")
        return moved

    def unfreeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Clear the frozen flag of the sender queue(s), and of the mailing if no sender is named."""
        moved: int = self._run(SCRIPTS["set_frozen"], _us(now), mailing, sender or "", "0")
        return moved

    def clear(self, mailing: str, sender: str | None, now: datetime) -> int:
        """Start a new epoch in each targeted sender queue; its queued messages become DELETED."""
        moved: int = self._run(SCRIPTS["clear"], _us(now), mailing, sender or "")
        return moved

    def purge(self, older_than: datetime) -> int:
        """Forget terminal messages, a batch per script, so Redis is never blocked for long."""
        return self._repeat("purge", SCRIPTS["purge"], _us(older_than), _PURGE_BATCH)

    def _repeat(self, what: str, script: LuaScript, *args: str | int | bytes) -> int:
        """Run a script that does a batch and answers (count, more) until no more is left.

        If Redis fails after the first script, the count so far is returned: the call did that
        much, and says so (the rest is left for the next call).
        """
        done = 0
        first = True
        while True:
            try:
                count, more = self._run(script, *args)
            except BackendError as failure:
                if first:
                    raise
                _log.warning("%s stopped after %d messages: %s", what, done, failure)
                return done
            first = False
            done += int(count)
            if not more:
                return done

    # -- reads ----------------------------------------------------------------------

    def _queues(self, mailing: str, sender: str | None) -> Iterator[tuple[str, Metrics]]:
        reply = self._run(SCRIPTS["metrics"], mailing, sender or "")
        for i in range(0, len(reply), 8):
            name, frozen, new, retries, sending, delivered, failed, deleted = reply[i : i + 8]
            yield (
                name.decode(),
                Metrics.of_sender_queue(
                    frozen=frozen == b"1",
                    new=int(new),
                    retries=int(retries),
                    sending=int(sending),
                    delivered=int(delivered),
                    failed=int(failed),
                    deleted=int(deleted),
                ),
            )

    def metrics(self, mailing: str, sender: str | None) -> Metrics:
        """The counters of the mailing's sender queues (or one), summed: O(sender queues)."""
        total = Metrics()
        for _, metrics in self._queues(mailing, sender):
            total += metrics
        return total

    def metrics_by_sender(self, mailing: str) -> dict[str, Metrics]:
        """The counters of each sender queue of the mailing."""
        return dict(self._queues(mailing, None))

    def get(self, message_id: str) -> Message:
        """The message, its state derived from its sender queue's flag and epoch."""
        reply = self._run(SCRIPTS["get"], message_id)
        if reply is None:
            raise UnknownMessage(message_id)
        mailing, sender, recipient, mail_from, content, state, frozen_from, attempts, due, error = reply[:10]
        created, updated = reply[10:]
        return Message(
            id=message_id,
            mailing=mailing.decode(),
            sender=sender.decode(),
            recipient=recipient.decode(),
            mail_from=mail_from.decode(),
            content=content,
            state=STATES[state.decode()],
            frozen_from=None if frozen_from is None else STATES[frozen_from.decode()],
            attempts=int(attempts),
            next_attempt_at=_time(due),
            last_error=_text(error),
            created_at=_time(created),
            updated_at=_time(updated),
        )

    # -- lifetime -------------------------------------------------------------------

    def destroy(self) -> None:
        """Delete every key of the namespace (SCAN by prefix; for tests and teardown, not hot paths)."""
        with self._translated():
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=self._prefix + "*", count=10_000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._unlink(batch)
                    batch = []
            if batch:
                self._unlink(batch)

    def _unlink(self, keys: list[bytes]) -> None:
        # All keys of a namespace share its slot, so one multi-key UNLINK is allowed on a cluster too.
        self.client.unlink(*keys)

    def close(self) -> None:
        """Give back the shared client; the last backend of a URL closes its connections."""
        if self._closed:
            return
        self._closed = True
        if self._shared_url is not None:
            _release(self._shared_url)
