"""The conformance suite, on every backend of ``conftest.BACKENDS``."""

import pytest

from senderqueue.testing.conformance import BackendConformance, NewBackend


class TestConformance(BackendConformance):
    @pytest.fixture
    def new_backend(self, new_backend: NewBackend) -> NewBackend:
        """The conftest's factory, parametrized over the backends."""
        return new_backend
