"""Many processes on one Redis: exactly-once delivery, exact counts, and a worker killed mid-claim."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

import senderqueue as sq
from senderqueue.testing import ManualClock
from senderqueue.testing.conformance import new_message

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS_URL = os.environ.get("SENDERQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MESSAGES = 20_000
CELLS = [("m1", "s1"), ("m1", "s2"), ("m2", "s1"), ("m2", "s2")]

# A sender worker process: claims and reports until the mailings are drained and the operator is done
# (the stop file exists), then prints the ids it saw delivered. argv: url, sender, seed, stop file, mode.
WORKER = r"""
import json, os, random, sys, time
from datetime import timedelta
import senderqueue as sq

url, sender, seed, stop, mode = sys.argv[1:6]
retry = sq.RetryPolicy(min_backoff=timedelta(milliseconds=1), max_backoff=timedelta(milliseconds=4),
                       max_attempts=4)
queue = sq.SenderQueue.open(url, retry=retry)
rnd = random.Random(int(seed))
outcomes = {"deliver": sq.Delivered(code=250), "soft": sq.SoftBounce(code=451),
            "hard": sq.HardBounce(code=550)}
delivered = []
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    claims = queue.claim(sender, rnd.randint(1, 100), timedelta(minutes=10))
    if not claims:
        if os.path.exists(stop) and all(queue.metrics(m).total == 0 for m in ("m1", "m2")):
            break
        time.sleep(0.002)
        continue
    reports = []
    for claim in claims:
        roll = rnd.random() if mode == "race" else 1.0
        if roll < 0.05:
            queue.release(claim)
        else:
            verdict = "soft" if roll < 0.12 else "hard" if roll < 0.15 else "deliver"
            reports.append((claim, verdict))
    results = queue.report_many([(c, outcomes[v]) for c, v in reports])
    for (claim, verdict), lost in zip(reports, results):
        if lost is not None:
            sys.exit(f"unexpected {lost!r}")
        if verdict == "deliver":
            delivered.append(claim.message.id)
else:
    sys.exit("did not finish in time")
json.dump(delivered, sys.stdout)
"""

# A worker that is killed while it holds claims. argv: url, sender. Prints "holding" once it holds some.
CRASHING = r"""
import sys
from datetime import timedelta
import senderqueue as sq

url, sender = sys.argv[1:3]
queue = sq.SenderQueue.open(url)
held = queue.claim(sender, 10, timedelta(minutes=1))
print("holding", len(held), flush=True)
while True:
    for claim in queue.claim(sender, 7, timedelta(minutes=1)):
        queue.deliver(claim)
"""


@pytest.fixture
def url() -> Iterator[str]:
    """The test Redis with a fresh namespace, emptied afterwards."""
    probe = redis.Redis.from_url(REDIS_URL)
    try:
        probe.ping()
    except redis.RedisError:
        if IN_CI:
            pytest.fail(f"CI=true and Redis does not answer at {REDIS_URL}", pytrace=False)
        pytest.skip(f"!!! NOT TESTED: Redis does not answer at {REDIS_URL}")
    finally:
        probe.close()
    separator = "&" if "?" in REDIS_URL else "?"
    url = f"{REDIS_URL}{separator}namespace=p{uuid.uuid4().hex[:12]}"
    yield url
    queue = sq.SenderQueue.open(url)
    queue.backend.destroy()  # type: ignore[attr-defined]
    queue.close()


def _fill(queue: sq.SenderQueue) -> list[str]:
    ids = [f"{CELLS[n % 4][0]}-{CELLS[n % 4][1]}-{n}" for n in range(MESSAGES)]
    for start in range(0, MESSAGES, 1000):
        queue.enqueue_many(
            new_message(*CELLS[n % 4], n=n, message_id=ids[n]) for n in range(start, start + 1000)
        )
    return ids


def _workers(url: str, stop: Path, mode: str) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, f"s{n % 2 + 1}", str(n), str(stop), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]


def _delivered(workers: list[subprocess.Popen[str]]) -> Counter[str]:
    delivered: Counter[str] = Counter()
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        delivered.update(json.loads(out))
    return delivered


def _states(queue: sq.SenderQueue, ids: list[str]) -> dict[str, sq.State]:
    return {message_id: queue.get(message_id).state for message_id in ids}


def test_four_processes_deliver_each_message_exactly_once(url: str, tmp_path: Path) -> None:
    queue = sq.SenderQueue.open(url)
    ids = _fill(queue)
    stop = tmp_path / "stop"
    stop.touch()
    delivered = _delivered(_workers(url, stop, "deliver"))
    assert sorted(delivered) == sorted(ids)
    assert set(delivered.values()) == {1}
    assert queue.metrics("m1") == queue.metrics("m2") == sq.Metrics(delivered=MESSAGES // 2)
    assert queue.metrics_by_sender("m1") == {
        "s1": sq.Metrics(delivered=MESSAGES // 4),
        "s2": sq.Metrics(delivered=MESSAGES // 4),
    }
    queue.close()


def test_books_balance_while_an_operator_freezes_unfreezes_and_clears(url: str, tmp_path: Path) -> None:
    queue = sq.SenderQueue.open(url)
    ids = _fill(queue)
    stop = tmp_path / "stop"
    workers = _workers(url, stop, "race")
    problems: list[str] = []

    def operate() -> None:
        rnd = random.Random(7)
        try:
            for _ in range(400):
                mailing, sender = rnd.choice(["m1", "m2"]), rnd.choice([None, "s1", "s2"])
                action = rnd.choices(["freeze", "unfreeze", "clear"], weights=[10, 10, 1])[0]
                getattr(queue, action)(mailing, sender)
                for m in ("m1", "m2"):
                    metrics = queue.metrics(m)
                    if min(metrics.as_dict().values()) < 0:
                        problems.append(f"negative count: {metrics}")
            for m in ("m1", "m2"):
                queue.unfreeze(m)
        finally:
            stop.touch()

    operator = threading.Thread(target=operate)
    operator.start()
    delivered = _delivered(workers)
    operator.join()
    assert problems == []
    states = _states(queue, ids)
    assert set(states.values()) <= sq.TERMINAL
    for message_id, state in states.items():
        assert delivered[message_id] == (1 if state is sq.State.DELIVERED else 0), message_id
    for mailing in ("m1", "m2"):
        mine = [s for message_id, s in states.items() if message_id.startswith(mailing + "-")]
        assert queue.metrics(mailing) == sq.Metrics.count(mine)
    total = queue.metrics("m1") + queue.metrics("m2")
    assert total.delivered + total.failed + total.deleted == MESSAGES
    assert total.deleted > 0
    queue.close()


def test_a_worker_killed_mid_claim_loses_nothing(url: str) -> None:
    queue = sq.SenderQueue.open(url)
    ids = queue.enqueue_many(new_message(n=n) for n in range(2000))
    worker = subprocess.Popen(
        [sys.executable, "-c", CRASHING, url, "s1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline().split() == ["holding", "10"]
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    # Past every lease the dead worker held: they expire, count an attempt, and come back.
    later = ManualClock(sq.system_clock() + timedelta(minutes=2))
    recovery = sq.SenderQueue.open(url, clock=later)
    held = recovery.metrics("m1").sending
    assert held >= 10
    assert recovery.expire_leases() == held
    later.advance(timedelta(hours=1))
    while claims := recovery.claim("s1", 100):
        assert not any(recovery.report_many([(c, sq.Delivered(code=250)) for c in claims]))
    assert recovery.metrics("m1") == sq.Metrics(delivered=len(ids))
    attempts = Counter(recovery.get(i).attempts for i in ids)
    assert attempts[2] == held
    assert attempts[1] == len(ids) - held
    recovery.close()
    queue.close()
