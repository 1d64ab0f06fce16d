"""The Redis backend: sender queues in Redis (or Redis Cluster), one Lua script per operation."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError
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

from ._scripts import SCRIPTS, STATES, LuaScript

__all__ = ["RedisBackend", "key_prefix"]

Client: TypeAlias = "redis.Redis | RedisCluster"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_PURGE_BATCH = 2000  # messages forgotten per script call, so a big purge never blocks Redis for long
_OPTIONS = ("namespace", "cluster")  # our own URL query options; the rest go to redis-py


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // _US


def _time(us: bytes | int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def key_prefix(namespace: str) -> str:
    """The prefix of every key of a namespace: ``sq:{<namespace>}:``.

    The braces make the namespace the Redis Cluster hash tag, so all its keys share one
    slot; the namespace is percent-encoded, so no namespace can close the tag early or
    spell another's prefix.
    """
    return "sq:{" + quote(namespace, safe="") + "}:"


def _policy(retry: RetryPolicy) -> list[str | int]:
    return [
        retry.min_backoff // _US,
        retry.max_backoff // _US,
        retry.max_attempts,
        retry.max_lifetime // _US,
        repr(retry.jitter),
        str(retry.seed),
    ]


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


def _split_url(url: str) -> tuple[str, str, bool | None]:
    """(URL for redis-py, namespace, cluster: True, False or None to ask the server)."""
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
    rest = urlencode([q for q in query if q[0] not in _OPTIONS])
    return urlunsplit(parts._replace(query=rest)), namespace, cluster


class RedisBackend:
    """Sender queues in Redis or Redis Cluster, shared by any number of processes.

    ``SenderQueue.open("redis://host:6379/0?namespace=shop")`` makes one from a URL
    (``?cluster=true`` or ``false`` skips asking the server whether it is a cluster);
    ``RedisBackend(client, namespace="shop")`` wraps a ``redis.Redis`` or
    ``redis.cluster.RedisCluster`` you made (with ``decode_responses=False``, the default).

    Every key of a namespace carries the namespace as its hash tag (see :func:`key_prefix`),
    so each operation is one Lua script on one slot, atomic on a single server and on a cluster.

    Attributes:
        client: the redis-py client.
        namespace: the namespace; queues of different namespaces never see each other.
    """

    def __init__(self, client: Client, namespace: str = "default", *, _shared_url: str | None = None) -> None:
        if client.get_encoder().decode_responses:
            raise InvalidArgument("the Redis client must return bytes: make it with decode_responses=False")
        if not namespace:
            raise InvalidArgument("namespace must not be empty")
        self.client = client
        self.namespace = namespace
        self._prefix = key_prefix(namespace)
        self._anchor = self._prefix + "seq"  # KEYS[1] of every script: routes it to the namespace's slot
        self._shared_url = _shared_url
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """The factory behind ``redis://`` and ``rediss://``; one client per URL is shared in a process."""
        base, namespace, cluster = _split_url(url)
        client = _acquire(base, cluster)
        return cls(client, namespace, _shared_url=base)

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except RedisError as error:
            raise BackendError(f"Redis failed: {type(error).__name__}: {error}") from error

    def _run(self, script: LuaScript, *args: str | int | bytes) -> Any:
        with self._translated():
            try:
                return self.client.evalsha(script.sha, 1, self._anchor, self._prefix, *args)
            except NoScriptError:
                # NOSCRIPT means it did not run: load it (on every node of a cluster) and run it once.
                self.client.script_load(script.source)
                return self.client.evalsha(script.sha, 1, self._anchor, self._prefix, *args)

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
        """Settle the sender's expired leases, then claim its oldest due messages, in one script."""
        expires_at = now + lease
        reply = self._run(SCRIPTS["claim"], _us(now), sender, limit, _us(expires_at), *_policy(retry))
        claims = []
        for i in range(0, len(reply), 10):
            message_id, mailing, recipient, mail_from, content, attempts, due, error, created, token = reply[
                i : i + 10
            ]
            message = Message(
                id=message_id.decode(),
                mailing=mailing.decode(),
                sender=sender,
                recipient=recipient.decode(),
                mail_from=mail_from.decode(),
                content=content,
                state=State.SENDING,
                frozen_from=None,
                attempts=attempts,
                next_attempt_at=_time(due),
                last_error=_text(error),
                created_at=_time(created),
                updated_at=now,
            )
            claims.append(Claim(message=message, token=token.decode(), expires_at=expires_at))
        return claims

    def settle(
        self, settlements: Sequence[Settlement], now: datetime, retry: RetryPolicy
    ) -> list[LeaseLost | None]:
        """Settle every claim of the batch in one script."""
        args: list[str | int | bytes] = [_us(now), *_policy(retry)]
        for settlement in settlements:
            error = settlement.error
            args += [
                settlement.claim.message.id,
                settlement.claim.token,
                settlement.trigger.value,
                "" if error is None else "=" + error,
            ]
        reply = self._run(SCRIPTS["settle"], *args)
        return [
            LeaseLost(s.claim.message.id) if lost else None
            for s, lost in zip(settlements, reply, strict=True)
        ]

    def renew(self, claim: Claim, lease: timedelta, now: datetime) -> Claim:
        """Extend a valid claim's lease; raises ``LeaseLost``."""
        expires_at = now + lease
        if not self._run(SCRIPTS["renew"], claim.message.id, claim.token, _us(expires_at)):
            raise LeaseLost(claim.message.id)
        return Claim(message=claim.message, token=claim.token, expires_at=expires_at)

    def expire_leases(self, now: datetime, retry: RetryPolicy) -> int:
        """Settle every sender's expired leases in one script."""
        settled: int = self._run(SCRIPTS["expire"], _us(now), *_policy(retry))
        return settled

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
        purged = 0
        while True:
            count, more = self._run(SCRIPTS["purge"], _us(older_than), _PURGE_BATCH)
            purged += int(count)
            if not more:
                return purged

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
