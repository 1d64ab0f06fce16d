"""The errors senderqueue raises.

Every error is a :class:`SenderQueueError`; backends translate their driver's
errors into this tree, so an application catches the same classes whatever the
storage::

    SenderQueueError
    ├── InvalidArgument        bad input, rejected before anything changed (also a ValueError)
    │   └── InvalidMessage     a message's ids, addresses or content are not acceptable
    ├── DuplicateMessage       a caller's message id is already stored
    ├── UnknownMessage         no message has this id (also a LookupError)
    ├── InvalidTransition      a move the lifecycle does not allow
    ├── LeaseLost              a report or renewal with a stale or unknown claim token
    └── BackendError           the storage failed; the operation had no effect
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "DuplicateMessage",
    "InvalidArgument",
    "InvalidMessage",
    "InvalidTransition",
    "LeaseLost",
    "SenderQueueError",
    "UnknownMessage",
]


class SenderQueueError(Exception):
    """The base of every error senderqueue raises."""


class InvalidArgument(SenderQueueError, ValueError):
    """An argument is not acceptable; nothing was changed."""


class InvalidMessage(InvalidArgument):
    """A message (ids, recipient, mail_from, content) is not acceptable; nothing was stored."""


class DuplicateMessage(SenderQueueError):
    """A caller's message id is already in use; nothing was stored.

    Attributes:
        message_id: the id that is taken.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message id {message_id!r} is already in use")
        self.message_id = message_id


class UnknownMessage(SenderQueueError, LookupError):
    """No message has this id.

    Attributes:
        message_id: the id that was looked up.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(f"no message has id {message_id!r}")
        self.message_id = message_id


class InvalidTransition(SenderQueueError):
    """The lifecycle does not allow this move."""


class LeaseLost(SenderQueueError):
    """The claim is no longer valid: its message was settled already, or never claimed with this token.

    Nothing was changed.

    Attributes:
        message_id: the message the claim was for.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(f"the claim on message {message_id!r} is no longer valid")
        self.message_id = message_id


class BackendError(SenderQueueError):
    """The backend failed (connection lost, storage error); the operation had no effect."""
