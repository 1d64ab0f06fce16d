"""senderqueue-redis: the Redis (and Redis Cluster) backend of senderqueue.

>>> import senderqueue as sq
>>> queue = sq.SenderQueue.open("redis://127.0.0.1:6379/0?namespace=shop")  # doctest: +SKIP

Installed, it serves ``redis://`` and ``rediss://`` URLs through the
``senderqueue.backends`` entry points; :class:`RedisBackend` also wraps a client you made.
"""

from ._backend import DEFAULT_BATCH, RedisBackend, key_prefix
from ._scripts import LAYOUT

__all__ = ["DEFAULT_BATCH", "LAYOUT", "RedisBackend", "key_prefix"]
