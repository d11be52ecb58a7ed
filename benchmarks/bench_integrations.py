"""What the integrations cost the caller: Papertrail, timer(), the logging handler.

Each is compared with the plain call it wraps, measured in the same rounds:

- ``metric()`` (async mode) alone, and with ``papertrail_hostport`` pointing at
  a UDP socket on 127.0.0.1 that this benchmark drains, so every copy is
  really formatted and sent. Wall time includes the copies' thread's share
  of the GIL, which is what a job would feel; the copies it could not keep up
  with are counted as dropped (reported below the table).
- What one Papertrail copy costs in CPU, every thread counted: ``process_time``
  over 5,000 ``metric()`` calls and the flush that sends them (fewer than the
  copies' queue holds, so none is dropped), with Papertrail minus without, in
  the same round, divided by the copies sent. Its socket is never read, so no
  receiving thread is counted.
- ``with client.timer(...)`` (a new timer each call, as code writes it) and a
  ``@client.timer``-decorated function, against ``metric()`` with a value the
  caller timed itself with ``time.monotonic()``.
- ``logger.exception(...)`` through :class:`dxtrack.DXTrackHandler`, against
  ``error()`` in the same ``except`` block.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, Tuple

import _common as c

_perf = time.perf_counter
_cpu = time.thread_time
PerCall = Tuple[float, float]


def client(**options: Any) -> Any:
    from dxtrack import DXTrack

    dx = DXTrack()
    dx.configure(stage="test", context=c.CONTEXT, run_id=c.RUN_ID, sink=c.DiscardSink(),
                 use_async_requests=True, **options)
    return dx


class UdpDrain:
    """A UDP socket on 127.0.0.1 read by a thread, so the kernel never drops the datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.datagrams = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _read(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except OSError:
                return
            self.datagrams += 1

    def close(self) -> None:
        self.sock.close()


def timed_loop(fn: Callable[[int], None], n: int, dx: Any) -> PerCall:
    wall, cpu = _perf(), _cpu()
    for i in range(n):
        fn(i)
    wall, cpu = _perf() - wall, _cpu() - cpu
    dx.flush_metrics_buffer(60)  # untimed
    return wall / n, cpu / n


def all_threads(dx: Any, n: int) -> PerCall:
    """CPU of every thread per ``metric()``, the flush that sends them included; and the
    share of them that were sent to Papertrail (0 without it)."""
    before = dx.stats().get("papertrail_sent", 0)
    cpu = time.process_time()
    for i in range(n):
        dx.metric(c.NAME, i, c.METADATA)
    dx.flush_metrics_buffer(60)
    cpu = time.process_time() - cpu
    return cpu / n, (dx.stats().get("papertrail_sent", 0) - before) / n


def _fail() -> None:
    raise ValueError("page 3 of example-shop returned no products")


LABELS = {
    "metric": "metric() (async)",
    "papertrail": "metric() (async) with Papertrail",
    "monotonic": "metric(name, monotonic() - start)",
    "timer": "with timer(name): (new timer each call)",
    "decorated": "call of a @timer(name) function",
    "error": "error() in except (async)",
    "handler": "logger.exception() through DXTrackHandler (async)",
}
BASES = {"papertrail": "metric", "timer": "monotonic", "decorated": "monotonic",
         "handler": "error", "monotonic": "metric"}


def run(quick: bool) -> c.Report:
    from dxtrack import DXTrackHandler

    report = c.Report("integrations")
    n = 20_000 if quick else 100_000
    n_err = 1_000 if quick else 3_000
    count = 3 if quick else 5
    n_copies = 2_000 if quick else 5_000
    drain = UdpDrain()
    unread = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # datagrams the kernel drops
    unread.bind(("127.0.0.1", 0))
    plain, teed = client(), client(papertrail_hostport=drain.hostport)
    quiet = client(papertrail_hostport=f"127.0.0.1:{unread.getsockname()[1]}")
    name, md = c.NAME, c.METADATA
    monotonic = time.monotonic

    def by_hand(i: int) -> None:
        start = monotonic()
        plain.metric(name, monotonic() - start, md)

    def with_timer(i: int) -> None:
        with plain.timer(name, md):
            pass

    @plain.timer(name, md)
    def decorated() -> None:
        pass

    logger = logging.getLogger("bench.scraper")
    logger.propagate = False
    logger.addHandler(DXTrackHandler(plain))

    def error(i: int) -> None:
        try:
            _fail()
        except ValueError:
            plain.error(md)

    def logged(i: int) -> None:
        try:
            _fail()
        except ValueError:
            logger.exception("page %d could not be parsed", 3)

    variants: Dict[str, Callable[[], PerCall]] = {
        "metric": lambda: timed_loop(lambda i: plain.metric(name, i, md), n, plain),
        "papertrail": lambda: timed_loop(lambda i: teed.metric(name, i, md), n, teed),
        "monotonic": lambda: timed_loop(by_hand, n, plain),
        "timer": lambda: timed_loop(with_timer, n, plain),
        "decorated": lambda: timed_loop(lambda i: decorated(), n, plain),
        "error": lambda: timed_loop(error, n_err, plain),
        "handler": lambda: timed_loop(logged, n_err, plain),
        "cpu_plain": lambda: all_threads(plain, n_copies),
        "cpu_copies": lambda: all_threads(quiet, n_copies),
    }
    try:
        results = c.rounds(count, variants)
        teed.flush_metrics_buffer(60)
        papertrail = teed.stats()
    finally:
        plain.close(5)
        teed.close(5)
        quiet.close(5)
        drain.close()
        unread.close()
    wall = {key: [w for w, _ in values] for key, values in results.items()}
    cpu = {key: [t for _, t in values] for key, values in results.items()}

    table = c.Table(
        f"Integrations, caller cost per call (µs; median of {count} rounds; {n:,} metric-like "
        f"and {n_err:,} error-like calls per round)",
        ["variant", "wall µs", "spread", "× its base (wall)", "caller CPU µs",
         "× its base (CPU)", "base"],
    )
    for key, label in LABELS.items():
        base = BASES.get(key)
        table.add(
            label,
            f"{c.median(wall[key]) * 1e6:.2f}",
            c.spread(wall[key], 1e6),
            f"{c.median(c.paired_ratio(wall, key, base)):.2f}" if base else "",
            f"{c.median(cpu[key]) * 1e6:.2f}",
            f"{c.median(c.paired_ratio(cpu, key, base)):.2f}" if base else "",
            LABELS[base] if base else "",
        )
    offered = papertrail["papertrail_sent"] + papertrail["papertrail_dropped"] \
        + papertrail["papertrail_failed"]
    table.notes.append(
        f"Papertrail copies over all rounds: {papertrail['papertrail_sent']:,} sent, "
        f"{papertrail['papertrail_dropped']:,} dropped (queue full), "
        f"{papertrail['papertrail_failed']:,} failed, of {offered:,}; "
        f"{drain.datagrams:,} datagrams received; Firehose side: "
        f"{papertrail['delivered']:,} delivered, {sum(papertrail['dropped'].values()):,} dropped"
    )
    table.notes.append("sink: discards; stage 'test'; ratios are medians of per-round ratios")
    report.tables.append(table)
    report.tables.append(copy_table(results, count, n_copies))
    return report


def copy_table(results: Dict[str, Any], count: int, n: int) -> c.Table:
    plain = [cpu for cpu, _ in results["cpu_plain"]]
    copies = [cpu for cpu, _ in results["cpu_copies"]]
    sent = [share for _, share in results["cpu_copies"]]
    per_copy = [(b - a) / share for a, b, share in zip(plain, copies, sent) if share]
    table = c.Table(
        f"Papertrail, CPU per copy (µs, process_time of every thread; median of {count} "
        f"rounds of {n:,} metric() calls and their flush)",
        ["variant", "CPU µs per metric", "spread"],
    )
    table.add("metric() (async) and flush", f"{c.median(plain) * 1e6:.2f}",
              c.spread(plain, 1e6))
    table.add("the same with Papertrail", f"{c.median(copies) * 1e6:.2f}", c.spread(copies, 1e6))
    table.add("one Papertrail copy (the difference)", f"{c.median(per_copy) * 1e6:.2f}",
              c.spread(per_copy, 1e6))
    table.notes.append(f"copies sent per metric, by round: {', '.join(f'{s:.3f}' for s in sent)}")
    return table
