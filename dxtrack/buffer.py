"""The bounded, thread-safe ring buffer between callers and the worker.

It holds serialized record bodies per stream and is the only state callers
and the worker share. Every record accepted gets a sequence number in its
stream; the worker takes records from the head in order and *settles* them
(delivered or failed) in the same order, so "everything up to sequence N is
settled" is one integer per stream. Flushes and synchronous callers wait on
that integer.

One lock guards everything here. Callers hold it for an append; the worker
holds it to take a batch and to settle one, never while sending.
"""

from __future__ import annotations

import collections
import random
import threading
from typing import Callable, Deque, Dict, List, Optional, Tuple

from .clock import Clock
from .records import ERROR, ID_OVERHEAD, METRIC

__all__ = ["CLOSED", "DROPPED", "RingBuffer"]

# What put() returns instead of a sequence number when it did not take the record.
DROPPED = 0
CLOSED = -1

#: Relative jitter of ``flush_interval``, so pools of processes do not send in lockstep.
_INTERVAL_JITTER = 0.1


class _Stream:
    __slots__ = (
        "name", "queue", "bytes", "enqueued", "taken", "settled", "in_flight",
        "urgent", "due", "flush_target", "losses",
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
        # (sequence number, count) of recent losses, for flush()'s verdict.
        self.losses: Deque[Tuple[int, int]] = collections.deque(maxlen=1024)


def _lose(s: _Stream, seq: int, count: int) -> None:
    """Remember that ``count`` records from number ``seq`` on were lost (ranges merge)."""
    if s.losses:
        last_seq, last_count = s.losses[-1]
        if last_seq <= seq <= last_seq + last_count:
            s.losses[-1] = (last_seq, max(last_count, seq + count - last_seq))
            return
    s.losses.append((seq, count))


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
                if not self._make_room(s, size):
                    self.dropped["buffer_full"] += 1
                    _lose(s, s.enqueued + 1, 1)
                    return DROPPED
            if not queue:
                s.due = self.clock.monotonic() + self.flush_interval * (
                    1.0 + _INTERVAL_JITTER * (2.0 * random.random() - 1.0)
                )
            queue.append(body)
            s.bytes += size
            s.enqueued += 1
            if urgent:
                s.urgent = True
            if self.worker_idle and (
                urgent or len(queue) >= self.batch_lines or s.bytes >= self.batch_bytes
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
            deadline = self.clock.monotonic() + self.block_timeout
            self._wake_worker(s)
            while len(s.queue) >= self.max_records or s.bytes + size > self.max_bytes:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0 or self.closing:
                    return False
                self.clock.wait(self.progress, remaining)
            return True
        return False

    def wait_settled(self, targets: Dict[str, int], timeout: Optional[float]) -> bool:
        """Wait until every stream has settled up to its target; False on timeout."""
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        with self.lock:
            while any(self.streams[name].settled < target for name, target in targets.items()):
                remaining = None if deadline is None else deadline - self.clock.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.clock.wait(self.progress, remaining)
            return True

    def lost_between(self, stream: str, first: int, last: int) -> bool:
        """Whether a record numbered ``first``..``last`` of ``stream`` was lost."""
        with self.lock:
            return any(
                seq <= last + 1 and seq + count > first for seq, count in self.streams[stream].losses
            )

    def request_flush(self) -> Dict[str, int]:
        """Ask the worker to send everything accepted so far; returns what to wait for."""
        with self.lock:
            targets = {}
            for s in self.streams.values():
                s.flush_target = max(s.flush_target, s.enqueued)
                targets[s.name] = s.enqueued
                self._wake_worker(s)
            return targets

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
                for s in self.streams.values():
                    if not s.queue:
                        continue
                    if (
                        s.urgent or self.closing or s.flush_target > s.taken or now >= s.due
                        or len(s.queue) >= self.batch_lines or s.bytes >= self.batch_bytes
                    ):
                        return self._take_batch(s, now)
                    next_due = s.due if next_due is None else min(next_due, s.due)
                if self.closing:
                    return None
                self.worker_idle = True
                self.clock.wait(self.wake, None if next_due is None else next_due - now)
                self.worker_idle = False

    def _take_batch(self, s: _Stream, now: float) -> Tuple[str, List[bytes], int]:
        batch: List[bytes] = []
        size = 0
        queue = s.queue
        limit_lines, limit_bytes = self.batch_lines, self.batch_bytes
        while queue and len(batch) < limit_lines:
            line_size = len(queue[0]) + ID_OVERHEAD
            if batch and size + line_size > limit_bytes:
                break
            batch.append(queue.popleft())
            size += line_size
        first = s.taken + 1
        s.taken += len(batch)
        s.bytes -= size - ID_OVERHEAD * len(batch)
        s.in_flight = True
        if not queue:
            s.urgent = False
        elif not s.urgent:
            s.due = now + self.flush_interval
        self.progress.notify_all()  # room for callers blocked on a full buffer
        return s.name, batch, first

    def settle(self, stream: str, first: int, delivered: int, failed: int, retried: int) -> None:
        """Record the fate of the batch taken last from ``stream``."""
        with self.lock:
            s = self.streams[stream]
            s.in_flight = False
            s.settled = s.taken
            counts = self.counts
            counts["delivered"] += delivered
            counts["failed"] += failed
            counts["retried"] += retried
            counts["batches"] += 1
            if failed:
                _lose(s, first, s.taken - first + 1)
            self.progress.notify_all()

    def wait_backoff(self, seconds: float) -> None:
        """Sleep between retries; returns early when the client stops."""
        with self.lock:
            if not self.stopped and seconds > 0:
                self.clock.wait(self.wake, seconds)

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
