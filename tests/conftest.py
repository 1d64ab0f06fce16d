"""The backends every conformance test runs on, and the fixtures that make them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from senderqueue import Backend
from senderqueue._backend import backend_from_url

# One entry per backend; the SQL and Redis distributions add theirs. ``pytest -m memory`` is the fast run.
BACKENDS = [pytest.param("memory://", marks=pytest.mark.memory, id="memory")]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of the backend under test."""
    url: str = request.param
    return url


@pytest.fixture
def new_backend(backend_url: str) -> Callable[[], Backend]:
    """Makes a fresh, isolated backend each call."""
    return lambda: backend_from_url(backend_url)
