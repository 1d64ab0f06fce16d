"""The ``senderqueue`` command line: the demo, the operator commands, and how errors read."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import senderqueue as sq
from senderqueue._cli import main
from senderqueue._cli.commands import cli
from senderqueue._cli.demo import Demo
from senderqueue._cli.display import play
from senderqueue.testing import ManualClock

SMALL_DEMO = ["demo", "--messages", "200", "--speed", "10000"]
CONTENT = b"Subject: Spring sale\r\n\r\nhello\r\n"
METRIC_NAMES = ["total", "frozen", "new", "retries", "sending", "delivered", "failed", "deleted"]

# The demo's plain progress line, e.g. "Total 7,012 = New 6,800 + Retries 150 + Sending 62 + Frozen 0".
PROGRESS = re.compile(
    r"Total ([\d,]+) = New ([\d,]+) \+ Retries ([\d,]+) \+ Sending ([\d,]+) \+ Frozen ([\d,]+)"
)
SUMMARY_ALL = re.compile(r"^\s*all\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s*$", re.M)


def _numbers(*texts: str) -> list[int]:
    return [int(text.replace(",", "")) for text in texts]


def _invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def _one_error_line(result: Result) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1, result.stderr
    assert result.stdout == ""
    return errors[0]


# -- the demo ---------------------------------------------------------------------------


def test_small_demo_tells_the_story_and_its_counts_add_up() -> None:
    started = time.monotonic()
    result = _invoke(*SMALL_DEMO)
    assert time.monotonic() - started < 15  # "a few seconds"; generous for a loaded CI machine

    assert result.exit_code == 0, result.output
    out = result.stdout
    for step in ("launched by mistake", "CLEARS 'spring-sale-draft'", "FREEZE 'spring-sale'", "UNFREEZE"):
        assert step in out
    assert out.index("CLEARS") < out.index("FREEZE") < out.index("UNFREEZE")

    # Not a terminal: plain progress lines, each one obeying Total = New + Retries + Sending + Frozen.
    progress = PROGRESS.findall(out)
    assert len(progress) >= 2
    for line in progress:
        total, new, retries, sending, frozen = _numbers(*line)
        assert total == new + retries + sending + frozen
    assert _numbers(*progress[-1])[0] == 0
    assert "\x1b[" not in out

    # 200 messages in the mailing, 20 in the mistaken draft: every one has a verdict.
    (row,) = SUMMARY_ALL.findall(out)
    launched, delivered, failed, deleted = _numbers(*row)
    assert launched == 220
    assert delivered + failed + deleted == launched
    assert failed > 0  # the hard bounces of gone.example
    assert re.search(
        r"CLEARS 'spring-sale-draft': \d+ deleted; (\d+ in flight are spared|none was in flight)", out
    )
    assert re.search(
        r"[\d,]+ attempts in [\d.]+ s, \+\d+:\d\d:\d\d on the demo clock: [\d,]+ attempts/s", out
    )


def test_demo_on_a_terminal_draws_a_live_table_in_100_columns() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, height=30, color_system=None)
    with Demo("memory://", messages=200, senders=3, speed=10_000) as run:
        summary = play(run, console)

    assert sum(r.metrics.delivered + r.metrics.failed + r.metrics.deleted for r in summary.mailings) == 220
    assert all(r.metrics.total == 0 for r in summary.mailings)
    assert summary.attempts >= sum(r.metrics.delivered + r.metrics.failed for r in summary.mailings)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    for word in ("Total", "Frozen", "New", "Retries", "Sending", "Delivered", "Failed", "Deleted", "mta-3"):
        assert word in drawn
    assert "FREEZE" in drawn
    assert "UNFREEZE" in drawn
    assert "CLEARS" in drawn
    assert max(len(line) for line in drawn.splitlines()) <= 100


def test_demo_counts_each_sender_apart_and_senders_share_the_mailing() -> None:
    with Demo("memory://", messages=90, senders=2, speed=10_000) as run:
        for _ in run.story():
            time.sleep(0.005)
        by_sender = run.queue.metrics_by_sender(run.main.name)
    assert sorted(by_sender) == ["mta-1", "mta-2"]
    assert [m.delivered + m.failed for m in by_sender.values()] == [45, 45]


def test_demo_refuses_an_empty_mailing() -> None:
    result = _invoke("demo", "--messages", "0")
    assert result.exit_code == 2
    assert "--messages" in result.stderr


def test_demo_on_a_bad_url_says_so_in_one_line() -> None:
    line = _one_error_line(_invoke("demo", "--url", "nosuch://x"))
    assert line.startswith("Error: no backend is installed for nosuch://")


# -- metrics, freeze, unfreeze, clear, get on a URL -------------------------------------


def test_metrics_of_an_unknown_mailing_are_all_zero() -> None:
    result = _invoke("metrics", "spring-sale", "--url", "memory://", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == dict.fromkeys(METRIC_NAMES, 0)
    assert "memory:// is a new, empty queue" in result.stderr


def test_the_url_can_come_from_the_environment() -> None:
    result = _invoke(
        "metrics", "spring-sale", "--sender", "mta-1", "--json", env={"SENDERQUEUE_URL": "memory://"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 0


def test_without_a_url_the_commands_say_how_to_give_one() -> None:
    result = _invoke("metrics", "spring-sale", env={"SENDERQUEUE_URL": None})
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--url" in line
    assert "SENDERQUEUE_URL" in line


@pytest.mark.parametrize("command", ["freeze", "unfreeze", "clear"])
@pytest.mark.parametrize("sender", [[], ["--sender", "mta-1"]])
def test_operator_commands_on_an_empty_queue_move_nothing(command: str, sender: list[str]) -> None:
    result = _invoke(command, "spring-sale", *sender, "--url", "memory://", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"moved": 0}


def test_get_of_an_unknown_message_fails_in_one_line() -> None:
    result = _invoke("get", "no-such-id", "--url", "memory://", "--json")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert line == "Error: no message has id 'no-such-id'"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nosuch://host", "no backend is installed for nosuch://"),
        ("not a url", "is not a backend URL"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("memory://somewhere", "the memory backend takes only memory://"),
    ],
)
def test_a_bad_url_fails_in_one_line(url: str, says: str) -> None:
    assert says in _one_error_line(_invoke("metrics", "spring-sale", "--url", url))


def test_ids_that_look_like_rich_markup_are_shown_as_they_are() -> None:
    result = _invoke("metrics", "[/sale]", "--sender", "[bold]mta", "--url", "memory://")
    assert result.exit_code == 0, result.output
    assert "Mailing '[/sale]' on sender '[bold]mta'" in result.stdout
    assert re.search(r"^\s*\[bold\]mta(\s+0){8}\s*$", result.stdout, re.M)


def test_a_bad_mailing_id_fails_in_one_line() -> None:
    line = _one_error_line(_invoke("freeze", "bad\x01id", "--url", "memory://"))
    assert "control" in line


# A fresh memory:// is empty in each invocation, so to see real messages through the commands
# these tests hand them one prepared queue instead of the one the URL would open.


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> sq.SenderQueue:
    """A queue with three messages of 'spring-sale' on two senders, one of them soft-bounced."""
    clock = ManualClock(datetime(2030, 4, 1, 9, 0, tzinfo=UTC))
    queue = sq.SenderQueue(clock=clock)
    for n, sender in enumerate(["mta-1", "mta-1", "mta-2"]):
        queue.enqueue(
            mailing="spring-sale",
            sender=sender,
            recipient=f"ann.{n}@greylist.example",
            content=CONTENT,
            mail_from="news@shop.example",
            message_id=f"msg-{n}",
        )
    (claim,) = queue.claim("mta-2")
    queue.soft_bounce(claim, "451 4.7.1 Greylisted, please try again later")
    clock.advance(timedelta(minutes=1))
    monkeypatch.setattr(sq.SenderQueue, "open", classmethod(lambda cls, url: queue))
    return queue


def test_get_prints_a_message_with_iso_times_and_states_as_strings(queue: sq.SenderQueue) -> None:
    queue.freeze("spring-sale")
    result = _invoke("get", "msg-2", "--url", "memory://", "--json")
    assert result.exit_code == 0, result.output
    message = json.loads(result.stdout)
    assert message == {
        "id": "msg-2",
        "mailing": "spring-sale",
        "sender": "mta-2",
        "recipient": "ann.2@greylist.example",
        "mail_from": "news@shop.example",
        "state": "frozen",
        "frozen_from": "retries",
        "attempts": 1,
        "next_attempt_at": "2030-04-01T09:05:00+00:00",
        "last_error": "451 4.7.1 Greylisted, please try again later",
        "created_at": "2030-04-01T09:00:00+00:00",
        "updated_at": message["updated_at"],
        "content_size": len(CONTENT),
    }
    assert datetime.fromisoformat(message["updated_at"]).tzinfo is not None


def test_get_prints_a_table_for_people(queue: sq.SenderQueue) -> None:
    queue.freeze("spring-sale", sender="mta-2")
    result = _invoke("get", "msg-2", "--url", "memory://")
    assert result.exit_code == 0, result.output
    assert "Message 'msg-2'" in result.stdout
    assert re.search(r"^\s*state\s+frozen \(from retries\)\s*$", result.stdout, re.M)
    assert re.search(r"^\s*next attempt\s+2030-04-01 09:05:00 UTC\s*$", result.stdout, re.M)
    assert re.search(r"^\s*last error\s+451 4\.7\.1 Greylisted", result.stdout, re.M)
    result = _invoke("get", "msg-0", "--url", "memory://")
    assert re.search(r"^\s*state\s+new\s*$", result.stdout, re.M)
    assert re.search(r"^\s*last error\s+-\s*$", result.stdout, re.M)


def test_freeze_unfreeze_and_clear_report_what_they_moved(queue: sq.SenderQueue) -> None:
    def moved(*args: str) -> int:
        result = _invoke(*args, "--url", "memory://", "--json")
        assert result.exit_code == 0, result.output
        count: int = json.loads(result.stdout)["moved"]
        return count

    assert moved("freeze", "spring-sale", "--sender", "mta-1") == 2
    assert moved("freeze", "spring-sale") == 1
    assert moved("freeze", "spring-sale") == 0
    assert queue.metrics("spring-sale").frozen == 3
    assert moved("unfreeze", "spring-sale") == 3
    assert moved("clear", "spring-sale", "--sender", "mta-2") == 1
    assert queue.metrics("spring-sale").as_dict() == {
        **dict.fromkeys(METRIC_NAMES, 0),
        "total": 2,
        "new": 2,
        "deleted": 1,
    }


def test_operator_commands_say_what_they_did_in_a_sentence(queue: sq.SenderQueue) -> None:
    result = _invoke("freeze", "spring-sale", "--url", "memory://")
    assert result.stdout == "Froze 'spring-sale': 3 message(s) moved to Frozen.\n"
    result = _invoke("clear", "spring-sale", "--sender", "mta-1", "--url", "memory://")
    assert result.stdout == "Cleared 'spring-sale' on sender 'mta-1': 2 message(s) deleted.\n"


def test_metrics_json_is_the_metrics_as_a_dict(queue: sq.SenderQueue) -> None:
    result = _invoke("metrics", "spring-sale", "--url", "memory://", "--json")
    assert json.loads(result.stdout) == queue.metrics("spring-sale").as_dict()
    assert json.loads(result.stdout)["retries"] == 1
    result = _invoke("metrics", "spring-sale", "--sender", "mta-1", "--url", "memory://", "--json")
    assert json.loads(result.stdout) == {**dict.fromkeys(METRIC_NAMES, 0), "total": 2, "new": 2}


def test_metrics_table_has_a_row_per_sender_that_adds_up(queue: sq.SenderQueue) -> None:
    result = _invoke("metrics", "spring-sale", "--url", "memory://")
    assert result.exit_code == 0, result.output
    rows = {
        match[0]: _numbers(*match[1:])
        for match in re.findall(r"^\s*(all|mta-\d)" + r"\s+([\d,]+)" * 8 + r"\s*$", result.stdout, re.M)
    }
    assert rows == {
        "all": [3, 0, 2, 1, 0, 0, 0, 0],
        "mta-1": [2, 0, 2, 0, 0, 0, 0, 0],
        "mta-2": [1, 0, 0, 1, 0, 0, 0, 0],
    }


# -- the entry point ----------------------------------------------------------------------


def test_without_click_main_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "click", None)  # makes ``import click`` fail
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == "senderqueue: the command line needs click: pip install 'senderqueue[cli]'\n"


def test_python_dash_m_runs_the_demo_through_a_pipe() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "senderqueue", *SMALL_DEMO],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    (row,) = SUMMARY_ALL.findall(run.stdout)
    launched, delivered, failed, deleted = _numbers(*row)
    assert (launched, delivered + failed + deleted) == (220, 220)


def test_python_dash_m_fails_without_a_traceback() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "senderqueue", "get", "msg-1", "--url", "nosuch://"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("Error: no backend is installed")
