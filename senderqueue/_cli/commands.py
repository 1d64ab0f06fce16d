"""The ``senderqueue`` commands: a demo, and an operator's view and controls on any backend."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._errors import SenderQueueError
from .._models import Message, Metrics
from .._queue import SenderQueue
from .._smtp import SMTPTransport
from .._worker import DomainLimit, SenderWorker
from .demo import Demo
from .display import metrics_table, pace, play, summary_table

__all__ = ["cli"]

_F = TypeVar("_F", bound=Callable[..., Any])

URL_HELP = (
    "The backend: memory://, sqlite:///queue.db, postgresql://..., redis://... "
    "(memory:// is a new, empty queue in this process)."
)


def _url_option(function: _F) -> _F:
    return click.option("--url", envvar="SENDERQUEUE_URL", show_envvar=True, metavar="URL", help=URL_HELP)(
        function
    )


def _sender_option(function: _F) -> _F:
    return click.option(
        "--sender", metavar="SENDER", help="Only this sender queue of the mailing (default: all of them)."
    )(function)


def _json_option(function: _F) -> _F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for machines instead of a table."
    )(function)


class _NoBackend(click.ClickException):
    """No URL says which backend to act on."""

    exit_code = 2


@contextlib.contextmanager
def _opened(url: str | None) -> Iterator[SenderQueue]:
    """The queue at ``url``; any senderqueue error on the way becomes one line on stderr and exit 1."""
    # These commands inspect and steer queues that already exist, so there is no default:
    # a default memory:// would always answer "zero messages", which is worse than an error.
    if not url:
        raise _NoBackend("no backend: pass --url URL or set SENDERQUEUE_URL")
    try:
        with SenderQueue.open(url) as queue:
            if urlsplit(url).scheme == "memory":
                click.echo("note: memory:// is a new, empty queue in this process", err=True)
            yield queue
    except (SenderQueueError, ValueError) as error:  # ValueError: a URL that urllib cannot parse
        raise click.ClickException(str(error)) from None


def _console() -> Console:
    # Made per command, so that it writes to the stdout of this invocation (CliRunner swaps it).
    return Console(highlight=False)


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _target(mailing: str, sender: str | None) -> str:
    return f"{mailing!r} on sender {sender!r}" if sender is not None else f"{mailing!r}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="senderqueue")
def cli() -> None:
    """Watch and steer the sender queues of an email platform.

    Run `senderqueue demo` to see a mailing delivered, frozen, unfrozen and cleared.
    """


@cli.command()
@click.option(
    "--messages", default=10_000, show_default=True, type=click.IntRange(min=1), help="Size of the mailing."
)
@click.option(
    "--senders", default=3, show_default=True, type=click.IntRange(1, 50), help="Senders sharing the mailing."
)
@click.option(
    "--speed",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="How many times faster than real time the demo clock runs.",
)
@click.option(
    "--url",
    default="memory://",
    show_default=True,
    metavar="URL",
    help="The backend to run on; the demo writes two mailings there, so use a scratch database.",
)
def demo(messages: int, senders: int, speed: float, url: str) -> None:
    """Deliver a realistic mailing through a fake SMTP server, live.

    Soft bounces (greylisting) retry after minutes of backoff and hard bounces fail; on
    the way, the operator clears a draft launched by mistake, then freezes and unfreezes
    the mailing. The demo clock runs SPEED times faster, so the story takes seconds.
    SENDERQUEUE_URL is ignored here, so that a demo never writes into a real queue by accident.
    """
    console = _console()
    try:
        with Demo(url, messages=messages, senders=senders, speed=speed) as run:
            summary = play(run, console)
    except (SenderQueueError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        console.print("Interrupted: the workers stopped after their sends in flight.")
        raise SystemExit(130) from None
    console.print()
    console.print(summary_table(summary))
    console.print(pace(summary))


@cli.command()
@click.argument("mailing")
@_sender_option
@_url_option
@_json_option
def metrics(mailing: str, sender: str | None, url: str | None, as_json: bool) -> None:
    """Show the live counts of MAILING.

    Total, Frozen, New, Retries and Sending (Total is the sum of the other four), then the
    Delivered, Failed and Deleted messages not yet purged. An unknown mailing has all-zero counts.
    """
    with _opened(url) as queue:
        by_sender = {} if sender is not None else queue.metrics_by_sender(mailing)
        # Summed from the one read of every sender queue, so that the rows add up to the total.
        total = queue.metrics(mailing, sender) if sender is not None else sum(by_sender.values(), Metrics())
    if as_json:
        _print_json(total.as_dict())
        return
    rows: list[tuple[Text | str, Metrics]] = [(sender or "all", total)]
    rows += [(Text(f"  {name}", style="dim"), counts) for name, counts in sorted(by_sender.items())]
    _console().print(metrics_table(rows, label="Sender", title=f"Mailing {_target(mailing, sender)}"))


def _print_moved(moved: int, as_json: bool, sentence: str) -> None:
    if as_json:
        _print_json({"moved": moved})
    else:
        click.echo(sentence)


@cli.command()
@click.argument("mailing")
@_sender_option
@_url_option
@_json_option
def freeze(mailing: str, sender: str | None, url: str | None, as_json: bool) -> None:
    """Pause MAILING: its New and Retries messages become Frozen.

    Whatever arrives stays Frozen until it is unfrozen; messages being sent finish.
    Without --sender, every sender queue of the mailing freezes, and so do those it gets later.
    """
    with _opened(url) as queue:
        moved = queue.freeze(mailing, sender)
    _print_moved(moved, as_json, f"Froze {_target(mailing, sender)}: {moved:,} message(s) moved to Frozen.")


@cli.command()
@click.argument("mailing")
@_sender_option
@_url_option
@_json_option
def unfreeze(mailing: str, sender: str | None, url: str | None, as_json: bool) -> None:
    """Resume MAILING: each Frozen message returns to New or Retries.

    A retry keeps its attempts and its next attempt time.
    """
    with _opened(url) as queue:
        moved = queue.unfreeze(mailing, sender)
    _print_moved(
        moved, as_json, f"Unfroze {_target(mailing, sender)}: {moved:,} message(s) back to New or Retries."
    )


@cli.command()
@click.argument("mailing")
@_sender_option
@_url_option
@_json_option
def clear(mailing: str, sender: str | None, url: str | None, as_json: bool) -> None:
    """Delete the New, Frozen and Retries messages of MAILING.

    Messages being sent are spared: delivered, they count as delivered; back without a
    verdict, they are deleted.
    """
    with _opened(url) as queue:
        moved = queue.clear(mailing, sender)
    _print_moved(moved, as_json, f"Cleared {_target(mailing, sender)}: {moved:,} message(s) deleted.")


def message_as_dict(message: Message) -> dict[str, object]:
    """A message as JSON-ready data: states as their names, times in ISO 8601, the content's size."""
    return {
        "id": message.id,
        "mailing": message.mailing,
        "sender": message.sender,
        "recipient": message.recipient,
        "mail_from": message.mail_from,
        "state": message.state.value,
        "frozen_from": message.frozen_from.value if message.frozen_from is not None else None,
        "attempts": message.attempts,
        "next_attempt_at": message.next_attempt_at.isoformat(),
        "last_error": message.last_error,
        "created_at": message.created_at.isoformat(),
        "updated_at": message.updated_at.isoformat(),
        "content_size": len(message.content),
    }


@cli.command()
@click.argument("message_id")
@_url_option
@_json_option
def get(message_id: str, url: str | None, as_json: bool) -> None:
    """Show one message.

    Its sender queue, recipient, state, attempts, next attempt time and last error.
    """
    with _opened(url) as queue:
        message = queue.get(message_id)
    if as_json:
        _print_json(message_as_dict(message))
        return
    state = message.state.value + (f" (from {message.frozen_from.value})" if message.frozen_from else "")
    rows = {
        "id": message.id,
        "mailing": message.mailing,
        "sender": message.sender,
        "recipient": message.recipient,
        "mail from": message.mail_from,
        "state": state,
        "attempts": str(message.attempts),
        "next attempt": _when(message.next_attempt_at),
        "last error": message.last_error or "-",
        "created": _when(message.created_at),
        "updated": _when(message.updated_at),
        "content": f"{len(message.content):,} bytes",
    }
    table = Table(
        box=box.SIMPLE,
        show_header=False,
        show_edge=False,
        title=Text(f"Message {message.id!r}"),
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field, value in rows.items():
        table.add_row(field, Text(value))
    _console().print(table)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- worker ----------------------------------------------------------------------------

SMTP_PASSWORD_ENV = "SENDERQUEUE_SMTP_PASSWORD"


def _smart_host(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:25
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host, int(port)


def _progress_line(worker: SenderWorker) -> Text:
    p = worker.progress
    return Text(
        f"sent {p.delivered:,}  soft {p.soft_bounced:,}  hard {p.hard_bounced:,}  "
        f"in flight {worker.claimed:,}  {p.rate:,.1f}/s  {p.elapsed:,.0f} s"
    )


@cli.command()
@_url_option
@click.option("--sender", required=True, metavar="SENDER", help="The sender whose queues to work.")
@click.option(
    "--smtp",
    "smart_host",
    required=True,
    metavar="HOST:PORT",
    callback=_smart_host,
    help="The SMTP server to relay to (a smart host).",
)
@click.option(
    "--starttls", is_flag=True, help="Upgrade each connection with STARTTLS (certificate verified)."
)
@click.option(
    "--insecure", is_flag=True, help="Accept any TLS certificate: for tests against a self-signed server."
)
@click.option(
    "--user",
    metavar="USER",
    help=f"Log in with AUTH as USER; the password is read from ${SMTP_PASSWORD_ENV}.",
)
@click.option(
    "--concurrency", default=10, show_default=True, type=click.IntRange(min=1), help="Sends in flight."
)
@click.option(
    "--domain-concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="Sends in flight per recipient domain.",
)
@click.option(
    "--domain-rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="PER_SECOND",
    help="Sends started per second per recipient domain.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for each SMTP reply (the reply to the end of the data: up to 10 minutes).",
)
@click.option(
    "--until-idle", is_flag=True, help="Stop when nothing of the sender is due, instead of waiting."
)
@_json_option
def worker(
    url: str | None,
    sender: str,
    smart_host: tuple[str, int],
    starttls: bool,
    insecure: bool,
    user: str | None,
    concurrency: int,
    domain_concurrency: int | None,
    domain_rate: float | None,
    timeout: float,
    until_idle: bool,
    as_json: bool,
) -> None:
    """Deliver SENDER's messages through an SMTP server, until SIGTERM or Ctrl-C.

    On a stop, the sends in flight finish and the messages claimed but not started are
    given back; then a summary is printed. The password for --user comes from the
    environment, never from the command line, and is never shown.
    """
    password = None
    if user is not None:
        password = os.environ.get(SMTP_PASSWORD_ENV)
        if not password:
            raise click.ClickException(f"--user needs the password in ${SMTP_PASSWORD_ENV}")
    host, port = smart_host
    transport = SMTPTransport(
        host, port, starttls=starttls, verify=not insecure, username=user, password=password, timeout=timeout
    )
    console = _console()
    with _opened(url) as queue:
        runner = SenderWorker(
            queue,
            transport,
            sender=sender,
            concurrency=concurrency,
            domain_limit=DomainLimit(concurrency=domain_concurrency, rate=domain_rate),
        )
        run = runner.run_until_idle if until_idle else runner.run
        if as_json:
            summary = run()
        else:
            with Live(console=console, get_renderable=lambda: _progress_line(runner), transient=True):
                summary = run()
    if as_json:
        _print_json({**attrs.asdict(summary), "rate": summary.rate})
    else:
        console.print(str(summary))
