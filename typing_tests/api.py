"""The public API as a user writes it; only type-checked (``mypy typing_tests``), never run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import assert_type

import senderqueue as sq
from senderqueue.testing import ManualClock


def queue_api() -> None:
    clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    assert_type(clock(), datetime)
    queue = sq.SenderQueue(clock=clock, retry=sq.RetryPolicy(max_attempts=5), max_content_size=1024)
    assert_type(sq.SenderQueue(), sq.SenderQueue)
    assert_type(sq.SenderQueue(sq.MemoryBackend()), sq.SenderQueue)
    assert_type(sq.SenderQueue.open("memory://"), sq.SenderQueue)
    with sq.SenderQueue.open("memory://") as opened:
        assert_type(opened, sq.SenderQueue)

    msg_id = queue.enqueue(
        mailing="m1", sender="s1", recipient="ann@example.com", content=b"...", mail_from="news@shop.example"
    )
    assert_type(msg_id, str)
    new = sq.NewMessage(
        mailing="m1", sender="s1", recipient="bo@example.com", content=b"...", mail_from="news@shop.example"
    )
    assert_type(queue.enqueue_many([new]), list[str])
    assert_type(queue.enqueue_many(iter([new])), list[str])

    claims = queue.claim(sender="s1", limit=50, lease=timedelta(minutes=5))
    assert_type(claims, list[sq.Claim])
    claim = claims[0]
    assert_type(claim.message, sq.Message)
    assert_type(claim.token, str)
    assert_type(claim.expires_at, datetime)
    assert_type(queue.deliver(claim), None)
    assert_type(queue.soft_bounce(claim, "451 4.7.1 later"), None)
    assert_type(queue.hard_bounce(claim, "550 5.1.1 gone"), None)
    assert_type(queue.release(claim), None)
    assert_type(queue.renew(claim, lease=timedelta(minutes=1)), sq.Claim)

    outcomes: list[sq.Outcome] = [sq.Delivered(), sq.SoftBounce(code=451), sq.HardBounce(code=550)]
    results = queue.report_many([(claim, outcomes[0]), (claim, sq.SoftBounce(code=421, text="timeout"))])
    assert_type(results, list[sq.LeaseLost | None])
    for result in results:
        if result is not None:
            assert_type(result.message_id, str)

    assert_type(queue.freeze("m1"), int)
    assert_type(queue.unfreeze("m1", sender="s1"), int)
    assert_type(queue.clear("m1"), int)
    assert_type(queue.expire_leases(), int)
    assert_type(queue.purge(timedelta(days=30)), int)

    metrics = queue.metrics("m1")
    assert_type(metrics, sq.Metrics)
    assert_type(queue.metrics("m1", sender="s1"), sq.Metrics)
    assert_type(metrics.total, int)
    assert_type(metrics.frozen + metrics.new + metrics.retries + metrics.sending, int)
    assert_type(metrics.as_dict(), dict[str, int])
    assert_type(queue.metrics_by_sender("m1"), dict[str, sq.Metrics])

    message = queue.get(msg_id)
    assert_type(message, sq.Message)
    assert_type(message.id, str)
    assert_type(message.state, sq.State)
    assert_type(message.frozen_from, sq.State | None)
    assert_type(message.attempts, int)
    assert_type(message.next_attempt_at, datetime)
    assert_type(message.last_error, str | None)
    assert_type(message.created_at, datetime)
    assert_type(message.updated_at, datetime)
    assert_type(message.content, bytes)
    assert_type(queue.now(), datetime)
    queue.close()


def errors() -> None:
    queue = sq.SenderQueue()
    try:
        queue.get("nope")
    except sq.UnknownMessage as error:
        assert_type(error.message_id, str)
    except sq.DuplicateMessage as error:
        assert_type(error.message_id, str)
    except sq.InvalidArgument as error:
        assert_type(error, sq.InvalidArgument)
    except sq.SenderQueueError as error:
        assert_type(error, sq.SenderQueueError)


def retry_and_outcomes() -> None:
    policy = sq.RetryPolicy(min_backoff=timedelta(seconds=30), jitter=0.1, seed=7)
    assert_type(policy.backoff(3, "id"), timedelta)
    assert_type(policy.exhausted(3, datetime.now(UTC), datetime.now(UTC)), bool)
    assert_type(policy.next_attempt(3, datetime.now(UTC), datetime.now(UTC)), datetime | None)

    outcome = sq.parse_reply("451 4.7.1 Try later")
    assert_type(outcome, sq.Delivered | sq.SoftBounce | sq.HardBounce)
    assert_type(outcome.code, int)
    assert_type(outcome.enhanced, str | None)
    assert_type(outcome.text, str)
    classifier = sq.Classifier(exceptions={**sq.DEFAULT_EXCEPTIONS, "550": "soft"})
    assert_type(classifier.classify(550, "5.1.1", "gone"), sq.Outcome)
    assert_type(classifier.parse("250 ok"), sq.Outcome)
    if isinstance(outcome, sq.SoftBounce):
        assert_type(outcome, sq.SoftBounce)


def transports_and_workers() -> None:
    queue = sq.SenderQueue()
    transport = sq.FakeSMTPTransport(
        {
            "bob@example.com": "550 5.1.1 No such user",
            "slow.example": ["451 4.7.1 Busy", "250 OK"],
            "*": sq.Script(("250 OK",), latency=0.01),
        }
    )
    assert_type(transport.attempts, list[sq.Attempt])
    assert_type(transport.delivered, list[sq.Message])
    assert_type(transport.script_for("a@b.example"), sq.Script)

    def handler(message: sq.Message, attempt: int) -> sq.Outcome:
        return sq.Delivered() if attempt > 1 else sq.SoftBounce(code=451)

    fake: sq.Transport = sq.FakeSMTPTransport(handler=handler)
    worker = sq.SenderWorker(queue, fake, sender="s1", concurrency=20)
    summary = worker.run_until_idle()
    assert_type(summary, sq.WorkerSummary)
    assert_type(summary.delivered + summary.soft_bounced + summary.hard_bounced + summary.lost, int)
    assert_type(summary.attempts, int)
    assert_type(summary.rate, float)
    assert_type(worker.run(), sq.WorkerSummary)
    assert_type(worker.stop(), None)


def lifecycle() -> None:
    assert_type(sq.LIFECYCLE[sq.Trigger.CLAIM][sq.State.NEW], frozenset[sq.State])
    assert_type(sq.State.NEW in sq.QUEUED, bool)
    assert_type(sq.State.DELIVERED in sq.TERMINAL, bool)


def wrong_uses_are_type_errors() -> None:
    queue = sq.SenderQueue()
    queue.enqueue(mailing="m1", sender="s1", recipient="a@b.example", content="text", mail_from="f@b.example")  # type: ignore[arg-type]
    queue.claim("s1", lease=300)  # type: ignore[arg-type]
    queue.report_many([(queue.claim("s1")[0], "250 OK")])  # type: ignore[list-item]
    sq.Metrics().new = 3  # type: ignore[misc]
