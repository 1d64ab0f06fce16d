"""How the demo is shown: a live table on a terminal, plain progress lines anywhere else."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from types import TracebackType
from typing import Protocol

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .._models import Metrics
from .demo import Demo, DemoSummary, Snapshot

__all__ = ["metrics_table", "pace", "play", "summary_table"]

TICK = 0.02
"""Seconds between two looks at the queue: the operator reacts within a tick."""

PLAIN_EVERY = 1.0
"""Seconds between two progress lines when there is no live display."""

# Terminal counts are dimmed so the eye goes to the five metrics.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("Total", "bold"),
    ("Frozen", "cyan"),
    ("New", ""),
    ("Retries", "yellow"),
    ("Sending", "magenta"),
    ("Delivered", "green"),
    ("Failed", "red"),
    ("Deleted", "dim"),
)

MAX_SENDER_ROWS = 6
"""Beyond this many senders the live table shows mailings only, to fit a 30-line terminal."""


def metrics_table(
    rows: list[tuple[Text | str, Metrics]], *, label: str = "Mailing / sender", title: str | None = None
) -> Table:
    """A table of the five metrics and the three terminal counts, one row per mailing or sender queue."""
    # Collapsed padding: the nine columns fit in 80 characters, the width of a pipe.
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        title=Text(title) if title is not None else None,
        title_justify="left",
    )
    table.add_column(label, no_wrap=True)
    for name, style in COLUMNS:
        table.add_column(name, justify="right", style=style, header_style=style or "bold")
    for queue, metrics in rows:
        counts = metrics.as_dict()
        # Ids may hold brackets; as Text they are shown, never read as rich markup.
        table.add_row(
            Text(queue) if isinstance(queue, str) else queue,
            *(f"{counts[name.lower()]:,}" for name, _ in COLUMNS),
        )
    return table


def summary_table(summary: DemoSummary) -> Table:
    """How each mailing ended, the totals, and the pace of the run."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="Summary", title_justify="left")
    table.add_column("Mailing", no_wrap=True)
    for name, style in (("Launched", ""), ("Delivered", "green"), ("Failed", "red"), ("Deleted", "dim")):
        table.add_column(name, justify="right", style=style)
    launched = delivered = failed = deleted = 0
    for result in summary.mailings:
        metrics = result.metrics
        table.add_row(
            Text(result.mailing.name),
            *(f"{n:,}" for n in (result.mailing.size, metrics.delivered, metrics.failed, metrics.deleted)),
        )
        launched += result.mailing.size
        delivered += metrics.delivered
        failed += metrics.failed
        deleted += metrics.deleted
    table.add_section()
    table.add_row("all", *(f"{n:,}" for n in (launched, delivered, failed, deleted)), style="bold")
    return table


def pace(summary: DemoSummary) -> str:
    """The attempts, the time they took and their rate, in one line."""
    lost = f" ({summary.lost} reported after their lease ran out)" if summary.lost else ""
    return (
        f"{summary.attempts:,} attempts{lost} in {summary.elapsed:.1f} s, "
        f"{_story_time(summary.story_time)} on the demo clock: {summary.rate:,.0f} attempts/s"
    )


def _story_time(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"+{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _narration(story_time: timedelta, line: str) -> Table:
    # A grid, so that a long line wraps under its text, not under its time.
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row(_story_time(story_time), Text(line))
    return grid


class Screen(Protocol):
    """Where the demo shows its progress and its narration."""

    def show(self, snapshot: Snapshot) -> None:
        """Show the metrics as they are now (a screen may skip some)."""
        ...

    def narrate(self, snapshot: Snapshot, line: str) -> None:
        """Tell what just happened."""
        ...

    def __enter__(self) -> Screen: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class LiveScreen:
    """A live table and progress bar at the bottom of the terminal; narration scrolls above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = Live(console=console, refresh_per_second=10, transient=False)
        self._shown_at = 0.0

    def __enter__(self) -> LiveScreen:
        self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._live.stop()

    def show(self, snapshot: Snapshot) -> None:
        """Redraw the frame, at most ten times a second."""
        now = time.monotonic()
        if now - self._shown_at >= 0.1:
            self._shown_at = now
            self._live.update(frame(snapshot))

    def narrate(self, snapshot: Snapshot, line: str) -> None:
        """Print a line above the live frame, redrawn at once to show what the line tells."""
        self._shown_at = time.monotonic()
        self._live.update(frame(snapshot), refresh=True)
        self._live.console.print(_narration(snapshot.story_time, line))


def frame(snapshot: Snapshot) -> RenderableType:
    """The live frame: a title line, the metrics table and the main mailing's progress bar."""
    main, main_metrics = snapshot.main
    draft, draft_metrics = snapshot.draft
    frozen = Text(" (frozen)", style="bold cyan") if snapshot.frozen else Text("")
    rows: list[tuple[Text | str, Metrics]] = [(Text.assemble((main.name, "bold"), frozen), main_metrics)]
    if len(snapshot.by_sender) <= MAX_SENDER_ROWS:
        rows += [(Text(f"  {sender}", style="dim"), m) for sender, m in sorted(snapshot.by_sender.items())]
    rows.append((Text(draft.name, style="bold"), draft_metrics))
    table = metrics_table(rows)
    table.caption = "Total = Frozen + New + Retries + Sending"
    table.caption_justify = "left"

    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text(main.name, style="bold"),
        ProgressBar(total=main.size, completed=snapshot.done, width=40),
        Text(f"{snapshot.done / main.size:>4.0%}"),
        Text(f"{snapshot.done:,} of {main.size:,} delivered or failed", style="dim"),
    )
    title = Text.assemble(
        ("senderqueue demo", "bold"),
        f"  demo clock {_story_time(snapshot.story_time)}  real {snapshot.elapsed:.1f} s",
    )
    return Group(title, Text(""), table, Text(""), bar)


class PlainScreen:
    """Plain lines for logs and pipes: narration as it happens, the metrics once a second."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._shown_at = -PLAIN_EVERY
        self._last: Snapshot | None = None

    def __enter__(self) -> PlainScreen:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._last is not None and exc_type is None:
            self._print(self._last)

    def show(self, snapshot: Snapshot) -> None:
        """Print a progress line if a second has passed since the last one."""
        self._last = snapshot
        now = time.monotonic()
        if now - self._shown_at >= PLAIN_EVERY:
            self._shown_at = now
            self._print(snapshot)

    def narrate(self, snapshot: Snapshot, line: str) -> None:
        """Print the line as it is."""
        self._last = snapshot
        self.console.print(
            f"{_story_time(snapshot.story_time)}  >> {line}", soft_wrap=True, highlight=False, markup=False
        )

    def _print(self, snapshot: Snapshot) -> None:
        mailing, m = snapshot.main
        self.console.print(
            f"{_story_time(snapshot.story_time)}  {mailing.name}: Total {m.total:,} = New {m.new:,} "
            f"+ Retries {m.retries:,} + Sending {m.sending:,} + Frozen {m.frozen:,} | Delivered "
            f"{m.delivered:,} Failed {m.failed:,} Deleted {m.deleted:,} | "
            f"{snapshot.done / mailing.size:.0%} done",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


def play(demo: Demo, console: Console) -> DemoSummary:
    """Run the demo's story on the console, live on a terminal, in plain lines elsewhere."""
    live = console.is_terminal and not console.is_dumb_terminal
    screen: Screen = LiveScreen(console) if live else PlainScreen(console)
    with screen, contextlib.closing(demo.story()) as story:
        for line in story:
            snapshot = demo.snapshot()
            if line is None:
                screen.show(snapshot)
                time.sleep(TICK)
            else:
                screen.narrate(snapshot, line)
    return demo.summary()
