"""Measure SenderWorker + SMTPTransport against a plain smtplib loop, on an aiosmtpd sink on loopback.

Run ``python benchmarks/smtp.py`` (5,000 messages of 5 KB per row, three rounds;
``--quick`` for 500 messages and one round). Each round sends the same messages to
the same sink, row after row:

* ``smtplib loop``: the baseline, one connection, ``sendmail`` per message;
* ``aiosmtplib loop``: the same loop on aiosmtplib (one connection, awaited in turn);
* ``worker cN``: ``SenderWorker`` over an in-memory queue with ``SMTPTransport``, concurrency N
  (claims, reports and lease bookkeeping included);
* ``worker c50 uvloop``: the same worker on uvloop's event loop (``pip install uvloop``);
* ``worker c50 smtplib`` and ``worker c50 aiosmtplib``: the same worker with a transport on
  smtplib (blocking, in 50 threads) or on aiosmtplib's ``sendmail``, one pooled connection per
  concurrent send, to compare the SMTP clients under the same load.

The sink is aiosmtpd answering at once, with the smallest handler; it runs in processes
of its own (``--sink-processes``, one per CPU by default, sharing the port with
SO_REUSEPORT), so that its CPU is not the client's and one sink process is not the
ceiling. It advertises PIPELINING, as Postfix does (``--no-pipelining`` turns it off);
``--sink-loop uvloop`` runs it on uvloop; ``--sink-delay 0.005`` makes it wait 5 ms
before accepting each message, as a real MTA does while it writes and fsyncs its queue file.

Each figure is the median of the rounds; ``x loop`` is the median of each round's ratio
to that round's smtplib loop. ``CPU s / 1000`` is the client's (user + system, every thread),
``sink`` the sink processes' together. ``CPU ceiling`` is the most ``x loop`` the row could
reach from its CPU per message alone: a worker that kept every CPU busy, against a loop that
keeps one busy, each at the client + sink CPU per message measured here (shown only when
the sink answers at once: one that waits leaves the loop idle, not CPU-bound). That ceiling,
not the clients' design, bounds a worker on a small machine: see docs/smtp.md. Other work
on the machine takes CPUs the worker needs and the loop does not: note the load averages.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import smtplib
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version

import senderqueue as sq

try:
    import aiosmtplib

    HAVE_AIOSMTPLIB = True
except ImportError:  # the comparison rows need it; the rest does not
    HAVE_AIOSMTPLIB = False

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # only the uvloop rows and --sink-loop uvloop need it
    HAVE_UVLOOP = False

MAIL_FROM = "news@shop.example"
SINK = """
import asyncio, sys
from aiosmtpd.smtp import SMTP

pipelining, port, delay, loop_name = sys.argv[1] == "yes", int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]


class Sink:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        if delay:
            await asyncio.sleep(delay)
        return "250 2.0.0 OK"


if loop_name == "uvloop":
    import uvloop

    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
handler = Sink()
session = lambda: SMTP(handler, hostname="sink.example", loop=loop)
server = loop.run_until_complete(loop.create_server(session, "127.0.0.1", port, reuse_port=True))
loop.add_reader(sys.stdin.fileno(), loop.stop)  # the parent closed our stdin: stop
print("ready", flush=True)
loop.run_forever()
"""


def content(n: int, size: int = 5 * 1024) -> bytes:
    head = f"From: {MAIL_FROM}\r\nTo: u{n}@example.com\r\nSubject: benchmark {n}\r\n\r\n".encode()
    line = b"The quick brown fox jumps over the lazy dog, and then some more text here..\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[: size - 2] + b"\r\n"


def recipients(count: int) -> list[str]:
    return [f"u{n}@d{n % 20}.example" for n in range(count)]


class AiosmtplibTransport:
    """A Transport on aiosmtplib's ``sendmail``: one pooled connection per concurrent send."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[aiosmtplib.SMTP] = []
        self.classifier = sq.Classifier()

    async def send(self, message: sq.Message) -> sq.Outcome:
        client = self.idle.pop() if self.idle else None
        if client is None:
            client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=30, start_tls=False)
            await client.connect()
        try:
            _, reply = await client.sendmail(message.mail_from, [message.recipient], message.content)
        except aiosmtplib.SMTPResponseException as error:
            self.idle.append(client)
            return self.classifier.classify(error.code, None, error.message)
        self.idle.append(client)
        return self.classifier.parse(f"250 {reply}")

    async def aclose(self) -> None:
        for client in self.idle:
            await client.quit()
        self.idle = []


class SmtplibTransport:
    """A Transport on smtplib in threads: one pooled, blocking connection per concurrent send."""

    def __init__(self, host: str, port: int, threads: int) -> None:
        self.host, self.port = host, port
        self.idle: list[smtplib.SMTP] = []
        self.classifier = sq.Classifier()
        self.executor = concurrent.futures.ThreadPoolExecutor(threads)

    def _send(self, message: sq.Message) -> sq.Outcome:
        client = self.idle.pop() if self.idle else smtplib.SMTP(self.host, self.port, timeout=30)
        try:
            client.sendmail(message.mail_from, [message.recipient], message.content)
        except smtplib.SMTPResponseException as error:
            outcome = self.classifier.classify(error.smtp_code, None, str(error.smtp_error))
        except smtplib.SMTPRecipientsRefused as error:
            code, text = next(iter(error.recipients.values()))
            outcome = self.classifier.classify(code, None, str(text))
        else:
            outcome = sq.Delivered()
        self.idle.append(client)
        return outcome

    async def send(self, message: sq.Message) -> sq.Outcome:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._send, message)

    async def aclose(self) -> None:
        for client in self.idle:
            client.quit()
        self.idle = []
        self.executor.shutdown()


def smtplib_loop(port: int, messages: list[tuple[str, bytes]]) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for recipient, data in messages:
            client.sendmail(MAIL_FROM, [recipient], data)


def aiosmtplib_loop(port: int, messages: list[tuple[str, bytes]]) -> None:
    async def run() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
            for recipient, data in messages:
                await client.sendmail(MAIL_FROM, [recipient], data)

    asyncio.run(run())


@contextmanager
def uvloop_policy() -> Iterator[None]:
    """Run ``asyncio.run`` (so a SenderWorker) on uvloop for the duration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # event loop policies, from Python 3.14
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        try:
            yield
        finally:
            asyncio.set_event_loop_policy(previous)


def worker_run(
    port: int, messages: list[tuple[str, bytes]], concurrency: int, client: str = "senderqueue"
) -> Callable[[], None]:
    """A SenderWorker over a queue that holds ``messages``: the enqueue is not measured, the run is."""
    queue = sq.SenderQueue()
    queue.enqueue_many(
        sq.NewMessage(mailing="m1", sender="s1", recipient=recipient, content=data, mail_from=MAIL_FROM)
        for recipient, data in messages
    )
    transport: sq.Transport
    if client == "aiosmtplib":
        transport = AiosmtplibTransport("127.0.0.1", port)
    elif client == "smtplib":
        transport = SmtplibTransport("127.0.0.1", port, concurrency)
    else:
        transport = sq.SMTPTransport("127.0.0.1", port)
    worker = sq.SenderWorker(queue, transport, sender="s1", concurrency=concurrency)

    def run() -> None:
        if client == "uvloop":
            with uvloop_policy():
                summary = worker.run_until_idle()
        else:
            summary = worker.run_until_idle()
        if summary.delivered != len(messages):
            raise SystemExit(f"only {summary.delivered} of {len(messages)} delivered: {summary}")

    return run


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SinkProcesses:
    """The aiosmtpd sink, in processes of its own sharing one port, so that its CPU is not the client's."""

    def __init__(self, *, processes: int, pipelining: bool, delay: float, loop: str) -> None:
        self.count = processes
        self.arguments = ["yes" if pipelining else "no", "0", str(delay), loop]
        self.processes: list[subprocess.Popen[str]] = []

    def __enter__(self) -> SinkProcesses:
        # A bound but not listening SO_REUSEPORT socket holds a free port until the sinks listen on it.
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(("127.0.0.1", 0))
            self.port: int = holder.getsockname()[1]
            self.arguments[1] = str(self.port)
            for _ in range(self.count):
                process = subprocess.Popen(
                    [sys.executable, "-c", SINK, *self.arguments],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                self.processes.append(process)
                assert process.stdout is not None
                if process.stdout.readline().strip() != "ready":
                    self.__exit__()
                    raise SystemExit("the sink did not start")
        return self

    def cpu(self) -> float:
        return sum(cpu_of(process.pid) for process in self.processes)

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()
        for process in self.processes:
            process.wait(10)


def measure(prepare: Callable[[], Callable[[], None]], sink: SinkProcesses) -> tuple[float, float, float]:
    """Wall seconds, client CPU seconds and sink CPU seconds of one run (its preparation not counted)."""
    run = prepare()
    cpu, wall, sink_cpu = time.process_time(), time.perf_counter(), sink.cpu()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu, sink.cpu() - sink_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 messages, one round")
    parser.add_argument("--count", type=int, default=None, help="messages per row (5,000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every row (3)")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--sink-delay", type=float, default=0.0, help="seconds the sink takes per message")
    parser.add_argument("--sink-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sink-loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--rows", default=None, help="only the rows whose name holds one of these, comma-separated"
    )
    args = parser.parse_args()
    count = args.count or (500 if args.quick else 5000)
    rounds = args.rounds or (1 if args.quick else 3)
    messages = [(recipient, content(n)) for n, recipient in enumerate(recipients(count))]
    cpus = os.cpu_count() or 1
    if args.sink_loop == "uvloop" and not HAVE_UVLOOP:
        raise SystemExit("--sink-loop uvloop needs uvloop: pip install uvloop")

    with SinkProcesses(
        processes=args.sink_processes,
        pipelining=not args.no_pipelining,
        delay=args.sink_delay,
        loop=args.sink_loop,
    ) as sink:
        port = sink.port
        rows: list[tuple[str, Callable[[], Callable[[], None]]]] = [
            ("smtplib loop", lambda: lambda: smtplib_loop(port, messages)),
            *((f"worker c{c}", lambda c=c: worker_run(port, messages, c)) for c in (1, 10, 50)),
            ("worker c50 smtplib", lambda: worker_run(port, messages, 50, "smtplib")),
        ]
        if HAVE_UVLOOP:
            rows.insert(4, ("worker c50 uvloop", lambda: worker_run(port, messages, 50, "uvloop")))
        if HAVE_AIOSMTPLIB:
            rows.insert(1, ("aiosmtplib loop", lambda: lambda: aiosmtplib_loop(port, messages)))
            rows.append(("worker c50 aiosmtplib", lambda: worker_run(port, messages, 50, "aiosmtplib")))
        if args.rows:
            wanted = args.rows.split(",")
            rows = [rows[0], *(row for row in rows[1:] if any(word in row[0] for word in wanted))]
        print(
            f"# {count} messages of {len(messages[0][1])} B, {rounds} round(s); "
            f"Python {platform.python_version()}, {cpus} CPUs, aiosmtpd {version('aiosmtpd')}, "
            f"aiosmtplib {version('aiosmtplib') if HAVE_AIOSMTPLIB else 'not installed'}, "
            f"uvloop {version('uvloop') if HAVE_UVLOOP else 'not installed'}; "
            f"sink: {args.sink_processes} process(es) on {args.sink_loop}, "
            f"PIPELINING {'off' if args.no_pipelining else 'on'}, {args.sink_delay * 1000:g} ms per message; "
            f"load average before {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name, _ in rows}
        for _ in range(rounds):
            baseline = None
            for name, run in rows:
                wall, cpu, sink_cpu = measure(run, sink)
                rate = count / wall
                baseline = baseline or rate
                results[name].append((rate, cpu / count * 1000, sink_cpu / count * 1000, rate / baseline))

    medians = {
        name: tuple(statistics.median(column) for column in zip(*figures, strict=True))
        for name, figures in results.items()
    }
    _, loop_cpu, loop_sink_cpu, _ = medians[rows[0][0]]
    width = max(10, 5 * rounds - 1)
    print(
        f"| {'run':<22} | {'msg/s':>6} | {'CPU s / 1000':>12} | {'sink CPU s / 1000':>17} "
        f"| {'x loop':>6} | {'each round':<{width}} | {'CPU ceiling':>11} |"
    )
    print(f"|{'-' * 24}|{'-' * 7}:|{'-' * 13}:|{'-' * 18}:|{'-' * 7}:|{'-' * (width + 2)}|{'-' * 12}:|")
    for name, _ in rows:
        rate, cpu, sink_cpu, ratio = medians[name]
        each = " ".join(f"{r:.2f}" for *_, r in results[name])
        # A loop (or a worker with one send in flight) runs one step at a time, on one CPU.
        parallel = 1 if name.endswith(" loop") or name == "worker c1" else cpus
        ceiling = parallel * (loop_cpu + loop_sink_cpu) / (cpu + sink_cpu)
        # A sink that waits leaves the loop idle, not CPU-bound: the ceiling says nothing then.
        shown = f"{ceiling:>11.2f}" if not args.sink_delay else f"{'-':>11}"
        print(
            f"| {name:<22} | {rate:>6.0f} | {cpu:>12.3f} | {sink_cpu:>17.3f} | {ratio:>6.2f} "
            f"| {each:<{width}} | {shown} |"
        )
    print(f"# load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
