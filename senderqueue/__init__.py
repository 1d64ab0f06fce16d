"""senderqueue: the sender queues of an email platform.

Messages of a mailing wait on sender queues until a worker delivers them; an
operator watches five live metrics per mailing (Total, Frozen, New, Retries,
Sending) and can freeze, unfreeze and clear a mailing's queues.

>>> import senderqueue as sq
>>> queue = sq.SenderQueue()
>>> queue.enqueue(mailing="m1", sender="s1", recipient="ann@example.com",
...               content=b"Subject: hi\\r\\n\\r\\nhello\\r\\n", mail_from="news@shop.example",
...               message_id="m1-ann")
'm1-ann'
>>> queue.metrics("m1").new
1
"""

from ._backend import ENTRY_POINT_GROUP, Backend, BackendFactory, Settlement
from ._clock import Clock, system_clock
from ._errors import (
    BackendError,
    DuplicateMessage,
    InvalidArgument,
    InvalidMessage,
    InvalidTransition,
    LeaseLost,
    SenderQueueError,
    UnknownMessage,
)
from ._lifecycle import LIFECYCLE, QUEUED, TERMINAL, State, Trigger, leave_sending
from ._memory import MemoryBackend
from ._models import Claim, Message, Metrics, NewMessage
from ._outcomes import DEFAULT_EXCEPTIONS, Classifier, Delivered, HardBounce, Outcome, SoftBounce, parse_reply
from ._queue import DEFAULT_LEASE, SenderQueue
from ._retry import RetryPolicy
from ._smtp import SMTPTransport
from ._transport import Attempt, FakeSMTPTransport, Script, Transport
from ._validation import DEFAULT_MAX_CONTENT_SIZE
from ._worker import DomainLimit, SenderWorker, WorkerSummary

__all__ = [
    "DEFAULT_EXCEPTIONS",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_CONTENT_SIZE",
    "ENTRY_POINT_GROUP",
    "LIFECYCLE",
    "QUEUED",
    "TERMINAL",
    "Attempt",
    "Backend",
    "BackendError",
    "BackendFactory",
    "Claim",
    "Classifier",
    "Clock",
    "Delivered",
    "DomainLimit",
    "DuplicateMessage",
    "FakeSMTPTransport",
    "HardBounce",
    "InvalidArgument",
    "InvalidMessage",
    "InvalidTransition",
    "LeaseLost",
    "MemoryBackend",
    "Message",
    "Metrics",
    "NewMessage",
    "Outcome",
    "RetryPolicy",
    "SMTPTransport",
    "Script",
    "SenderQueue",
    "SenderQueueError",
    "SenderWorker",
    "Settlement",
    "SoftBounce",
    "State",
    "Transport",
    "Trigger",
    "UnknownMessage",
    "WorkerSummary",
    "leave_sending",
    "parse_reply",
    "system_clock",
]
