"""The conformance suite, unchanged, on a 3-master Redis Cluster started for the session.

The cluster runs on free loopback ports; it is started once per test process and always
stopped. Without ``redis-server``/``redis-cli`` the tests skip loudly, or fail when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from senderqueue import Backend, SenderQueue
from senderqueue._backend import backend_from_url
from senderqueue.testing.conformance import BackendConformance, NewBackend

pytestmark = pytest.mark.redis

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_STARTUP_SECONDS = 30.0


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"!!! NOT TESTED: {reason}")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports that are free, and whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 55535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the Redis Cluster did not come up: {what}")


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Starts three cluster-enabled redis-server masters, joins them, and stops them after the session."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        _unavailable("redis-server and redis-cli are needed to start a Redis Cluster")
    assert server is not None
    assert cli is not None
    directory: Path = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(3)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            options = {
                "port": str(port),
                "bind": "127.0.0.1",
                "cluster-enabled": "yes",
                "cluster-config-file": f"nodes-{port}.conf",
                "dir": str(directory),
                "save": "",
                "appendonly": "no",
                "logfile": f"redis-{port}.log",
            }
            nodes.append(
                subprocess.Popen(
                    [server, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        clients = [redis.Redis(port=port) for port in ports]
        for client in clients:
            _wait(lambda c=client: bool(c.ping()), "a node does not answer PING")  # type: ignore[misc]
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=_STARTUP_SECONDS,
        )
        for client in clients:
            _wait(
                lambda c=client: c.cluster("INFO").get("cluster_state") == "ok",  # type: ignore[misc]
                "cluster_state is not ok",
            )
            client.close()
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _unavailable(f"a Redis Cluster could not be started: {error}")
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


def cluster_backends(url: str) -> Iterator[NewBackend]:
    """A factory of backends in fresh namespaces of the cluster; removes their keys afterwards."""
    made: list[Backend] = []

    def make() -> Backend:
        backend = backend_from_url(f"{url}&namespace=c{uuid.uuid4().hex[:12]}")
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.destroy()  # type: ignore[attr-defined]
        backend.close()


class TestRedisClusterConformance(BackendConformance):
    """Every rule of the specification, on three masters."""

    @pytest.fixture
    def new_backend(self, redis_cluster_url: str) -> Iterator[NewBackend]:
        """Fresh namespaces on the session's cluster."""
        yield from cluster_backends(redis_cluster_url)


def test_the_cluster_spreads_namespaces_over_its_masters(redis_cluster_url: str) -> None:
    """Namespaces land on different masters, and every key of one namespace on a single slot."""
    from redis.crc import key_slot

    for make in cluster_backends(redis_cluster_url):
        used: set[str] = set()
        for _ in range(12):
            queue = SenderQueue(make())
            queue.enqueue(
                mailing="{m}", sender="s:1", recipient="a@example.com", content=b"x", mail_from="b@x.example"
            )
            client = queue.backend.client  # type: ignore[attr-defined]
            assert isinstance(client, RedisCluster)
            keys = list(client.scan_iter(match=queue.backend._prefix + "*"))  # type: ignore[attr-defined]
            assert len(keys) >= 5
            assert len({key_slot(k) for k in keys}) == 1
            used.add(client.get_node_from_key(keys[0]).name)  # type: ignore[no-untyped-call]
        assert len(used) > 1
