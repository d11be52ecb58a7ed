"""The bounded, thread-safe ring buffer between callers and the worker.

It holds serialized record bodies per stream and is the only state callers
and the worker share. Every record accepted gets a sequence number in its
stream; the worker takes records from the head in order and *settles* them
(delivered or failed) in the same order, so "everything up to sequence N is
settled" is one integer per stream. Flushes and synchronous callers wait on
that integer.

A batch goes out when a caller marks its stream urgent, when it is full (a
sink batch, or half the buffer when the buffer is the smaller), when the
buffer overflows, at ``flush_interval``, on flush and on close. The worker
serves the streams in turn, so a busy metric stream never starves errors.

Two kinds of time: the injected clock rules the pipeline's own timing (the
flush interval, and in the worker backoff and ``retry_deadline``); how long
a *caller* is held (``block_timeout``, ``sync_timeout``, a flush's timeout)
is real time, ``time.monotonic()``, whatever the clock.

One lock guards everything here. Callers hold it for an append; the worker
holds it to take a batch and to settle one, never while sending.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Tuple

from .clock import Clock
from .records import ERROR, ID_OVERHEAD, METRIC

__all__ = ["CLOSED", "DROPPED", "Checkpoint", "RingBuffer"]

# What put() returns instead of a sequence number when it did not take the record.
DROPPED = 0
CLOSED = -1

#: Relative jitter of ``flush_interval``, so pools of processes do not send in lockstep.
_INTERVAL_JITTER = 0.1


class _Stream:
    __slots__ = (
        "name", "queue", "bytes", "enqueued", "taken", "settled", "in_flight",
        "urgent", "due", "flush_target", "losses", "forgotten", "drops", "checked",
        "checked_drops",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: Deque[bytes] = collections.deque()
        self.bytes = 0          # serialized bytes in ``queue``
        self.enqueued = 0       # sequence number of the newest accepted record
        self.taken = 0          # ... of the newest record that left the queue
        self.settled = 0        # every record up to this one is delivered or lost
        self.in_flight = False  # the worker holds a batch of this stream
        self.urgent = False     # a caller wants the queue sent now
        self.due = 0.0          # when the oldest queued record must go out
        self.flush_target = 0   # a flush wants everything up to here sent
        # (sequence number, count) of recent failed or evicted records, for flush()'s verdict;
        # when old ranges fall off, ``forgotten`` is the last number they covered.
        self.losses: Deque[Tuple[int, int]] = collections.deque(maxlen=1024)
        self.forgotten = 0
        self.drops = 0          # records refused by put(): they never got a number
        # What the last completed flush reported on: later flushes judge only what came after.
        self.checked = 0
        self.checked_drops = 0


class Checkpoint(NamedTuple):
    """What one flush waits for and judges, per stream, taken when it was asked for."""

    targets: Dict[str, int]   # wait until each stream has settled up to here
    firsts: Dict[str, int]    # the first record number this flush reports on
    drops: Dict[str, Tuple[int, int]]  # (drops already reported, drops at the request)
    pending: bool             # something up to the targets was not settled yet


def _lose(s: _Stream, seq: int, count: int) -> None:
    """Remember that ``count`` records from number ``seq`` on were lost (ranges merge)."""
    losses = s.losses
    if losses:
        last_seq, last_count = losses[-1]
        if last_seq <= seq <= last_seq + last_count:
            losses[-1] = (last_seq, max(last_count, seq + count - last_seq))
            return
        if len(losses) == losses.maxlen:
            old_seq, old_count = losses[0]
            s.forgotten = max(s.forgotten, old_seq + old_count - 1)
    losses.append((seq, count))


class RingBuffer:
    """Per-stream queues bounded by ``max_records`` and ``max_bytes``."""

    def __init__(
        self,
        *,
        max_records: int,
        max_bytes: int,
        on_full: str,
        block_timeout: float,
        flush_interval: float,
        batch_lines: int,
        batch_bytes: int,
        clock: Clock,
    ) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.flush_interval = flush_interval
        self.batch_lines = batch_lines
        self.batch_bytes = batch_bytes
        # A queue this long is sent without waiting for the interval: a full sink batch, or
        # half the buffer when the buffer is smaller, so a healthy sink empties it in time.
        self.ready_lines = min(batch_lines, max(1, max_records // 2))
        self.ready_bytes = min(batch_bytes, max(1, max_bytes // 2))
        self.clock = clock
        #: Called (outside the lock) by put() when no worker is running.
        self.start_worker: Callable[[], object] = lambda: None
        self._reset()

    def _reset(self) -> None:
        """Fresh locks, conditions, queues and counters (at creation and in a forked child)."""
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)      # the worker waits here
        self.progress = threading.Condition(self.lock)  # callers wait here
        self.streams: Dict[str, _Stream] = {METRIC: _Stream(METRIC), ERROR: _Stream(ERROR)}
        self._turn: List[_Stream] = list(self.streams.values())  # who the worker serves first
        self.worker_running = False
        self.worker_idle = False
        self.closing = False   # no new records; the worker drains everything left
        self.stopped = False   # the worker must return as soon as it can
        self.counts: Dict[str, int] = collections.defaultdict(int)
        self.dropped: Dict[str, int] = collections.defaultdict(int)

    def after_fork_in_child(self) -> None:
        """The parent's records are the parent's to send: start empty, with new locks."""
        self._reset()

    # -- the caller's side -------------------------------------------------
    def put(self, stream: str, body: bytes, urgent: bool) -> int:
        """Append one body; returns its sequence number, or DROPPED, or CLOSED.

        ``urgent`` wakes the worker now; otherwise the record waits for a full
        batch, the flush interval, or a flush.
        """
        size = len(body)
        # acquire/release rather than ``with``: this is the caller's hot path.
        self.lock.acquire()
        try:
            if self.closing:
                return CLOSED
            s = self.streams[stream]
            queue = s.queue
            if len(queue) >= self.max_records or s.bytes + size > self.max_bytes:
                s.urgent = True  # a full buffer is sent now, whatever the mode
                self._wake_worker(s)
                if not self._make_room(s, size):
                    self.dropped["buffer_full"] += 1
                    s.drops += 1
                    return DROPPED
            if not queue and not urgent:
                s.due = self.clock.monotonic() + self.flush_interval * (
                    1.0 + _INTERVAL_JITTER * (2.0 * random.random() - 1.0)
                )
            queue.append(body)
            s.bytes += size
            s.enqueued += 1
            if urgent:
                s.urgent = True
            # An idle worker is woken for urgent records, a ready batch, and the first record
            # of an empty queue (whose due time may come before what the worker waits for).
            if self.worker_idle and (
                urgent or len(queue) == 1 or len(queue) >= self.ready_lines
                or s.bytes >= self.ready_bytes
            ):
                self.worker_idle = False
                self.wake.notify()
            seq = s.enqueued
        finally:
            self.lock.release()
        if not self.worker_running:
            self.start_worker()
        return seq

    def _make_room(self, s: _Stream, size: int) -> bool:
        if self.on_full == "drop_oldest":
            while s.queue and (len(s.queue) >= self.max_records or s.bytes + size > self.max_bytes):
                s.bytes -= len(s.queue.popleft())
                s.taken += 1
                self.dropped["evicted"] += 1
                _lose(s, s.taken, 1)
            if not s.in_flight:
                s.settled = s.taken
            self.progress.notify_all()
            return True
        if self.on_full == "block":
            deadline = time.monotonic() + self.block_timeout
            while len(s.queue) >= self.max_records or s.bytes + size > self.max_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closing:
                    return False
                self.clock.wait(self.progress, remaining)
            return True
        return False

    def wait_settled(self, targets: Dict[str, int], timeout: Optional[float]) -> bool:
        """Wait until every stream has settled up to its target; False once ``timeout``
        real seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while any(self.streams[name].settled < target for name, target in targets.items()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.clock.wait(self.progress, remaining)
            return True

    def request_flush(self) -> Checkpoint:
        """Ask the worker to send everything accepted so far; returns what to wait for.

        The flush reports on everything since the last flush that completed
        (did not time out): records failed or evicted since then, records
        refused since then, and records still pending.
        """
        with self.lock:
            targets, firsts, drops = {}, {}, {}
            pending = False
            for s in self.streams.values():
                s.flush_target = max(s.flush_target, s.enqueued)
                targets[s.name] = s.enqueued
                firsts[s.name] = s.checked + 1
                drops[s.name] = (s.checked_drops, s.drops)
                pending = pending or s.settled < s.enqueued
                self._wake_worker(s)
            return Checkpoint(targets, firsts, drops, pending)

    def verdict(self, checkpoint: Checkpoint) -> bool:
        """Whether nothing in the checkpoint's window was lost; marks the window reported.

        Call it once everything up to the checkpoint's targets has settled.
        """
        with self.lock:
            ok = True
            for name, last in checkpoint.targets.items():
                s = self.streams[name]
                first = checkpoint.firsts[name]
                reported, refused = checkpoint.drops[name]
                lost = refused > reported
                if not lost and first <= last:
                    lost = s.forgotten >= first or any(
                        seq <= last and seq + count > first for seq, count in s.losses
                    )
                ok = ok and not lost
                s.checked = max(s.checked, last)
                s.checked_drops = max(s.checked_drops, refused)
            return ok

    def _wake_worker(self, s: _Stream) -> None:
        if s.queue and self.worker_idle:
            self.worker_idle = False
            self.wake.notify()

    # -- the worker's side -------------------------------------------------
    def take(self) -> Optional[Tuple[str, List[bytes], int]]:
        """Block until a stream has a batch to send; None once stopped and empty.

        Returns (stream, bodies, sequence number of the first body).
        """
        with self.lock:
            while True:
                if self.stopped:
                    return None
                now = self.clock.monotonic()
                next_due = None
                turn = self._turn
                for i, s in enumerate(turn):
                    if not s.queue:
                        continue
                    if (
                        s.urgent or self.closing or s.flush_target > s.taken or now >= s.due
                        or len(s.queue) >= self.ready_lines or s.bytes >= self.ready_bytes
                    ):
                        self._turn = turn[i + 1:] + turn[: i + 1]  # served: to the back
                        return self._take_batch(s)
                    next_due = s.due if next_due is None else min(next_due, s.due)
                if self.closing:
                    return None
                self.worker_idle = True
                self.clock.wait(self.wake, None if next_due is None else next_due - now)
                self.worker_idle = False

    def _take_batch(self, s: _Stream) -> Tuple[str, List[bytes], int]:
        queue = s.queue
        limit_lines, limit_bytes = self.batch_lines, self.batch_bytes
        if len(queue) <= limit_lines and s.bytes + ID_OVERHEAD * len(queue) <= limit_bytes:
            batch = list(queue)  # the common case: everything queued fits one batch
            queue.clear()
            body_bytes = s.bytes
        else:
            batch = []
            size = 0
            while queue and len(batch) < limit_lines:
                line_size = len(queue[0]) + ID_OVERHEAD
                if batch and size + line_size > limit_bytes:
                    break
                batch.append(queue.popleft())
                size += line_size
            body_bytes = size - ID_OVERHEAD * len(batch)
        first = s.taken + 1
        s.taken += len(batch)
        s.bytes -= body_bytes
        s.in_flight = True
        if not queue:
            s.urgent = False  # what is left of a partial take keeps its due time
        self.progress.notify_all()  # room for callers blocked on a full buffer
        return s.name, batch, first

    def settle(self, stream: str, first: int, delivered: int, failed: int) -> None:
        """Record the fate of the batch taken last from ``stream``."""
        with self.lock:
            s = self.streams[stream]
            s.in_flight = False
            s.settled = s.taken
            counts = self.counts
            counts["delivered"] += delivered
            counts["failed"] += failed
            counts["batches"] += 1
            if failed:
                _lose(s, first, s.taken - first + 1)
            self.progress.notify_all()

    def wait_backoff(self, seconds: float, records: int) -> bool:
        """Sleep ``seconds`` on the clock before ``records`` are sent again.

        They count as retried from now, so an outage shows in ``stats()`` while
        it lasts. Returns early, and False, when the client stops.
        """
        with self.lock:
            if self.stopped:
                return False
            self.counts["retried"] += records
            deadline = self.clock.monotonic() + seconds
            while not self.stopped:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    return True
                self.clock.wait(self.wake, remaining)
            return False

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Refuse new records and let the worker drain what is left."""
        with self.lock:
            self.closing = True
            self.wake.notify_all()
            self.progress.notify_all()

    def stop(self) -> None:
        """Tell the worker to return now (what is left stays pending)."""
        with self.lock:
            self.closing = True
            self.stopped = True
            self.wake.notify_all()
            self.progress.notify_all()

    def snapshot(self) -> Dict[str, object]:
        with self.lock:
            enqueued = sum(s.enqueued for s in self.streams.values())
            settled_or_evicted = (
                self.counts.get("delivered", 0) + self.counts.get("failed", 0)
                + self.dropped.get("evicted", 0)
            )
            return {
                "enqueued": enqueued,
                "delivered": self.counts.get("delivered", 0),
                "pending": enqueued - settled_or_evicted,
                "dropped": {reason: n for reason, n in self.dropped.items() if n},
                "failed": self.counts.get("failed", 0),
                "retried": self.counts.get("retried", 0),
                "batches": self.counts.get("batches", 0),
                "buffered_bytes": sum(s.bytes for s in self.streams.values()),
            }
