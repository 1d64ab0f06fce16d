"""The backends every conformance test runs on, and the fixtures that make them.

Each backend is a ``pytest.param`` with a mark of its name, so ``pytest -m memory``
is the fast local run. A backend whose distribution is not installed, or whose
service does not answer, is skipped with a loud reason locally and FAILS the run
when ``CI=true``: a skipped backend is not a passing one.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from senderqueue import Backend
from senderqueue._backend import backend_from_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRESQL_URL = os.environ.get("SENDERQUEUE_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SENDERQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")

# (id, the distribution's import name, or None for the core)
BACKENDS = [
    pytest.param("memory", marks=pytest.mark.memory, id="memory"),
    pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
    pytest.param("postgresql", marks=pytest.mark.postgresql, id="postgresql"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
]
_DISTRIBUTIONS = {"sqlite": "senderqueue_sql", "postgresql": "senderqueue_sql", "redis": "senderqueue_redis"}


def unavailable(reason: str) -> None:
    """Skip loudly, or fail in CI, where a missing backend or service must not pass unseen."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(f"!!! NOT TESTED: {reason}")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of the backend under test (without a namespace)."""
    name: str = request.param
    distribution = _DISTRIBUTIONS.get(name)
    if distribution is not None and importlib.util.find_spec(distribution) is None:
        unavailable(f"the {name} backend ({distribution}) is not installed")
    if name == "memory":
        return "memory://"
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    url = POSTGRESQL_URL if name == "postgresql" else REDIS_URL
    if not _reachable(url):
        unavailable(f"{name} does not answer at {url}")
    return url


@pytest.fixture
def new_backend(backend_url: str) -> Iterator[Callable[[], Backend]]:
    """Makes a fresh backend in a namespace of its own each call; removes them afterwards."""
    made: list[Backend] = []

    def make() -> Backend:
        separator = "&" if "?" in backend_url else "?"
        backend = backend_from_url(f"{backend_url}{separator}namespace=t{uuid.uuid4().hex[:12]}")
        made.append(backend)
        return backend

    yield make
    for backend in made:
        destroy = getattr(backend, "destroy", None)  # SQL and Redis remove their namespace's data
        if destroy is not None:
            destroy()
        backend.close()
