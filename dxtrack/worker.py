"""The daemon thread that moves records from the buffer to the sink.

One worker per client per process. It takes a batch, adds the ids, hands the
lines to the sink, and retries what the sink could not deliver with capped
exponential backoff and full jitter until ``retry_deadline`` has passed since
the first failed attempt; then the rest count as failed. A flush or close ends
a backoff at once. Nothing it meets is ever raised into the application.

A sink that talks to the network (``blocking_io = True``) sends from a thread
of its own, so that the worker can give up on one attempt when the time left
to its batch runs out (or the sink's ``attempt_timeout``), however slowly the
other end answers: the attempt is
abandoned (its thread ends when the call does), the sink is told to drop its
connection, and the lines are retried or counted as failed.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from typing import Any, List, Optional, Sequence

from ._logging import RateLimitedLog
from .buffer import RingBuffer
from .processes import block_signals_in_this_thread
from .records import ERROR, finalize
from .sinks.base import DELIVERED, SendResult, Sink

__all__ = ["Worker", "in_delivery_thread", "quantity"]

#: First backoff ceiling, seconds; doubles per attempt up to :data:`BACKOFF_CAP`.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
#: An attempt is never cut shorter than this, so a slow but healthy endpoint still answers.
MIN_ATTEMPT = 1.0
#: Abandoned attempts that may still be waiting for an answer before no new one starts.
MAX_ABANDONED = 2

_thread_role = threading.local()


def in_delivery_thread() -> bool:
    """Whether this thread is one of dxtrack's senders: such a thread never waits for
    delivery (it would wait for itself)."""
    return getattr(_thread_role, "delivery", False)


def quantity(count: int, stream: str) -> str:
    """``1 metric``, ``1,204 errors``: what the user counts, as ``stats()`` does."""
    noun = "error" if stream == ERROR else "metric"
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class Worker:
    """Its :meth:`run` loops until the buffer is stopped, or closed and drained."""

    def __init__(
        self,
        buffer: RingBuffer,
        sink: Sink,
        *,
        retry_deadline: float,
        log: RateLimitedLog,
        backoff_base: Optional[float] = None,
        backoff_cap: Optional[float] = None,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.retry_deadline = retry_deadline
        # Read at construction, not import, so tests and users may tune the module values.
        self.backoff_base = BACKOFF_BASE if backoff_base is None else backoff_base
        self.backoff_cap = BACKOFF_CAP if backoff_cap is None else backoff_cap
        self.log = log
        self.sender = _Sender(sink) if getattr(sink, "blocking_io", False) else None
        #: An attempt longer than this is abandoned even with time left, to leave room to retry.
        self.attempt_cap: float = getattr(sink, "attempt_timeout", None) or retry_deadline

    def run(self, deadline: Optional[float] = None) -> None:
        """Send batches until stopped; with a ``deadline`` (monotonic), none after it."""
        _thread_role.delivery = True
        try:
            while deadline is None or time.monotonic() < deadline:
                work = self.buffer.take()
                if work is None:
                    return
                self.deliver(*work)
        except BaseException:  # pragma: no cover - the last line of defence
            self.log.error("worker-crash", "dxtrack worker stopped unexpectedly", exc_info=True)
        finally:
            _thread_role.delivery = False

    def deliver(self, stream: str, bodies: List[bytes], first: int) -> None:
        """Send one batch until it is delivered, failed, or the client stops."""
        buffer = self.buffer
        clock = buffer.clock
        pending: Sequence[bytes] = [finalize(body) for body in bodies]
        delivered = failed = attempt = 0
        started = None
        try:
            while pending:
                hurry = buffer.hurry  # a flush or close from now on cuts the backoff short
                left = self.retry_deadline if started is None else (
                    started + self.retry_deadline - clock.monotonic()
                )
                result = self._attempt(stream, pending, max(min(left, self.attempt_cap),
                                                            MIN_ATTEMPT))
                sent = len(pending) - len(result.retry) - result.failed
                delivered += sent
                failed += result.failed
                buffer.report_attempt(stream, sent > 0)
                if result.failed:
                    self._lost(stream, result.failed, failed, result.error or "refused")
                pending = result.retry
                if not pending:
                    break
                now = clock.monotonic()
                started = now if started is None else started
                left = started + self.retry_deadline - now
                if left > 0 and not buffer.stopped:
                    self.log.warning(
                        f"retry:{stream}", "dxtrack will retry %s: %s",
                        quantity(len(pending), stream), result.error,
                    )
                    ceiling = min(self.backoff_cap, self.backoff_base * (2 ** min(attempt, 30)))
                    attempt += 1
                    delay = min(random.uniform(0.0, ceiling), left)
                    if buffer.wait_backoff(delay, len(pending), hurry):
                        continue
                why = "retry_deadline passed" if left <= 0 else "the client stopped"
                failed += len(pending)
                self._lost(stream, len(pending), failed, f"gave up ({why}): {result.error}")
                pending = ()
        finally:
            # Anything still pending here means an unexpected exception: count it lost.
            buffer.settle(stream, first, delivered, failed + len(pending))

    def _lost(self, stream: str, count: int, in_batch: int, why: str) -> None:
        """Log ``count`` records lost, with the total: those the buffer has settled as failed
        (read without its lock: a log line) and the ``in_batch`` of the batch at hand."""
        if getattr(self.sink, "best_effort", False):
            return  # such a sink logs its own failures, and they are not lost records
        total = self.buffer.streams[stream].failed + in_batch
        self.log.error(
            f"lost:{stream}", "dxtrack could not deliver %s (%s in all so far): %s",
            quantity(count, stream), f"{total:,}", why,
        )

    def close(self) -> None:
        """Let the sender thread, if any, end (once the call it may be in returns)."""
        if self.sender is not None:
            self.sender.close()

    def _attempt(self, stream: str, lines: Sequence[bytes], bound: float) -> SendResult:
        if self.sender is not None:
            return self.sender.send(stream, lines, bound)
        return _send_once(self.sink, stream, lines)


def _send_once(sink: Sink, stream: str, lines: Sequence[bytes]) -> SendResult:
    try:
        result = sink.send(stream, lines)
    except Exception as exc:
        return SendResult(retry=lines, error=f"{type(exc).__name__}: {exc}")
    return DELIVERED if result is None else result


class _Sender:
    """Runs a blocking sink's ``send`` in a thread the worker can walk away from.

    An abandoned thread ends when its call returns, and then closes the
    connection it used. At most :data:`MAX_ABANDONED` of them may still be
    waiting: past that, attempts are refused (and retried later) rather than
    piling up threads and connections while an endpoint hangs.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.requests: Optional[queue.SimpleQueue[Any]] = None
        self.pid = 0
        self.thread: Optional[threading.Thread] = None
        self.abandoned: List[threading.Thread] = []

    def send(self, stream: str, lines: Sequence[bytes], bound: float) -> SendResult:
        requests = self.requests
        if requests is None or self.pid != os.getpid():
            self.abandoned = [t for t in self.abandoned if t.is_alive()]
            if len(self.abandoned) >= MAX_ABANDONED and self.pid == os.getpid():
                return SendResult(retry=lines, error=(
                    f"{len(self.abandoned)} abandoned attempts are still waiting for an answer; "
                    "not starting another"
                ))
            try:
                requests = self._start()
            except RuntimeError:  # no new threads at interpreter shutdown: send from here
                return _send_once(self.sink, stream, lines)
        reply: queue.SimpleQueue[SendResult] = queue.SimpleQueue()
        requests.put((stream, lines, reply))
        try:
            return reply.get(timeout=bound)
        except queue.Empty:
            drop = getattr(self.sink, "drop_connection", None)
            requests.put(drop() if callable(drop) else None)  # what that thread closes at its end
            if self.thread is not None:
                self.abandoned.append(self.thread)
            self.requests = None
            return SendResult(retry=lines, error=(
                f"no answer within {bound:.1f} s; the attempt was abandoned (it may still "
                "have been delivered)"
            ))

    def close(self) -> None:
        if self.requests is not None and self.pid == os.getpid():
            self.requests.put(None)
        self.requests = None

    def _start(self) -> queue.SimpleQueue[Any]:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def serve() -> None:
            block_signals_in_this_thread()
            _thread_role.delivery = True
            while True:
                work = requests.get()
                if not isinstance(work, tuple):  # the end: close what we were left, if anything
                    close = getattr(work, "close", None)
                    if callable(close):
                        try:
                            close()
                        except Exception:  # noqa: BLE001 - a connection that is gone already
                            pass
                    return
                stream, lines, reply = work
                reply.put(_send_once(self.sink, stream, lines))

        self.thread = threading.Thread(target=serve, name="dxtrack-sender", daemon=True)
        self.thread.start()
        self.requests, self.pid = requests, os.getpid()
        return requests
