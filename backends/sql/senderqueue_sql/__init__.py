"""The SQL backend of senderqueue: SQLite and PostgreSQL through SQLAlchemy 2 Core.

``SenderQueue.open("sqlite:///queue.db")`` or ``open("postgresql://…?namespace=NAME")``
finds it through the ``senderqueue.backends`` entry points; ``SQLBackend(engine)``
takes an engine of your own.
"""

from ._backend import SQLBackend, from_url
from ._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLBackend", "from_url"]
