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
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import senderqueue as sq
from senderqueue.testing import ManualClock
from senderqueue.testing.conformance import START, new_message

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("SENDERQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if IN_CI:  # installed by tox: missing, it must fail the run, not skip it
    import senderqueue_redis as redis_backend
else:
    redis_backend = pytest.importorskip(
        "senderqueue_redis", reason="!!! NOT TESTED: senderqueue-redis is missing"
    )
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


def test_a_namespace_of_another_layout_is_refused_and_left_as_it_is(
    client: redis.Redis, namespace: str
) -> None:
    prefix = redis_backend.key_prefix(namespace)
    fresh = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    fresh.enqueue_many([new_message()])
    assert client.get(prefix + "layout") == str(redis_backend.LAYOUT).encode()

    # Written by an older version: counters but no layout key (layout 1).
    client.delete(prefix + "layout")
    before = {key: client.type(key) for key in _keys(client, namespace)}
    old = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    for call in (
        lambda: old.metrics("m1"),
        lambda: old.claim("s1", 10),
        lambda: old.enqueue_many([new_message()]),
    ):
        with pytest.raises(
            sq.BackendError, match=f"holds keys of layout 1, .* reads layout {redis_backend.LAYOUT}"
        ):
            call()
    assert {key: client.type(key) for key in _keys(client, namespace)} == before  # nothing written

    client.set(prefix + "layout", b"7")
    with pytest.raises(sq.BackendError, match="layout 7"):
        sq.SenderQueue(RedisBackend(client, namespace)).metrics("m1")


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


@pytest.mark.parametrize("by_url", [False, True])
def test_a_flushed_script_cache_is_reloaded(client: redis.Redis, namespace: str, by_url: bool) -> None:
    queue = _queue(client, namespace, by_url, batch=2)
    try:
        queue.enqueue_many([new_message(n=n) for n in range(7)])
        client.script_flush()
        assert queue.metrics("m1") == sq.Metrics(new=7)
        assert len(queue.claim("s1")) == 1
        # Flushed again between two scripts of one claim: the later one loads it again.
        backend = queue.backend
        content_keys = backend._content_keys  # type: ignore[attr-defined]

        def flush_once(rows: list[list[object]]) -> tuple[str, ...]:
            backend._content_keys = content_keys  # type: ignore[attr-defined]
            client.script_flush()
            return content_keys(rows)  # type: ignore[no-any-return]

        backend._content_keys = flush_once  # type: ignore[attr-defined]
        assert len(queue.claim("s1", 6)) == 6
        assert queue.metrics("m1") == sq.Metrics(sending=7)
    finally:
        queue.close()


def _queue(client: redis.Redis, namespace: str, by_url: bool, batch: int) -> sq.SenderQueue:
    """A queue on a client of its own URL (driven through its pool) or on the test's client."""
    if by_url:
        url = f"{REDIS_URL}?namespace={namespace}&batch={batch}&cluster=false"
        return sq.SenderQueue.open(url, clock=ManualClock(START))
    return sq.SenderQueue(RedisBackend(client, namespace, batch=batch), clock=ManualClock(START))


# -- work split over several scripts ----------------------------------------------------


@pytest.fixture
def small_purges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Purge scripts of 3 messages."""
    monkeypatch.setattr(redis_backend._backend, "_PURGE_BATCH", 3)


def test_batch_comes_from_the_url_or_the_constructor(client: redis.Redis, namespace: str) -> None:
    assert RedisBackend(client, namespace).batch == redis_backend.DEFAULT_BATCH
    assert RedisBackend(client, namespace, batch=0).batch == 0
    for number in (-1, 1.5, True):
        with pytest.raises(sq.InvalidArgument):
            RedisBackend(client, namespace, batch=number)  # type: ignore[arg-type]
    for text in ("x", "-1", ""):
        with pytest.raises(sq.InvalidArgument):
            sq.SenderQueue.open(f"{REDIS_URL}?namespace={namespace}&batch={text}")
    queue = sq.SenderQueue.open(f"{REDIS_URL}?namespace={namespace}&batch=7&cluster=false")
    try:
        assert queue.backend.batch == 7  # type: ignore[attr-defined]
    finally:
        queue.close()


def test_a_batch_is_ascii_digits_and_any_size_works(client: redis.Redis, namespace: str) -> None:
    """ "²" passes str.isdigit() but not int(); a batch past Redis's integers is no limit."""
    with pytest.raises(sq.InvalidArgument):
        sq.SenderQueue.open(f"{REDIS_URL}?namespace={namespace}&batch=%C2%B2&cluster=false")
    queue = sq.SenderQueue(RedisBackend(client, namespace, batch=10**20), clock=ManualClock(START))
    clock: ManualClock = queue.clock  # type: ignore[assignment]
    queue.enqueue_many(new_message(n=n) for n in range(3))
    assert len(queue.claim("s1", 3, lease=timedelta(minutes=1))) == 3
    clock.advance(timedelta(minutes=2))
    assert queue.expire_leases() == 3


@pytest.mark.parametrize(("batch", "by_url"), [(3, False), (3, True), (0, True)])
def test_claims_reports_and_expiry_span_scripts(
    client: redis.Redis, namespace: str, batch: int, by_url: bool
) -> None:
    """Three messages a script, or each call in one script: the same outcome."""
    queue = _queue(client, namespace, by_url, batch)
    clock: ManualClock = queue.clock  # type: ignore[assignment]
    try:
        ids = queue.enqueue_many(
            new_message(mailing=f"m{n % 2}", n=n, message_id=f"id{n:02}") for n in range(20)
        )
        claims = queue.claim("s1", 8, lease=timedelta(minutes=1))
        assert [c.message.id for c in claims] == ids[:8]  # oldest first across scripts and queues
        assert len({c.token for c in claims}) == 8
        assert all(c.message.content == new_message().content for c in claims)
        results = queue.report_many([(c, sq.Delivered(code=250)) for c in claims[:7]])
        assert results == [None] * 7
        assert [type(r) for r in queue.report_many([(claims[0], sq.Delivered(code=250))])] == [sq.LeaseLost]
        held = queue.claim("s1", 7, lease=timedelta(minutes=1))
        clock.advance(timedelta(minutes=2))
        assert queue.expire_leases() == 8  # claims[7] and the seven held
        assert sum((queue.metrics(m) for m in ("m0", "m1")), sq.Metrics()) == sq.Metrics(
            new=5, retries=8, delivered=7
        )
        assert {queue.get(c.message.id).state for c in [claims[7], *held]} == {sq.State.RETRIES}
    finally:
        queue.close()


def test_scores_read_back_in_any_spelling() -> None:
    """Redis 7.2+ spells a round score with an exponent; a claim returns scores as times."""
    score_time = redis_backend._backend._score_time
    assert score_time(b"1.8934884e+15") == score_time(b"1893488400000000") == START


def test_a_claim_reported_twice_in_one_batch_settles_once(client: redis.Redis, namespace: str) -> None:
    """A script reads every claim record first: the second report of one claim must still lose."""
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=ManualClock(START))
    queue.enqueue_many([new_message(n=n) for n in range(2)])
    first, second = queue.claim("s1", 2)
    results = queue.report_many(
        [(first, sq.Delivered(code=250)), (first, sq.SoftBounce(code=451)), (second, sq.HardBounce(code=550))]
    )
    assert [type(r) for r in results] == [type(None), sq.LeaseLost, type(None)]
    assert queue.metrics("m1") == sq.Metrics(delivered=1, failed=1)
    assert queue.get(first.message.id).state is sq.State.DELIVERED


@pytest.mark.usefixtures("small_purges")
def test_purge_spans_scripts_and_batches(client: redis.Redis, namespace: str) -> None:
    clock = ManualClock(START)
    queue = sq.SenderQueue(RedisBackend(client, namespace, batch=3), clock=clock)
    queue.enqueue_many(new_message(n=n, message_id=f"id{n:02}") for n in range(14))
    for _ in range(2):  # two reports at two times: two batches of terminal messages
        queue.report_many([(c, sq.Delivered(code=250)) for c in queue.claim("s1", 4)])
        clock.advance(timedelta(minutes=1))
    queue.clear("m1")  # six queued messages, set aside
    clock.advance(timedelta(minutes=1))
    assert queue.metrics("m1") == sq.Metrics(delivered=8, deleted=6)
    assert queue.purge(older_than=timedelta(minutes=2, seconds=30)) == 4
    assert queue.metrics("m1") == sq.Metrics(delivered=4, deleted=6)
    assert queue.purge(older_than=timedelta(0)) == 10
    assert queue.metrics("m1") == sq.Metrics()
    prefix = redis_backend.key_prefix(namespace).encode()
    left = {k[len(prefix) :].split(b":")[0] for k in _keys(client, namespace)}
    assert left == {b"layout", b"seq", b"tok", b"qn", b"dn", b"mg", b"q", b"sq", b"senders"}


def test_a_lease_settled_back_due_at_once_is_claimed_whole(client: redis.Redis, namespace: str) -> None:
    """A claim settles the sender's expired leases, then claims: a message whose wait rounds to 0
    is due again in the same script, and its new claim must keep its record and lease."""
    retry = sq.RetryPolicy(
        min_backoff=timedelta(microseconds=1), max_backoff=timedelta(microseconds=1), jitter=0.9, seed=1
    )
    message_id = next(f"id{n}" for n in range(1000) if retry.backoff(1, f"id{n}") == timedelta(0))
    clock = ManualClock(START)
    queue = sq.SenderQueue(RedisBackend(client, namespace), clock=clock, retry=retry)
    queue.enqueue_many([new_message(message_id=message_id)])
    queue.claim("s1", 2, lease=timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))
    (claim,) = queue.claim("s1", 2, lease=timedelta(minutes=1))  # 2: the lease is settled in the same script
    assert claim.message.attempts == 2
    assert queue.get(message_id).state is sq.State.SENDING
    queue.deliver(claim)
    assert queue.metrics("m1") == sq.Metrics(delivered=1)


def test_a_small_claim_settles_expired_leases_a_batch_a_script(client: redis.Redis, namespace: str) -> None:
    """claim(limit=1) after many leases expired: a batch of them a script, not one a round trip."""
    clock = ManualClock(START)
    backend = RedisBackend(client, namespace, batch=20)
    queue = sq.SenderQueue(backend, clock=clock)
    queue.enqueue_many(new_message(n=n) for n in range(50))
    assert len(queue.claim("s1", 50, lease=timedelta(minutes=1))) == 50
    clock.advance(timedelta(minutes=2))
    run = backend._run
    scripts: list[str] = []

    def counted(script: Any, *args: Any) -> Any:
        scripts.append(script.name)
        return run(script, *args)

    backend._run = counted  # type: ignore[method-assign]
    assert queue.claim("s1", 1) == []  # the 50 are RETRIES now, due in 5 minutes
    assert scripts == ["claim"] * 3  # 20, 20, then 10 and the claim
    assert queue.metrics("m1") == sq.Metrics(retries=50)


def test_one_script_takes_more_claims_than_lua_unpacks(client: redis.Redis, namespace: str) -> None:
    """batch=0: a report, an expiry and a claim's expiry of over 8,000 leases each in one script
    (Lua unpacks about 8,000 values at most)."""
    n = 8100
    clock = ManualClock(START)
    queue = sq.SenderQueue(RedisBackend(client, namespace, batch=0), clock=clock)
    queue.enqueue_many(new_message(n=i, message_id=f"id{i}") for i in range(n))
    minute = timedelta(minutes=1)
    assert len(queue.claim("s1", n, lease=minute)) == n
    clock.advance(2 * minute)
    assert queue.claim("s1", n, lease=minute) == []  # settles the n leases: RETRIES in 5 minutes
    assert queue.metrics("m1") == sq.Metrics(retries=n)
    clock.advance(10 * minute)
    assert len(queue.claim("s1", n, lease=minute)) == n
    clock.advance(2 * minute)
    assert queue.expire_leases() == n
    clock.advance(20 * minute)
    claims = queue.claim("s1", n, lease=minute)
    assert queue.report_many([(c, sq.Delivered(code=250)) for c in claims]) == [None] * n
    assert queue.metrics("m1") == sq.Metrics(delivered=n)


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


def _relayed(namespace: str, proxy: _Proxy, clock: ManualClock, batch: int) -> sq.SenderQueue:
    url = f"redis://127.0.0.1:{proxy.port}/0?namespace={namespace}&cluster=false&batch={batch}&socket_timeout=10"
    return sq.SenderQueue.open(url, clock=clock)


def _proxy_to(client: redis.Redis) -> _Proxy:
    kwargs = client.connection_pool.connection_kwargs
    return _Proxy((kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379)))


def _cut_at_content_read(backend: Any, proxy: _Proxy, n: int) -> None:
    """Cut the proxied connection when a claim of ``backend`` reads contents for the ``n``-th time."""
    content_keys = backend._content_keys
    reads: list[object] = []

    def cut(rows: list[list[object]]) -> tuple[str, ...]:
        reads.append(rows)
        if len(reads) == n:
            proxy.cut()
        return content_keys(rows)  # type: ignore[no-any-return]

    backend._content_keys = cut


def test_a_claim_lost_between_its_scripts_says_what_it_holds_and_keeps_no_connection(
    client: redis.Redis, namespace: str
) -> None:
    """The connection dies in the pipelined part of a claim, and Redis stays out of reach:
    BackendError naming the messages held (until their lease expires), and the broken connection
    is not handed out again."""
    proxy = _proxy_to(client)
    clock = ManualClock(START)
    direct = sq.SenderQueue(RedisBackend(client, namespace), clock=clock)
    relayed = _relayed(namespace, proxy, clock, batch=1)
    backend = relayed.backend
    pool = backend._pool  # type: ignore[attr-defined]
    try:
        relayed.enqueue_many(new_message(n=n) for n in range(3))
        _cut_at_content_read(backend, proxy, 1)
        with pytest.raises(sq.BackendError, match="1 messages were claimed before the failure"):
            relayed.claim("s1", 3, lease=timedelta(minutes=1))
        assert not pool._in_use_connections
        assert all(not c._sock for c in pool._available_connections)
        assert direct.metrics("m1") == sq.Metrics(new=2, sending=1)
        clock.advance(timedelta(minutes=2))
        assert direct.expire_leases() == 1
    finally:
        relayed.close()
        proxy.close()


def test_a_claim_whose_last_contents_cannot_be_read_returns_the_claims_it_made(
    client: redis.Redis, namespace: str
) -> None:
    """The connection dies before the last batch's contents are read: the claims already made
    are returned, whole; the last batch stays held until its lease expires."""
    proxy = _proxy_to(client)
    clock = ManualClock(START)
    direct = sq.SenderQueue(RedisBackend(client, namespace), clock=clock)
    relayed = _relayed(namespace, proxy, clock, batch=1)
    backend = relayed.backend
    try:
        ids = relayed.enqueue_many(new_message(n=n) for n in range(3))
        _cut_at_content_read(backend, proxy, 3)  # the read of the last batch, after its claim script
        claims = relayed.claim("s1", 3, lease=timedelta(minutes=1))
        assert [c.message.id for c in claims] == ids[:2]
        assert all(c.message.content == new_message().content for c in claims)
        assert direct.metrics("m1") == sq.Metrics(sending=3)
        assert direct.report_many([(c, sq.Delivered(code=250)) for c in claims]) == [None, None]
        clock.advance(timedelta(minutes=2))
        assert direct.expire_leases() == 1
    finally:
        relayed.close()
        proxy.close()


@pytest.mark.parametrize("by_url", [False, True])
def test_a_claim_whose_later_script_fails_returns_what_it_took(
    client: redis.Redis, namespace: str, by_url: bool
) -> None:
    """The second script of a claim fails (an error reply): the call returns the first batch's
    claims, whole and usable, and nothing else is held."""
    queue = _queue(client, namespace, by_url, batch=2)
    backend = queue.backend
    try:
        ids = queue.enqueue_many(new_message(n=n) for n in range(6))
        script_call = backend._script_call  # type: ignore[attr-defined]
        calls: list[object] = []

        def fail_second(script: object, *args: Any, by_source: bool = False) -> tuple[Any, ...]:
            calls.append(script)
            command = script_call(script, *args, by_source=by_source)
            if len(calls) == 2:
                return ("EVALSHA", command[1], "many")  # an error reply: it did not run
            return command  # type: ignore[no-any-return]

        backend._script_call = fail_second  # type: ignore[attr-defined]
        claims = queue.claim("s1", 6, lease=timedelta(minutes=1))
        backend._script_call = script_call  # type: ignore[attr-defined]
        assert [c.message.id for c in claims] == ids[:2]
        assert all(c.message.content == new_message().content for c in claims)
        assert queue.metrics("m1") == sq.Metrics(new=4, sending=2)
        assert queue.report_many([(c, sq.Delivered(code=250)) for c in claims]) == [None, None]
        assert [c.message.id for c in queue.claim("s1", 6)] == ids[2:]
    finally:
        queue.close()


def test_a_report_is_one_script_whatever_the_batch(client: redis.Redis, namespace: str) -> None:
    """A report of more claims than a batch is still one atomic script: lost, it settles none."""
    proxy = _proxy_to(client)
    clock = ManualClock(START)
    direct = sq.SenderQueue(RedisBackend(client, namespace), clock=clock)
    relayed = _relayed(namespace, proxy, clock, batch=2)
    backend = relayed.backend
    try:
        relayed.enqueue_many(new_message(n=n) for n in range(6))
        claims = relayed.claim("s1", 6)
        run = backend._run  # type: ignore[attr-defined]
        scripts: list[object] = []

        def count(script: object, *args: object) -> object:
            scripts.append(script)
            return run(script, *args)

        backend._run = count  # type: ignore[attr-defined]
        assert relayed.report_many([(c, sq.Delivered(code=250)) for c in claims[:5]]) == [None] * 5
        assert len(scripts) == 1
        proxy.cut()
        with pytest.raises(sq.BackendError):
            relayed.report_many([(claims[5], sq.Delivered(code=250))])
        assert direct.metrics("m1") == sq.Metrics(sending=1, delivered=5)
        assert direct.report_many([(claims[5], sq.Delivered(code=250))]) == [None]
    finally:
        relayed.close()
        proxy.close()


def test_expiry_and_purge_that_fail_after_a_script_return_what_they_did(
    client: redis.Redis, namespace: str
) -> None:
    """Expiry of leases, a batch a script: a failure after the first script returns the count so
    far; a claim that settled expired leases before the failure returns no claims."""
    queue = _queue(client, namespace, by_url=True, batch=2)
    clock: ManualClock = queue.clock  # type: ignore[assignment]
    backend = queue.backend
    try:
        queue.enqueue_many(new_message(n=n) for n in range(6))
        queue.claim("s1", 6, lease=timedelta(minutes=1))
        clock.advance(timedelta(minutes=2))
        run = backend._run  # type: ignore[attr-defined]
        scripts: list[object] = []

        def fail_second(script: object, *args: object) -> object:
            scripts.append(script)
            if len(scripts) == 2:
                raise sq.BackendError("Redis failed: injected")
            return run(script, *args)

        backend._run = fail_second  # type: ignore[attr-defined]
        assert queue.expire_leases() == 2
        scripts.clear()
        assert queue.claim("s1", 6) == []  # settled a batch of expired leases, then Redis failed
        backend._run = run  # type: ignore[attr-defined]
        assert queue.metrics("m1") == sq.Metrics(retries=4, sending=2)
        assert queue.expire_leases() == 2
        assert queue.metrics("m1") == sq.Metrics(retries=6)
    finally:
        queue.close()


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
