"""Redis-only behaviour: construction, URLs, scripts, key safety, connection loss."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib.metadata import entry_points

import pytest
import redis
from redis.crc import key_slot

import senderqueue as sq
from senderqueue.testing import ManualClock
from senderqueue.testing.conformance import START, new_message

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("SENDERQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

redis_backend = pytest.importorskip("senderqueue_redis")
RedisBackend = redis_backend.RedisBackend


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A plain client of the test Redis, or a loud skip (a failure in CI)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        if IN_CI:
            pytest.fail(f"CI=true and Redis does not answer at {REDIS_URL}: {error}", pytrace=False)
        pytest.skip(f"!!! NOT TESTED: Redis does not answer at {REDIS_URL}")
    yield client
    client.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    """A fresh namespace; its keys are deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    RedisBackend(client, name).destroy()


def _keys(client: redis.Redis, namespace: str) -> list[bytes]:
    return list(client.scan_iter(match=redis_backend.key_prefix(namespace) + "*", count=1000))


def test_the_entry_points_serve_redis_and_rediss() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=sq.ENTRY_POINT_GROUP)}
    assert names["redis"] == names["rediss"] == "senderqueue_redis:RedisBackend.from_url"


def test_a_backend_wraps_a_client_made_by_the_application(client: redis.Redis, namespace: str) -> None:
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    (message_id,) = queue.enqueue_many([new_message()])
    assert queue.get(message_id).state is sq.State.NEW
    with pytest.raises(sq.InvalidArgument, match="decode_responses"):
        RedisBackend(redis.Redis.from_url(REDIS_URL, decode_responses=True), namespace)


def test_urls_are_checked_and_share_a_client(namespace: str) -> None:
    with pytest.raises(sq.InvalidArgument):
        sq.SenderQueue.open(f"{REDIS_URL}?namespace=")
    with pytest.raises(sq.InvalidArgument):
        sq.SenderQueue.open(f"{REDIS_URL}?cluster=maybe")
    one = sq.SenderQueue.open(f"{REDIS_URL}?namespace={namespace}&cluster=false")
    two = sq.SenderQueue.open(f"{REDIS_URL}?cluster=false&namespace={namespace}x")
    try:
        assert one.backend.client is two.backend.client  # type: ignore[attr-defined]
    finally:
        two.backend.destroy()  # type: ignore[attr-defined]
        one.close()
        two.close()


def test_namespaces_never_see_each_other(client: redis.Redis, namespace: str) -> None:
    other = namespace + "}{:m:"  # braces and colons must not escape the hash tag or spell a key
    try:
        mine = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
        theirs = sq.SenderQueue(RedisBackend(client, other), clock=ManualClock(START))
        mine.enqueue_many([new_message(message_id="same")])
        theirs.enqueue_many([new_message(message_id="same"), new_message(n=1)])
        assert mine.metrics("m1") == sq.Metrics(new=1)
        assert theirs.metrics("m1") == sq.Metrics(new=2)
        assert len(theirs.claim("s1", 10)) == 2
        assert mine.get("same").state is sq.State.NEW
        assert len({key_slot(k) for k in _keys(client, other)}) == 1
    finally:
        RedisBackend(client, other).destroy()


AWKWARD = [
    'it\'s "quoted"',
    "{tag}",
    "}",
    "{",
    "a:b",
    "a",
    "b:c",
    "m:x",
    "x",
    "q:1",
    "1",
    "пример рассылки",
    "邮件",
    "\\*?[glob]",
    "' OR 1=1 --",
    "z" * 255,
]


def test_awkward_ids_cannot_forge_each_others_keys(client: redis.Redis, namespace: str) -> None:
    """Every id as mailing, sender and message id at once: each message its own keys, all in one slot."""
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    queue.enqueue_many(
        new_message(mailing=name, sender=name, n=n, message_id=name) for n, name in enumerate(AWKWARD)
    )
    # Joined naively these pairs would name one sender queue.
    queue.enqueue_many(
        [new_message("a:b", "c", message_id="ab-c"), new_message("a", "b:c", message_id="a-bc")]
    )
    for n, name in enumerate(AWKWARD):
        message = queue.get(name)
        assert (message.id, message.mailing, message.sender, message.recipient) == (
            name,
            name,
            name,
            f"rcpt{n}@example.com",
        )
    assert queue.metrics("a:b") == sq.Metrics(new=2)
    assert queue.metrics_by_sender("a") == {"a": sq.Metrics(new=1), "b:c": sq.Metrics(new=1)}
    assert queue.metrics_by_sender("a:b") == {"a:b": sq.Metrics(new=1), "c": sq.Metrics(new=1)}
    assert [c.message.id for c in queue.claim("b:c", 10)] == ["b:c", "a-bc"]
    assert queue.freeze("{tag}") == 1
    assert queue.metrics("{") == sq.Metrics(new=1)
    assert queue.clear("}") == 1
    assert queue.get("{").state is sq.State.NEW
    with pytest.raises(sq.DuplicateMessage):
        queue.enqueue_many([new_message(message_id="m:x")])
    keys = _keys(client, namespace)
    prefix = redis_backend.key_prefix(namespace).encode()
    assert all(key.startswith(prefix) for key in keys)
    assert len({key_slot(key) for key in keys}) == 1
    # Two keys per message (record and content), none shared: 18 messages, 36 distinct message keys.
    message_keys = [k for k in keys if k[len(prefix) :].startswith((b"m:", b"b:"))]
    assert len(message_keys) == 2 * (len(AWKWARD) + 2)


def test_a_flushed_script_cache_is_reloaded(client: redis.Redis, namespace: str) -> None:
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    queue.enqueue_many([new_message()])
    client.script_flush()
    assert queue.metrics("m1") == sq.Metrics(new=1)
    assert len(queue.claim("s1")) == 1


# -- connection loss ------------------------------------------------------------------


class _Proxy:
    """A TCP relay to Redis that can be cut: every connection through it dies at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target)
            except OSError:
                inbound.close()
                continue
            with self.lock:
                self.sockets += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every relayed connection; new ones are accepted and dropped at once."""
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()
            self.target = ("127.0.0.1", _closed_port())

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_lost_connection_raises_backend_error_and_changes_nothing(
    client: redis.Redis, namespace: str
) -> None:
    host = client.connection_pool.connection_kwargs.get("host", "127.0.0.1")
    port = client.connection_pool.connection_kwargs.get("port", 6379)
    proxy = _Proxy((host, port))
    clock = ManualClock(START)
    direct = sq.SenderQueue(RedisBackend(client, namespace), clock=clock)
    relayed = sq.SenderQueue.open(
        f"redis://127.0.0.1:{proxy.port}/0?namespace={namespace}&cluster=false&socket_timeout=10", clock=clock
    )
    try:
        relayed.enqueue_many([new_message(n=n, message_id=f"id{n}") for n in range(3)])
        (claim,) = relayed.claim("s1", 1)
        before = (direct.metrics("m1"), [direct.get(f"id{n}") for n in range(3)])
        proxy.cut()
        attempts: list[Callable[[], object]] = [
            lambda: relayed.enqueue_many([new_message(n=9, message_id="late")]),
            lambda: relayed.claim("s1", 2),
            lambda: relayed.deliver(claim),
            lambda: relayed.renew(claim),
            lambda: relayed.freeze("m1"),
            lambda: relayed.clear("m1"),
            lambda: relayed.expire_leases(),
            lambda: relayed.metrics("m1"),
            lambda: relayed.get("id0"),
        ]
        for attempt in attempts:
            with pytest.raises(sq.BackendError):
                attempt()
        assert (direct.metrics("m1"), [direct.get(f"id{n}") for n in range(3)]) == before
        with pytest.raises(sq.UnknownMessage):
            direct.get("late")
        direct.deliver(claim)  # the claim survived the relay's failure
        assert direct.metrics("m1") == sq.Metrics(new=2, delivered=1)
    finally:
        relayed.close()
        proxy.close()


def test_the_scripts_draw_the_same_jitter_and_cap_as_the_core(client: redis.Redis, namespace: str) -> None:
    """Backoff is computed in Lua; with jitter and the cap, it must land on the core's microsecond."""
    retry = sq.RetryPolicy(
        min_backoff=timedelta(seconds=7, microseconds=3),
        max_backoff=timedelta(minutes=3),
        max_attempts=12,
        jitter=0.37,
        seed=20240611,
    )
    clock = ManualClock(START)
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=clock, retry=retry)
    ids = queue.enqueue_many(new_message(n=n, message_id=f"ид-{{{n}}}:'x'") for n in range(40))
    for attempt in range(1, 8):
        claims = queue.claim("s1", 100)
        assert len(claims) == len(ids)
        queue.report_many([(c, sq.SoftBounce(code=451)) for c in claims])
        for message_id in ids:
            expected = retry.next_attempt(attempt, START, clock(), message_id)
            assert queue.get(message_id).next_attempt_at == expected, (message_id, attempt)
        clock.advance(retry.max_backoff * 2)
