"""The daemon thread that moves records from the buffer to the sink.

One worker per client per process: it takes a batch, adds the ids, hands the lines to
the sink and retries what failed (a :class:`RetryPolicy`) until ``retry_deadline``;
nothing it meets is raised into the application. A ``blocking_io`` sink sends from a
thread of its own (:class:`_Sender`) so that an attempt can be abandoned however slowly
the other end answers. Both threads belong to the process that made them: after a fork
the pipeline drops them and starts new ones.
"""

from __future__ import annotations

import functools
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._logging import RateLimitedLog
from .buffer import IDLE, StreamBuffer
from .records import ERROR, finalize
from .signals import block_signals_in_this_thread
from .sinks.base import DELIVERED, SendResult, Sink
from .spool import Spool, replay_all

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "Worker", "in_delivery_thread", "quantity",
           "spool_failed"]


@dataclass(frozen=True)
class RetryPolicy:
    """How the worker retries what the sink could not deliver (``retry_deadline``, how long
    it goes on, is an option of ``configure()``). Seconds throughout."""

    #: First backoff ceiling; doubles per attempt up to ``backoff_cap``.
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    #: An attempt is never cut shorter than this, so a slow but healthy endpoint still answers.
    min_attempt: float = 1.0
    #: Abandoned attempts that may still be waiting for an answer before no new one starts.
    max_abandoned: int = 2
    #: The backoff drawn under a ceiling: full jitter, anywhere from 0 to the ceiling.
    jitter: Callable[[float], float] = functools.partial(random.uniform, 0.0)


DEFAULT_RETRY = RetryPolicy()

#: With a spool: the worker looks at it after this many seconds without work, and at most
#: this often after a delivery; after a replay that failed, it waits ``REPLAY_BACKOFF``.
REPLAY_EVERY, REPLAY_BACKOFF = 5.0, 30.0

_thread_role = threading.local()


def spool_failed(log: RateLimitedLog, spool: Optional[Spool], exc: OSError) -> None:
    """The spool's disk refused (full, read-only, not ours): the records stay lost or pending."""
    log.error("spool", "dxtrack could not use its spool %s: %s", spool.path if spool else "",
              exc)


def in_delivery_thread() -> bool:
    """Whether this is a dxtrack sender thread: it never waits (it would wait for itself)."""
    return getattr(_thread_role, "delivery", False)


def quantity(count: int, stream: str) -> str:
    """``1 metric``, ``1,204 errors``: what the user counts, as ``stats()`` does."""
    noun = "error" if stream == ERROR else "metric"
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class Worker:
    """Its :meth:`run` loops until the buffer is stopped, or closed and drained."""

    def __init__(self, buffer: StreamBuffer, sink: Sink, *, retry_deadline: float,
                 log: RateLimitedLog, retry: RetryPolicy = DEFAULT_RETRY,
                 spool: Optional[Spool] = None) -> None:
        self.buffer, self.sink, self.log = buffer, sink, log
        self.retry_deadline, self.policy = retry_deadline, retry
        #: Where records go that cannot be delivered in time, and come back from.
        self.spool = spool
        self._next_replay = 0.0
        self._last_ok = False  # the last attempt delivered something
        # The batch being delivered, and the segment close() wrote it to when it ran out of
        # time (:meth:`rescue`); both change under ``_rescue_lock``.
        self._rescue_lock = threading.Lock()
        self._inflight: Optional[Tuple[str, Sequence[bytes]]] = None
        self._rescued: Optional[str] = None
        self.sender = _Sender(sink, retry.max_abandoned) if sink.blocking_io else None
        #: An attempt longer than this is abandoned even with time left, to leave room to retry.
        self.attempt_cap: float = sink.attempt_timeout or retry_deadline

    def run(self, deadline: Optional[float] = None) -> None:
        """Send batches until stopped; with a ``deadline`` (monotonic), none after it."""
        _thread_role.delivery = True
        try:
            idle = REPLAY_EVERY if self.spool is not None else None
            while deadline is None or time.monotonic() < deadline:
                work = self.buffer.take(idle)
                if work is None:
                    return
                if work is not IDLE:
                    self.deliver(*work)
                # The spool, once a delivery went through (or, idle, to see if one would).
                if self.spool is not None and deadline is None and (
                        work is IDLE or self._last_ok):
                    self.replay()
        except BaseException:  # pragma: no cover - the last line of defence
            self.log.error("worker-crash", "dxtrack worker stopped unexpectedly", exc_info=True)
        finally:
            _thread_role.delivery = False

    def deliver(self, stream: str, bodies: List[bytes], first: int) -> None:
        """Send one batch until it is delivered, failed, or the client stops."""
        buffer, policy = self.buffer, self.policy
        clock = buffer.clock
        pending: Sequence[bytes] = [finalize(body) for body in bodies]
        delivered = failed = spooled = attempt = 0
        started = None
        try:
            while pending:
                hurry = buffer.hurry  # a flush or close from now on cuts the backoff short
                left = self.retry_deadline if started is None else (
                    started + self.retry_deadline - clock.monotonic())
                bound = max(min(left, self.attempt_cap), policy.min_attempt)
                self._hold(stream, pending)
                result = self._attempt(stream, pending, bound)
                sent = len(pending) - len(result.retry) - result.failed
                delivered += sent
                self._last_ok = sent > 0
                buffer.report_attempt(stream, sent > 0)
                kept = self._spool(stream, result.refused, result.error) if result.refused else 0
                spooled += kept
                failed += result.failed - kept
                if result.failed > kept:
                    self._lost(stream, result.failed - kept, failed, result.error or "refused")
                pending = result.retry
                if not pending:
                    break
                now = clock.monotonic()
                started = now if started is None else started
                left = started + self.retry_deadline - now
                if left > 0 and not buffer.stopped:
                    self.log.warning(f"retry:{stream}", "dxtrack will retry %s: %s",
                                     quantity(len(pending), stream), result.error)
                    ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** min(attempt, 30))
                    attempt += 1
                    delay = min(policy.jitter(ceiling), left)
                    if buffer.wait_backoff(delay, len(pending), hurry):
                        continue
                why = "retry_deadline passed" if left <= 0 else "the client stopped"
                kept = self._spool(stream, pending, f"gave up ({why}): {result.error}")
                spooled += kept
                if kept < len(pending):
                    failed += len(pending) - kept
                    self._lost(stream, len(pending) - kept, failed,
                               f"gave up ({why}): {result.error}")
                pending = ()
        finally:
            # A batch close() spooled that went out after all leaves the spool; anything
            # still pending here (an unexpected exception) stays there, or counts as lost.
            late = self._release(pending)
            buffer.settle(stream, first, delivered, failed + len(pending) - late, spooled + late)

    # -- the spool ---------------------------------------------------------------------
    def _hold(self, stream: str, lines: Sequence[bytes]) -> None:
        """Say which lines the batch still has to deliver."""
        with self._rescue_lock:
            self._inflight = (stream, lines)

    def _release(self, pending: Sequence[bytes]) -> int:
        """The batch is settled: if close() spooled it meanwhile, only ``pending`` stays in
        that segment; returns how many records that is."""
        with self._rescue_lock:
            rescued, self._rescued = self._rescued, None
            self._inflight = None
        if rescued is None or self.spool is None:
            return 0
        self.spool.settle_held(rescued, pending)
        return len(pending)

    def rescue(self) -> Dict[str, int]:
        """From close(), out of time: write the batch in flight to the spool (held by this
        process, so nobody replays it while the attempt may still succeed); returns how many
        records, by stream. The worker keeps there what its attempt does not deliver
        (:meth:`_spool`)."""
        with self._rescue_lock:
            if self.spool is None or self._inflight is None or self._rescued is not None:
                return {}
            stream, lines = self._inflight
            try:
                self._rescued = self.spool.write(stream, lines, hold=True).path or None
            except OSError as exc:
                self._spool_failed(exc)
                return {}
            return {stream: len(lines)} if self._rescued else {}

    def _spool(self, stream: str, lines: Sequence[bytes], why: Optional[str] = None) -> int:
        """Put ``lines`` in the spool instead of losing them; returns how many it took."""
        with self._rescue_lock:
            rescued, self._rescued = self._rescued, None
            self._inflight = None
        spool = self.spool
        if spool is None or not lines and rescued is None:
            return 0
        if rescued is not None:  # close() wrote the batch already: keep what is undelivered
            spool.settle_held(rescued, lines)
            return len(lines)
        try:
            written = spool.write(stream, lines)
        except OSError as exc:
            self._spool_failed(exc)
            return 0
        full = len(lines) - written.lines  # the oldest, counted as dropped["spool_full"]
        self.log.warning(f"spooled:{stream}", "dxtrack could not deliver %s in time (%s); %s "
                         "safe on disk in %s and will be sent later%s", quantity(
                             len(lines), stream), why, f"{written.lines:,} are", spool.path,
                         f" ({full:,} dropped: the spool is full)" if full else "")
        return len(lines)  # handed to the spool: spooled, or dropped there

    def _spool_failed(self, exc: OSError) -> None:
        spool_failed(self.log, self.spool, exc)

    def replay(self) -> None:
        """Send spooled segments, oldest first, when it is time to look (``REPLAY_EVERY``):
        for at most ``REPLAY_EVERY`` seconds, and only one segment while new records wait,
        so that live records are never held up for long."""
        spool, buffer = self.spool, self.buffer
        clock = buffer.clock
        if spool is None or clock.monotonic() < self._next_replay or buffer.stopped:
            return
        pause = REPLAY_EVERY
        try:
            if not spool.has_segments():
                return
            hurry, until, sent = buffer.hurry, time.monotonic() + REPLAY_EVERY, []
            bound = max(min(self.attempt_cap, REPLAY_EVERY), self.policy.min_attempt)

            def send(stream: str, lines: List[bytes]) -> Tuple[List[bytes], int]:
                result = self._attempt(stream, lines, bound)
                sent.append(stream)
                lost = result.failed - len(result.refused)
                if lost:
                    self.log.error("spool-lost", "dxtrack dropped %s from its spool that can "
                                   "never be delivered: %s", quantity(lost, stream), result.error)
                return [*result.retry, *result.refused], lost

            def stop() -> bool:
                return (buffer.stopped or buffer.hurry != hurry or time.monotonic() > until
                        or bool(sent) and buffer.queued() > 0)

            for claim, delivered in replay_all(spool, send, stop):
                if delivered < len(claim.lines):
                    pause = REPLAY_BACKOFF
        except OSError as exc:
            self._spool_failed(exc)
        finally:
            self._next_replay = clock.monotonic() + pause

    def _lost(self, stream: str, count: int, in_batch: int, why: str) -> None:
        """Log ``count`` records lost, with the total: those the buffer has settled as failed
        (read without its lock: a log line) and the ``in_batch`` of the batch at hand."""
        if self.sink.best_effort:
            return  # such a sink logs its own failures, and they are not lost records
        total = self.buffer.failed(stream) + in_batch
        self.log.error(f"lost:{stream}", "dxtrack could not deliver %s (%s in all so far): %s",
                       quantity(count, stream), f"{total:,}", why)

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
    return DELIVERED if result is None else result  # a sink that returns nothing delivered


class _Sender:
    """Runs a blocking sink's ``send`` in a thread the worker can walk away from (the sink
    then drops its connection). An abandoned thread ends when its call returns; past
    ``max_abandoned`` still waiting, attempts are refused (and retried later) rather than
    piling up threads and connections while an endpoint hangs."""

    def __init__(self, sink: Sink, max_abandoned: int) -> None:
        self.sink, self.max_abandoned = sink, max_abandoned
        self.requests: Optional[queue.SimpleQueue[Any]] = None
        self.thread: Optional[threading.Thread] = None
        self.abandoned: List[threading.Thread] = []

    def send(self, stream: str, lines: Sequence[bytes], bound: float) -> SendResult:
        requests = self.requests
        if requests is None:
            self.abandoned = [t for t in self.abandoned if t.is_alive()]
            if len(self.abandoned) >= self.max_abandoned:
                return SendResult(retry=lines, error=f"{len(self.abandoned)} abandoned attempts "
                                  "are still waiting for an answer; not starting another")
            try:
                requests = self._start()
            except RuntimeError:  # no new threads at interpreter shutdown: send from here
                return _send_once(self.sink, stream, lines)
        reply: queue.SimpleQueue[SendResult] = queue.SimpleQueue()
        requests.put((stream, lines, reply))
        try:
            return reply.get(timeout=bound)
        except queue.Empty:
            self.sink.drop_connection()
            requests.put(None)  # that thread ends once its call returns
            if self.thread is not None:
                self.abandoned.append(self.thread)
            self.requests = None
            return SendResult(retry=lines, error=f"no answer within {bound:.1f} s; the attempt "
                              "was abandoned (it may still have been delivered)")

    def close(self) -> None:
        if self.requests is not None:
            self.requests.put(None)
        self.requests = None

    def _start(self) -> queue.SimpleQueue[Any]:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def serve() -> None:
            block_signals_in_this_thread()
            _thread_role.delivery = True
            for stream, lines, reply in iter(requests.get, None):  # None: the end
                reply.put(_send_once(self.sink, stream, lines))

        self.thread = threading.Thread(target=serve, name="dxtrack-sender", daemon=True)
        self.thread.start()
        self.requests = requests
        return requests
