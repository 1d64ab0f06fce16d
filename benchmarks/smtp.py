"""Measure SenderWorker + SMTPTransport against a plain smtplib loop, on an aiosmtpd sink on loopback.

Run ``python benchmarks/smtp.py`` (5,000 messages of 5 KB per row; ``--quick`` for 500).
The sink runs in a process of its own, so the CPU seconds printed are the client's
alone (``time.process_time``: every thread of this process). Each row sends the same
messages to the same sink in the same run:

* ``smtplib loop``: the baseline, one connection, ``sendmail`` per message;
* ``aiosmtplib loop``: the same loop on aiosmtplib (one connection, awaited in turn);
* ``worker cN``: ``SenderWorker`` over an in-memory queue with ``SMTPTransport``, concurrency N
  (claims, reports and lease bookkeeping included);
* ``worker c50 smtplib`` and ``worker c50 aiosmtplib``: the same worker with a transport on
  smtplib (blocking, in 50 threads) or on aiosmtplib's ``sendmail``, one pooled connection per
  concurrent send, to compare the SMTP clients under the same load.

The sink advertises PIPELINING, as Postfix does; ``--no-pipelining`` turns it off.
``--sink-delay 0.005`` makes it wait 5 ms before accepting each message, as a real MTA
does while it writes and fsyncs its queue file; without it, a Python sink on loopback
answers at once, and both the loop and the worker are bound by CPU alone.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import senderqueue as sq

try:
    import aiosmtplib

    HAVE_AIOSMTPLIB = True
except ImportError:  # the comparison rows need it; the rest does not
    HAVE_AIOSMTPLIB = False

MAIL_FROM = "news@shop.example"
SINK = """
import asyncio, sys, time
from aiosmtpd.controller import Controller

class Sink:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if sys.argv[1] == "yes":
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        if delay:
            await asyncio.sleep(delay)
        return "250 2.0.0 OK"

delay = float(sys.argv[3])
controller = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[2]))
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
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


def worker_run(
    port: int, messages: list[tuple[str, bytes]], concurrency: int, client: str = "senderqueue"
) -> float:
    """Send through a SenderWorker; return the seconds of the send alone (the enqueue is not timed)."""
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
    summary = sq.SenderWorker(queue, transport, sender="s1", concurrency=concurrency).run_until_idle()
    if summary.delivered != len(messages):
        raise SystemExit(f"only {summary.delivered} of {len(messages)} delivered: {summary}")
    return summary.elapsed


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(run: Callable[[], float | None], sink_pid: int) -> tuple[float, float, float]:
    """Wall seconds, client CPU seconds and sink CPU seconds of one run."""
    cpu, wall, sink = time.process_time(), time.perf_counter(), cpu_of(sink_pid)
    inner = run()
    cpu, wall, sink = time.process_time() - cpu, time.perf_counter() - wall, cpu_of(sink_pid) - sink
    return (inner if inner is not None else wall), cpu, sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 messages per row instead of 5,000")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--sink-delay", type=float, default=0.0, help="seconds the sink takes per message")
    args = parser.parse_args()
    count = args.count or (500 if args.quick else 5000)
    messages = [(recipient, content(n)) for n, recipient in enumerate(recipients(count))]

    with SinkProcess(pipelining=not args.no_pipelining, delay=args.sink_delay) as sink:
        port = sink.port
        rows: list[tuple[str, Callable[[], float | None]]] = [
            ("smtplib loop", lambda: smtplib_loop(port, messages)),
            *((f"worker c{c}", lambda c=c: worker_run(port, messages, c)) for c in (1, 10, 50)),
            ("worker c50 smtplib", lambda: worker_run(port, messages, 50, "smtplib")),
        ]
        if HAVE_AIOSMTPLIB:
            rows.insert(1, ("aiosmtplib loop", lambda: aiosmtplib_loop(port, messages)))
            rows.append(("worker c50 aiosmtplib", lambda: worker_run(port, messages, 50, "aiosmtplib")))
        print(
            f"# {count} messages of {len(messages[0][1])} B; Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, aiosmtpd {version('aiosmtpd')}, "
            f"aiosmtplib {version('aiosmtplib') if HAVE_AIOSMTPLIB else 'not installed'}; "
            f"sink PIPELINING {'off' if args.no_pipelining else 'on'}, "
            f"{args.sink_delay * 1000:g} ms per message; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"| {'run':<22} | {'msg/s':>8} | {'CPU s / 1000 msg':>16} | {'sink CPU s / 1000':>17} "
            f"| {'x smtplib loop':>14} |"
        )
        print(f"|{'-' * 24}|{'-' * 9}:|{'-' * 17}:|{'-' * 18}:|{'-' * 15}:|")
        baseline = None
        for name, run in rows:
            wall, cpu, sink_cpu = measure(run, sink.process.pid)
            rate = count / wall
            baseline = baseline or rate
            print(
                f"| {name:<22} | {rate:>8.0f} | {cpu / count * 1000:>16.3f} "
                f"| {sink_cpu / count * 1000:>17.3f} | {rate / baseline:>14.2f} |"
            )


class SinkProcess:
    """The aiosmtpd sink, in a process of its own so that its CPU is not counted as the client's."""

    def __init__(self, *, pipelining: bool, delay: float) -> None:
        self.pipelining = pipelining
        self.delay = delay

    def __enter__(self) -> SinkProcess:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-c", SINK, "yes" if self.pipelining else "no", str(port), str(self.delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit("the sink did not start")
        self.port = port
        return self

    def __exit__(self, *_: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


if __name__ == "__main__":
    main()
