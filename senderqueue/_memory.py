"""The in-memory backend: the reference every other backend is tested against.

Freeze and clear never touch messages. Each sender queue has a ``frozen`` flag
and a clear ``epoch``; a message stores only NEW, RETRIES, SENDING or a verdict,
and its effective state is derived: a queued message of an older epoch was
DELETED by a clear, one of a frozen queue is FROZEN. Counters per sender queue
make metrics O(sender queues); a heap per sender queue, merged across the
sender's unfrozen queues, makes a claim O(k log n).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

from ._backend import Settlement
from ._errors import DuplicateMessage, InvalidArgument, LeaseLost, UnknownMessage
from ._lifecycle import State, Trigger, leave_sending
from ._models import Claim, Message, Metrics, NewMessage
from ._retry import RetryPolicy

__all__ = ["MemoryBackend"]

# A keyword call to a class passes a dict to __init__; calling __init__ itself does not (~25% less).
_new = object.__new__
_init_message, _init_claim = Message.__init__, Claim.__init__

_NEW, _RETRIES, _SENDING = State.NEW, State.RETRIES, State.SENDING
_DELIVERED, _FAILED, _DELETED = State.DELIVERED, State.FAILED, State.DELETED
# Module constants: on Python 3.11 reading an enum member off its class costs ~150 ns.
_SOFT_BOUNCE, _RELEASE, _EXPIRE = Trigger.SOFT_BOUNCE, Trigger.RELEASE, Trigger.EXPIRE


@functools.cache
def _leave_sending(
    trigger: Trigger, claimed_from: State, cleared: bool, exhausted: bool, frozen: bool
) -> tuple[State, State | None]:
    """:func:`leave_sending`, remembered: it is pure, takes few values, and is on the settle path."""
    return leave_sending(
        trigger, claimed_from=claimed_from, cleared=cleared, exhausted=exhausted, frozen=frozen
    )


class _SenderQueue:
    __slots__ = (
        "changed_at",
        "cleared_at",
        "cleared_heaps",
        "deleted",
        "delivered",
        "epoch",
        "failed",
        "frozen",
        "heap",
        "mailing",
        "new",
        "retries",
        "sender",
        "sending",
    )

    def __init__(self, mailing: str, sender: str, frozen: bool, now: datetime) -> None:
        self.mailing = mailing
        self.sender = sender
        self.frozen = frozen
        self.changed_at = now  # when ``frozen`` last changed
        self.epoch = 0
        self.cleared_at: list[datetime] = []  # cleared_at[e]: the clear that ended epoch e
        # The heaps of cleared epochs, kept until purge: freeing a million entries takes ~100 ms.
        self.cleared_heaps: list[tuple[datetime, list[tuple[datetime, int, _Record]]]] = []
        # (next_attempt_at, seq, record) of exactly the NEW and RETRIES messages of this epoch.
        self.heap: list[tuple[datetime, int, _Record]] = []
        self.new = self.retries = self.sending = 0
        self.delivered = self.failed = self.deleted = 0

    def metrics(self) -> Metrics:
        return Metrics.of_sender_queue(
            frozen=self.frozen,
            new=self.new,
            retries=self.retries,
            sending=self.sending,
            delivered=self.delivered,
            failed=self.failed,
            deleted=self.deleted,
        )

    def clear(self, now: datetime) -> int:
        moved = self.new + self.retries
        if moved or self.sending:  # a new epoch also marks the SENDING ones as cleared since their claim
            self.deleted += moved
            self.new = self.retries = 0
            self.cleared_heaps.append((now, self.heap))
            self.heap = []
            self.cleared_at.append(now)
            self.epoch += 1
        return moved

    def set_frozen(self, frozen: bool, now: datetime) -> int:
        if self.frozen is frozen:
            return 0
        self.frozen = frozen
        self.changed_at = now
        return self.new + self.retries


class _Record:
    __slots__ = (
        "attempts",
        "claimed_from",
        "content",
        "created_at",
        "epoch",
        "expires_at",
        "id",
        "last_error",
        "mail_from",
        "next_attempt_at",
        "queue",
        "recipient",
        "seq",
        "state",
        "token",
        "updated_at",
    )

    def __init__(self, message: NewMessage, queue: _SenderQueue, seq: int, now: datetime) -> None:
        self.id: str = message.message_id  # type: ignore[assignment]  # set by the core
        self.queue = queue
        self.recipient = message.recipient
        self.mail_from = message.mail_from
        self.content = message.content
        self.state = _NEW
        self.claimed_from = _NEW
        self.attempts = 0
        self.next_attempt_at = now
        self.seq = seq
        self.epoch = queue.epoch
        self.last_error: str | None = None
        self.created_at = now
        self.updated_at = now
        self.token: str | None = None
        self.expires_at: datetime | None = None

    def view(self) -> tuple[State, State | None, datetime]:
        """(effective state, frozen_from, updated_at), derived from the queue's flag and epoch."""
        state = self.state
        if state is _NEW or state is _RETRIES:
            queue = self.queue
            if self.epoch != queue.epoch:
                return _DELETED, None, queue.cleared_at[self.epoch]
            updated_at = max(self.updated_at, queue.changed_at)
            if queue.frozen:
                return State.FROZEN, state, updated_at
            return state, None, updated_at
        return state, None, self.updated_at

    def message(self) -> Message:
        state, frozen_from, updated_at = self.view()
        queue = self.queue
        message = _new(Message)
        _init_message(
            message,
            id=self.id,
            mailing=queue.mailing,
            sender=queue.sender,
            recipient=self.recipient,
            mail_from=self.mail_from,
            content=self.content,
            state=state,
            frozen_from=frozen_from,
            attempts=self.attempts,
            next_attempt_at=self.next_attempt_at,
            last_error=self.last_error,
            created_at=self.created_at,
            updated_at=updated_at,
        )
        return message


class MemoryBackend:
    """Sender queues in this process's memory; thread-safe, lost when the process ends.

    ``SenderQueue()`` uses one; ``SenderQueue.open("memory://")`` makes a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._by_mailing: dict[str, dict[str, _SenderQueue]] = {}
        self._by_sender: dict[str, dict[str, _SenderQueue]] = {}
        self._frozen_mailings: set[str] = set()
        # Per sender: (expires_at, n, token, record) for each lease given; stale entries are skipped.
        self._leases: dict[str, list[tuple[datetime, int, str, _Record]]] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """The factory behind ``memory://``; the URL carries no options."""
        if url.split("?", 1)[0] != "memory://":
            raise InvalidArgument(f"{url!r}: the memory backend takes only memory:// (and ?namespace=...)")
        return cls()

    # -- changes --------------------------------------------------------------------

    def _queue(self, mailing: str, sender: str, now: datetime) -> _SenderQueue:
        queues = self._by_mailing.setdefault(mailing, {})
        queue = queues.get(sender)
        if queue is None:
            queue = _SenderQueue(mailing, sender, mailing in self._frozen_mailings, now)
            queues[sender] = queue
            self._by_sender.setdefault(sender, {})[mailing] = queue
        return queue

    def enqueue(self, messages: Sequence[NewMessage], now: datetime) -> list[str]:
        with self._lock:
            for message in messages:
                if message.message_id in self._records:
                    raise DuplicateMessage(message.message_id)
            ids = []
            records = self._records
            seq = self._seq
            for message in messages:
                queue = self._queue(message.mailing, message.sender, now)
                record = _Record(message, queue, next(seq), now)
                records[record.id] = record
                queue.new += 1
                heapq.heappush(queue.heap, (now, record.seq, record))
                ids.append(record.id)
            return ids

    def claim(
        self, sender: str, limit: int, lease: timedelta, now: datetime, retry: RetryPolicy
    ) -> list[Claim]:
        with self._lock:
            self._expire(sender, now, retry)
            queues = self._by_sender.get(sender)
            if not queues:
                return []
            # Merge the due heads of the sender's unfrozen queues, oldest first.
            heads = [
                (q.heap[0][0], q.heap[0][1], q)
                for q in queues.values()
                if not q.frozen and q.heap and q.heap[0][0] <= now
            ]
            heapq.heapify(heads)
            leases = self._leases.setdefault(sender, [])
            expires_at = now + lease
            claims: list[Claim] = []
            while heads and len(claims) < limit:
                queue = heads[0][2]
                record = heapq.heappop(queue.heap)[2]
                if queue.heap and queue.heap[0][0] <= now:
                    heapq.heapreplace(heads, (queue.heap[0][0], queue.heap[0][1], queue))
                else:
                    heapq.heappop(heads)
                if record.state is _NEW:
                    queue.new -= 1
                else:
                    queue.retries -= 1
                queue.sending += 1
                token = str(next(self._tokens))
                record.claimed_from = record.state
                record.state = _SENDING
                record.attempts += 1
                record.token = token
                record.expires_at = expires_at
                record.updated_at = now
                heapq.heappush(leases, (expires_at, record.seq, token, record))
                claim = _new(Claim)
                _init_claim(claim, message=record.message(), token=token, expires_at=expires_at)
                claims.append(claim)
            if len(leases) > 64 and len(leases) > 4 * sum(q.sending for q in queues.values()):
                leases[:] = [e for e in leases if e[3].token == e[2] and e[3].expires_at == e[0]]
                heapq.heapify(leases)
            return claims

    def _leave(
        self, record: _Record, trigger: Trigger, error: str | None, now: datetime, retry: RetryPolicy
    ) -> None:
        """Move a SENDING message to where ``trigger`` takes it."""
        queue = record.queue
        cleared = record.epoch != queue.epoch
        next_attempt_at = None
        if (trigger is _SOFT_BOUNCE or trigger is _EXPIRE) and not cleared:
            next_attempt_at = retry.next_attempt(record.attempts, record.created_at, now, record.id)
        state, frozen_from = _leave_sending(
            trigger, record.claimed_from, cleared, next_attempt_at is None, queue.frozen
        )
        queue.sending -= 1
        record.token = record.expires_at = None
        record.updated_at = now
        if error is not None:
            record.last_error = error
        if trigger is _RELEASE:
            record.attempts -= 1
        back = frozen_from or state
        if back is _NEW or back is _RETRIES:
            if next_attempt_at is not None:
                record.next_attempt_at = next_attempt_at
            record.state = back
            if back is _NEW:
                queue.new += 1
            else:
                queue.retries += 1
            heapq.heappush(queue.heap, (record.next_attempt_at, record.seq, record))
            return
        record.state = state
        if state is _DELIVERED:
            queue.delivered += 1
        elif state is _FAILED:
            queue.failed += 1
        else:
            queue.deleted += 1

    def _holds(self, claim: Claim) -> _Record | None:
        record = self._records.get(claim.message.id)
        if record is None or record.state is not _SENDING or record.token != claim.token:
            return None
        return record

    def settle(
        self, settlements: Sequence[Settlement], now: datetime, retry: RetryPolicy
    ) -> list[LeaseLost | None]:
        with self._lock:
            results: list[LeaseLost | None] = []
            for settlement in settlements:
                record = self._holds(settlement.claim)
                if record is None:
                    results.append(LeaseLost(settlement.claim.message.id))
                    continue
                self._leave(record, settlement.trigger, settlement.error, now, retry)
                results.append(None)
            return results

    def renew(self, claim: Claim, lease: timedelta, now: datetime) -> Claim:
        with self._lock:
            record = self._holds(claim)
            if record is None:
                raise LeaseLost(claim.message.id)
            record.expires_at = expires_at = now + lease
            heapq.heappush(self._leases[record.queue.sender], (expires_at, record.seq, claim.token, record))
            return Claim(message=claim.message, token=claim.token, expires_at=expires_at)

    def _expire(self, sender: str, now: datetime, retry: RetryPolicy) -> int:
        leases = self._leases.get(sender)
        settled = 0
        while leases and leases[0][0] <= now:
            expires_at, _, token, record = heapq.heappop(leases)
            if record.token == token and record.expires_at == expires_at:
                self._leave(record, Trigger.EXPIRE, "lease expired", now, retry)
                settled += 1
        return settled

    def expire_leases(self, now: datetime, retry: RetryPolicy) -> int:
        with self._lock:
            return sum(self._expire(sender, now, retry) for sender in list(self._leases))

    def _targets(
        self, mailing: str, sender: str | None, now: datetime, *, create: bool
    ) -> list[_SenderQueue]:
        queues = self._by_mailing.get(mailing, {})
        if sender is None:
            return list(queues.values())
        if create:
            # A sender queue can be frozen before its first message arrives.
            return [self._queue(mailing, sender, now)]
        return [queues[sender]] if sender in queues else []

    def freeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        with self._lock:
            if sender is None:
                self._frozen_mailings.add(mailing)
            return sum(
                queue.set_frozen(True, now) for queue in self._targets(mailing, sender, now, create=True)
            )

    def unfreeze(self, mailing: str, sender: str | None, now: datetime) -> int:
        with self._lock:
            if sender is None:
                self._frozen_mailings.discard(mailing)
            # Like freeze, naming a sender queue makes it: its choice outlives a mailing-wide freeze.
            return sum(
                queue.set_frozen(False, now) for queue in self._targets(mailing, sender, now, create=True)
            )

    def clear(self, mailing: str, sender: str | None, now: datetime) -> int:
        with self._lock:
            return sum(queue.clear(now) for queue in self._targets(mailing, sender, now, create=False))

    def purge(self, older_than: datetime) -> int:
        with self._lock:
            doomed = []
            for record in self._records.values():
                state, _, updated_at = record.view()
                if updated_at < older_than and state in (_DELIVERED, _FAILED, _DELETED):
                    doomed.append((record, state))
            for record, state in doomed:
                del self._records[record.id]
                queue = record.queue
                if state is _DELIVERED:
                    queue.delivered -= 1
                elif state is _FAILED:
                    queue.failed -= 1
                else:
                    queue.deleted -= 1
            for queues in self._by_mailing.values():
                for queue in queues.values():
                    queue.cleared_heaps = [(at, h) for at, h in queue.cleared_heaps if at >= older_than]
            return len(doomed)

    # -- reads ----------------------------------------------------------------------

    def metrics(self, mailing: str, sender: str | None) -> Metrics:
        with self._lock:
            queues = self._by_mailing.get(mailing, {})
            if sender is not None:
                queue = queues.get(sender)
                return queue.metrics() if queue is not None else Metrics()
            total = Metrics()
            for queue in queues.values():
                total += queue.metrics()
            return total

    def metrics_by_sender(self, mailing: str) -> dict[str, Metrics]:
        with self._lock:
            return {sender: queue.metrics() for sender, queue in self._by_mailing.get(mailing, {}).items()}

    def get(self, message_id: str) -> Message:
        with self._lock:
            record = self._records.get(message_id)
            if record is None:
                raise UnknownMessage(message_id)
            return record.message()

    def close(self) -> None:
        """Nothing to release."""
