"""The buffer between callers and the worker: bounded, thread-safe, numbered queues.

:class:`StreamBuffer` owns the record bodies per stream and all state callers and
the worker share. Each accepted record gets a sequence number in its stream and is
settled (delivered or failed) in order, so "settled up to N" is one integer per
stream: flushes and synchronous callers wait on it. The worker serves the streams
in turn, so a busy metric stream never starves errors. The injected clock rules the
pipeline's timing; how long a *caller* is held is real time (``time.monotonic()``).

One lock guards everything (the worker never holds it while sending), taken only with
``with`` (a ``KeyboardInterrupt`` cannot land between taking it and the block that
releases it). It is reentrant because a thread holding it can be interrupted by code
that records: a signal handler, or a ``__del__`` or weakref callback run by the garbage
collector. Such a call finds ``_busy`` set (a change is half done) and leaves its record
in a side queue, as ``queue.SimpleQueue.put`` would; the interrupted code folds it in
before it lets go of the lock. It never waits for delivery (:data:`DEFERRED`).

A caller that will not wait for its record (``metric()`` in async and buffered mode) takes
no lock at all on the common path: :meth:`StreamBuffer.offer` appends the body to the
stream's *inbox*, a deque (whose ``append`` is atomic, and safe from a signal handler),
while the inbox is below the stream's ``room``. Whoever holds the lock next folds the
inbox into the queue, oldest first, before anything reads the queue: a put, the worker's
take, a flush, a close, the counters. ``room`` is set under the lock, and is above zero
only while the fold is sure to come in time and to fit: the stream's queue is not empty (a
due time or an urgent take is set), the buffer is open, and the queue plus a full inbox of
bodies up to ``_INBOX_BODY`` bytes stays under both bounds and under the size that makes a
batch ready (which wakes the worker). Whatever could break that premise (a take, a drain,
close, stop, a worker that ended) bumps the stream's ``gen``; a caller that sees ``gen``
move across its append takes its record back under the lock (if nobody folded it yet) and
puts it the ordinary way, so it is never left behind, refused silently or counted twice.
A take and a close bump ``gen`` *before* their last fold (other threads append while the
lock is held): an append either comes before that fold and is folded, or sees ``gen`` move.
A fold is one call into C, so neither another thread nor an exception raised by a signal
handler (Ctrl-C) can cut it in two; in async mode the records it queues are urgent.
Two threads can pass the ``room`` check at once, so the inbox may exceed ``room`` by one
body per racing thread; the fold takes those too (refusing them would lose records their
callers were told were queued), so the bounds are soft by at most one record per thread that
raced, and only when about ``max_records / 2`` threads pass the check at the same moment.
Without a GIL (free-threaded builds) ``room`` stays 0.
"""

from __future__ import annotations

import collections
import itertools
import operator
import random
import sys
import threading
import time
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple

from .clock import Clock
from .records import ERROR, ID_OVERHEAD, METRIC

__all__ = ["CLOSED", "DEFERRED", "DROPPED", "IDLE", "QUEUED", "SPILLED", "Checkpoint",
           "StreamBuffer"]

# What put() returns instead of a sequence number: it did not take the record ...
DROPPED = 0
CLOSED = -1
#: ... or it took it from code that interrupted this buffer's own thread (see above): the
#: record is queued, but has no number yet, so nobody can wait for it.
DEFERRED = -2
#: ... or it did not fit, and went to the disk spool's writer (``on_full="spool"``).
SPILLED = -3
#: What offer() returns for a record it left in the inbox: taken, numbered at the fold.
QUEUED = 1 << 62
#: What take() returns when the worker had nothing to do for its ``idle`` seconds.
IDLE: Tuple[str, List[bytes], int] = ("", [], 0)

#: Relative jitter of ``flush_interval``, so pools of processes do not send in lockstep.
_INTERVAL_JITTER = 0.1
#: The largest body offer() leaves in the inbox; ``room`` counts the bytes at this size.
_INBOX_BODY = 2048
#: The inbox needs the GIL: its check and its append are two steps (see the docstring).
_INBOX_OK = getattr(sys, "_is_gil_enabled", lambda: True)()


class _Stream:
    __slots__ = ("name", "queue", "inbox", "room", "gen", "bytes", "enqueued", "taken", "settled",
                 "in_flight", "urgent", "due", "flush_target", "losses", "forgotten", "drops",
                 "checked", "checked_drops", "outage", "outage_after", "failed", "evicted",
                 "spilled", "spooled_ahead")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: Deque[bytes] = collections.deque()
        self.inbox: Deque[bytes] = collections.deque()  # offer()'s, not folded in yet
        self.room = 0           # bodies offer() may leave in the inbox without the lock
        self.gen = 0            # bumped when what ``room`` assumed may no longer hold
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
        self.checked = self.checked_drops = 0
        self.outage = False     # the last attempt delivered nothing (see report_attempt)
        self.outage_after = 0   # ... and it had records up to this one
        self.failed = 0         # records the worker gave up on
        self.evicted = 0        # records on_full="drop_oldest" took back
        self.spilled = 0        # records on_full="spool" handed to the spool (in ``drops``)
        self.spooled_ahead = 0  # drained to the spool beyond a batch in flight (not settled)


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


def _take_back(inbox: Deque[bytes], body: bytes) -> bool:
    """Remove ``body`` itself from ``inbox`` (the lock held); False when it is not there
    (folded in). Not an equal body: that is another thread's record (same name, value and
    timestamp), and taken back in its place it would go behind that thread's later ones."""
    while True:
        try:  # one call into C: other threads only append, and not meanwhile
            i = list(map(operator.is_, inbox, itertools.repeat(body))).index(True)
        except ValueError:
            return False
        try:
            if inbox[i] is body:  # no call between this look and the del
                del inbox[i]
                return True
        except IndexError:
            pass  # code that interrupted this thread folded some in: look again


class StreamBuffer:
    """Per-stream queues bounded by ``max_records`` and ``max_bytes``."""

    def __init__(self, *, max_records: int, max_bytes: int, on_full: str, block_timeout: float,
                 flush_interval: float, batch_lines: int, batch_bytes: int, clock: Clock,
                 start_worker: Callable[[], object] = lambda: None,
                 spill: Optional[Callable[[str, bytes], bool]] = None,
                 offer_urgent: bool = False) -> None:
        self.max_records, self.max_bytes, self.on_full = max_records, max_bytes, on_full
        self.block_timeout, self.flush_interval = block_timeout, flush_interval
        self.batch_lines, self.batch_bytes = batch_lines, batch_bytes
        # A queue this long is sent without waiting for the interval: a full sink batch, or
        # half the buffer when the buffer is smaller, so a healthy sink empties it in time.
        self.ready_lines = min(batch_lines, max(1, max_records // 2))
        self.ready_bytes = min(batch_bytes, max(1, max_bytes // 2))
        # The queue plus a full inbox stays below both (see the module's docstring); 0
        # without the GIL.
        self._room_lines = min(self.ready_lines - 1, max_records) if _INBOX_OK else 0
        self._room_bytes = min(self.ready_bytes - 1, max_bytes) if _INBOX_OK else 0
        self.clock = clock
        #: Whether the metrics offer() takes are urgent (async mode) or wait (buffered mode).
        self.offer_urgent = offer_urgent
        #: Called (outside the lock) by put() when no worker is running: the pipeline's.
        self._start_worker = start_worker
        #: ``on_full="spool"``: hands a record that does not fit to the spool's writer.
        self._spill = spill
        self._reset()

    def _reset(self) -> None:
        """Fresh locks, conditions, queues and counters (at creation and in a forked child)."""
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)      # the worker waits here
        self._progress = threading.Condition(self._lock)  # callers wait here
        self._busy = False  # the lock's holder is half way through a change
        self._folding = False  # _fold() is running: the puts it makes do not start another
        self._waiting: Set[int] = set()  # threads inside a wait of this buffer
        #: See the docstring; ``urgent`` None marks an inbox record a close() left here.
        self._side: Deque[Tuple[str, bytes, Optional[bool]]] = collections.deque()
        self._streams: Dict[str, _Stream] = {METRIC: _Stream(METRIC), ERROR: _Stream(ERROR)}
        self._metric = self._streams[METRIC]  # offer()'s
        self._turn: List[_Stream] = list(self._streams.values())  # who the worker serves first
        self._worker_running = self._worker_idle = False
        self._worker_ident: Optional[int] = None  # the thread that takes batches
        self._closing = False   # no new records; the worker drains everything left
        self.stopped = False   # the worker must return as soon as it can
        self.hurry = 0         # bumped by each flush and close: a retry backoff ends at once
        self._backing_off = False  # the worker waits to retry a batch: nothing else moves
        self._counts = {"delivered": 0, "failed": 0, "retried": 0, "batches": 0, "spooled": 0,
                        "spilled": 0}
        # Every key there from the start: a re-entrant put never grows it while it is read.
        self._dropped = {"buffer_full": 0, "evicted": 0, "closed": 0, "spool_error": 0}

    #: In a forked child, the parent's records are the parent's to send: start afresh.
    after_fork_in_child = _reset

    # -- the worker's lifecycle, as the pipeline runs it -------------------------------
    @property
    def worker_running(self) -> bool:
        return self._worker_running

    def worker_started(self) -> None:
        """A worker is about to run: put() starts no other."""
        self._worker_running = True

    def worker_ended(self) -> bool:
        """The worker returned; whether records wait for a new one (the buffer is open).
        A caller that queued one while the worker was dying saw it running and started none."""
        with self._lock:
            self._fold_inboxes()
            self._worker_running = False
            for s in self._streams.values():
                self._revoke(s)  # put() starts the next worker
            return not self._closing and any(s.queue for s in self._streams.values())

    # -- the caller's side -------------------------------------------------
    def offer(self, body: bytes) -> int:
        """:meth:`put` of a metric, for a caller that will not wait for it: :data:`QUEUED`
        when it went to the inbox without the lock (see the module's docstring), else what
        put() returns. ``metric()``'s hot path: keep it short."""
        s = self._metric
        gen = s.gen
        inbox = s.inbox
        if len(inbox) < s.room and len(body) <= _INBOX_BODY:
            try:
                inbox.append(body)
            except BaseException:  # a signal handler's (Ctrl-C), raised as the append returned
                if s.gen != gen:  # not left behind a take or a close it crossed
                    self._raced(s, body)
                raise
            if s.gen == gen:
                return QUEUED
            return self._raced(s, body)
        return self.put(METRIC, body, self.offer_urgent)

    def _raced(self, s: _Stream, body: bytes) -> int:
        """offer() appended as ``room``'s premise changed: put the body the ordinary way,
        unless somebody folded it in already."""
        urgent = self.offer_urgent
        with self._lock:
            if not _take_back(s.inbox, body):  # folded (urgent in async mode): queued
                return QUEUED
            return self.put(s.name, body, urgent)

    def put(self, stream: str, body: bytes, urgent: bool) -> int:
        """Append one body; returns its sequence number, or DROPPED, CLOSED or DEFERRED.
        ``urgent`` wakes the worker now; else it waits for a full batch, the interval or a flush.
        """
        with self._lock:
            if self._busy:  # we interrupted this thread's own change of the buffer
                self._side.append((stream, body, urgent))
                return DEFERRED
            self._busy = True
            try:
                if self._closing:
                    return CLOSED
                s = self._streams[stream]
                if s.inbox:
                    self._fold_inbox(s)  # the older records first
                seq = self._accept(s, body, urgent)
            finally:
                self._busy = False
            if self._side and not self._folding:
                self._fold()
        if not self._worker_running:
            self._start_worker()
        return seq

    def _accept(self, s: _Stream, body: bytes, urgent: bool) -> int:
        """put()'s work, the lock held and ``_busy`` set."""
        queue = s.queue
        size = len(body)
        if len(queue) >= self.max_records or s.bytes + size > self.max_bytes:
            s.urgent = True  # a full buffer is sent now, whatever the mode
            self._wake_worker(s)
            if not self._make_room(s, size):
                s.drops += 1  # not delivered by the next flush, either way
                if self._spill is not None and self._spill(s.name, body):
                    self._counts["spilled"] += 1
                    s.spilled += 1
                    return SPILLED
                self._dropped["buffer_full"] += 1
                return DROPPED
        if not queue and not urgent:
            s.due = self._due()
        length = len(queue) + 1
        total = s.bytes + size
        # An idle worker is woken for urgent records, a ready batch, and the first
        # record of an empty queue (whose due time may come before what it waits for);
        # before the append: it looks at the queue once the lock is let go.
        if self._worker_idle and (
            urgent or length == 1 or length >= self.ready_lines or total >= self.ready_bytes
        ):
            self._wake()
        # No call from here but the append, the last step: an exception that a signal
        # handler raises as a call returns (Ctrl-C) finds the record either not queued, or
        # queued and counted; and a RecursionError near the limit cannot tell a caller that
        # its queued record was not taken. _set_room(), inline.
        s.bytes = total
        seq = s.enqueued = s.enqueued + 1
        if urgent:
            s.urgent = True
        room = self._room_lines - length
        bytes_room = (self._room_bytes - total) // _INBOX_BODY
        if bytes_room < room:
            room = bytes_room
        s.room = room if room > 0 and (s.urgent or not self.offer_urgent) and not self._closing \
            else 0
        queue.append(body)
        return seq

    def _due(self) -> float:
        return self.clock.monotonic() + self.flush_interval * (
            1.0 + _INTERVAL_JITTER * (2.0 * random.random() - 1.0))

    def _fold_inbox(self, s: _Stream) -> None:
        """Queue what offer() left in ``s``'s inbox, oldest first (the lock held, ``_busy``
        set); the caller sets ``room`` again. ``room`` kept them within the bounds; the few
        that racing threads added beyond it are taken too: refusing them now would lose
        records whose callers were told they were queued."""
        queue, inbox = s.queue, s.inbox
        s.room = 0  # until the caller sets it for the longer queue
        count = len(inbox)
        if not count:
            return
        size = sum(map(len, itertools.islice(inbox, count)))
        moving = itertools.islice(iter(inbox.popleft, None), count)
        first = not queue
        if self.offer_urgent:
            s.urgent = True  # async mode: an offered metric goes at once, wherever it waited
        elif first and not s.urgent:
            s.due = self._due()
        if self._worker_idle and (
            s.urgent or first or len(queue) + count >= self.ready_lines
            or s.bytes + size >= self.ready_bytes
        ):
            self._wake()  # before the move: the worker looks once the lock is let go
        # No call from here but the move, one call into C (popleft() until ``count``) that
        # neither another thread nor a signal handler can cut in two: an exception a handler
        # raises as a call returns (Ctrl-C) finds the records all in the inbox, or all queued
        # and counted; a loop here lost the body between its popleft() and its append.
        s.bytes += size
        s.enqueued += count
        queue.extend(moving)

    def _fold_inboxes(self) -> None:
        """Fold every stream's inbox (the lock held; not once closing: see :meth:`close`)."""
        if not self._closing and not self._busy:
            self._fold_all()

    def _fold_all(self) -> None:
        """_fold_inboxes() without its guard: for close(), which refused new records first."""
        self._busy = True
        try:
            for s in self._streams.values():
                if s.inbox:
                    self._fold_inbox(s)
                    self._set_room(s)
        finally:
            self._busy = False
        if self._side and not self._folding:
            self._fold()

    def _set_room(self, s: _Stream) -> None:
        """How many bodies offer() may leave in ``s``'s inbox now (the lock held)."""
        n = len(s.queue)
        if n and (s.urgent or not self.offer_urgent) and not self._closing:
            room = min(self._room_lines - n, (self._room_bytes - s.bytes) // _INBOX_BODY)
            s.room = room if room > 0 else 0
        else:
            s.room = 0

    def _revoke(self, s: _Stream) -> None:
        """What ``room`` assumed may not hold any more: callers racing it take their record
        back (see the module's docstring)."""
        s.room = 0
        s.gen += 1

    def _fold(self) -> None:
        """Queue the records interrupting code left aside (the lock held, nothing half done)."""
        self._folding = True
        try:
            side = self._side
            while side:
                stream, body, urgent = side.popleft()
                if urgent is None:  # offered before a close() that could not fold it
                    with self._lock:
                        self._busy = True
                        try:
                            self._accept(self._streams[stream], body, False)
                        finally:
                            self._busy = False
                elif self.put(stream, body, urgent) == CLOSED:
                    self._dropped["closed"] += 1  # its caller was told DEFERRED: count it here
        finally:
            self._folding = False

    def _make_room(self, s: _Stream, size: int) -> bool:
        if self.on_full == "drop_oldest":
            while s.queue and (len(s.queue) >= self.max_records or s.bytes + size > self.max_bytes):
                s.bytes -= len(s.queue.popleft())
                s.taken += 1
                self._dropped["evicted"] += 1
                s.evicted += 1
                _lose(s, s.taken, 1)
            if not s.in_flight:
                s.settled = s.taken
            self._progress.notify_all()
            return True
        if self.on_full == "block":
            me = threading.get_ident()
            if me in self._waiting:
                return False  # code interrupting this thread's own wait never waits (see below)
            deadline = time.monotonic() + self.block_timeout
            self._waiting.add(me)
            try:
                while len(s.queue) >= self.max_records or s.bytes + size > self.max_bytes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closing:
                        return False
                    self._busy = False  # waiting lets go of the lock: nothing is half done
                    try:
                        self.clock.wait(self._progress, remaining)
                    finally:
                        self._busy = True
            finally:
                self._waiting.discard(me)
            return True
        return False

    def wait_settled(self, targets: Dict[str, int], timeout: Optional[float],
                     through_outage: bool = True) -> bool:
        """Wait until every stream has settled up to its target; False after ``timeout`` real
        seconds or, with ``through_outage=False``, once the sink is failing (:meth:`report_attempt`)
        or the worker waits to retry a batch of any stream (it serves one at a time): the
        records wait for their retries, the caller does not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = self._streams
        me = threading.get_ident()
        with self._lock:
            if me in self._waiting:
                # Code that interrupted this thread while it waits (a __del__ run by the
                # garbage collector inside Condition.wait, say): waiting here would let go of
                # the lock before that wait has registered, and its wake-up would be lost.
                return False
            if self._busy:
                # Code that interrupted this thread's own change of the buffer (a signal
                # handler that flushes): the wait would let go of the lock half way through,
                # and other threads would find _busy set (their puts deferred behind their
                # next metrics) or fold the inbox under the interrupted fold.
                return False
            self._waiting.add(me)
            try:
                # A record made once its stream was known to be failing is not waited for at
                # all; one already on its way is let go when the worker starts to back off (if
                # it failed for good, it settles at once).
                outage = not through_outage and any(
                    streams[name].outage and target > streams[name].outage_after
                    for name, target in targets.items()
                )
                while any(streams[name].settled < target for name, target in targets.items()):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    if outage or (self._backing_off and not through_outage):
                        return False
                    self.clock.wait(self._progress, remaining)
                return True
            finally:
                self._waiting.discard(me)

    def request_flush(self) -> Checkpoint:
        """Ask the worker to send everything accepted so far; returns what to wait for. The
        flush reports on everything (lost, refused, pending) since the last one that completed."""
        with self._lock:
            self._fold_inboxes()
            targets, firsts, drops = {}, {}, {}
            pending = False
            for s in self._streams.values():
                s.flush_target = max(s.flush_target, s.enqueued)
                targets[s.name] = s.enqueued
                firsts[s.name] = s.checked + 1
                drops[s.name] = (s.checked_drops, s.drops)
                pending = pending or s.settled < s.enqueued
                self._wake_worker(s)
            self._hurry()
            return Checkpoint(targets, firsts, drops, pending)

    def verdict(self, checkpoint: Checkpoint) -> bool:
        """Whether nothing in the checkpoint's window (settled by now) was lost; marks it
        reported."""
        with self._lock:
            ok = True
            for name, last in checkpoint.targets.items():
                s = self._streams[name]
                first = checkpoint.firsts[name]
                reported, refused = checkpoint.drops[name]
                lost = refused > reported
                if not lost and first <= last:
                    lost = s.forgotten >= first or any(  # a copy: a re-entrant put may evict
                        seq <= last and seq + count > first for seq, count in tuple(s.losses))
                ok = ok and not lost
                s.checked = max(s.checked, last)
                s.checked_drops = max(s.checked_drops, refused)
            return ok

    def _wake_worker(self, s: _Stream) -> None:
        if s.queue and self._worker_idle:
            self._wake()

    def _wake(self) -> None:
        # A record made on the worker's own thread (a __del__ run by the garbage collector
        # as the worker was about to wait) cannot wake it: it is not waiting yet, and the
        # notification would be lost. The flag then stays set, so the next record from any
        # other thread wakes it; the worker's record waits for that, a flush, or exit.
        if threading.get_ident() != self._worker_ident:
            self._worker_idle = False
            self._wakeup.notify()

    # -- the worker's side -------------------------------------------------
    def take(self, idle: Optional[float] = None) -> Optional[Tuple[str, List[bytes], int]]:
        """Block until a stream has a batch: (stream, bodies, number of the first body); None
        once stopped, or closed and empty; :data:`IDLE` after ``idle`` seconds with nothing
        due (the worker then looks at the spool)."""
        idle_until = None if idle is None else self.clock.monotonic() + idle
        with self._lock:
            self._worker_ident = threading.get_ident()
            while True:
                if self.stopped:
                    return None
                self._fold_inboxes()
                now = self.clock.monotonic()
                next_due = None
                turn = self._turn
                for i, s in enumerate(turn):
                    if not s.queue:
                        continue
                    if (
                        s.urgent or self._closing or s.flush_target > s.taken or now >= s.due
                        or len(s.queue) >= self.ready_lines or s.bytes >= self.ready_bytes
                    ):
                        self._turn = turn[i + 1:] + turn[: i + 1]  # served: to the back
                        self._busy = True
                        try:
                            return self._take_batch(s)
                        finally:
                            self._busy = False
                            if self._side:
                                self._fold()
                    next_due = s.due if next_due is None else min(next_due, s.due)
                if self._closing:
                    return None
                if idle_until is not None:
                    if now >= idle_until:
                        return IDLE
                    next_due = idle_until if next_due is None else min(next_due, idle_until)
                self._worker_idle = True
                self.clock.wait(self._wakeup, None if next_due is None else next_due - now)
                self._worker_idle = False

    def _take_batch(self, s: _Stream) -> Tuple[str, List[bytes], int]:
        # Revoke first, then fold: an offer() whose append came since take() folded (another
        # thread's, while this one held the lock; a __del__ run on this one) saw the old gen
        # and was told QUEUED, so it goes with this batch; one after this fold sees gen move
        # and takes its record back. Cut first, and it waited behind an empty queue.
        self._revoke(s)
        if s.inbox and not self._closing:
            self._fold_inbox(s)
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
        self._set_room(s)
        if not queue:
            s.urgent = False  # what is left of a partial take keeps its due time
        self._progress.notify_all()  # room for callers blocked on a full buffer
        return s.name, batch, first

    def settle(self, stream: str, first: int, delivered: int, failed: int,
               spooled: int = 0) -> None:
        """Record the fate of the batch taken last from ``stream``; records that went to the
        spool are settled, but not delivered (a flush reports them as not delivered)."""
        with self._lock:
            s = self._streams[stream]
            s.in_flight = False
            s.settled = s.taken
            s.spooled_ahead = 0
            counts = self._counts
            counts["delivered"] += delivered
            counts["failed"] += failed
            counts["spooled"] += spooled
            counts["batches"] += 1
            if failed:
                s.failed += failed
            if failed or spooled:
                _lose(s, first, s.taken - first + 1)
            self._progress.notify_all()

    def drain(self) -> List[Tuple[str, List[bytes], int]]:
        """Once stopped: take every record still queued, per stream (stream, bodies, number of
        the first), for the spool; :meth:`settle_drained` says what became of them."""
        with self._lock:
            taken = []
            for s in self._streams.values():
                self._revoke(s)
                if s.queue:
                    first = s.taken + 1
                    bodies = list(s.queue)
                    s.queue.clear()
                    s.bytes = 0
                    s.taken += len(bodies)
                    taken.append((s.name, bodies, first))
            return taken

    def settle_drained(self, stream: str, first: int, count: int, spooled: int) -> None:
        """``count`` drained records from number ``first``: ``spooled`` went to the spool,
        the rest stay pending (counted as such: nothing will send them now)."""
        with self._lock:
            s = self._streams[stream]
            self._counts["spooled"] += spooled
            _lose(s, first, count)
            if spooled == count and not s.in_flight:
                s.settled = s.taken
            else:  # settled with the batch in flight, when the worker settles it, or never
                s.spooled_ahead += spooled
            self._progress.notify_all()

    def spilled(self, count: int, written: bool) -> None:
        """``count`` records put() handed to the spool's writer were written (or, False,
        could not be)."""
        with self._lock:
            if written:
                self._counts["spooled"] += count
            else:
                self._dropped["spool_error"] += count

    def _hurry(self) -> None:
        """A flush or close wants everything out now: end a retry backoff at once."""
        self.hurry += 1
        self._wakeup.notify_all()

    def report_attempt(self, stream: str, delivered: bool) -> None:
        """The worker's word after each attempt on ``stream``: did it deliver anything? If not,
        the stream is in an *outage*: synchronous callers stop waiting (:meth:`wait_settled`)."""
        s = self._streams[stream]
        if s.outage == delivered:
            with self._lock:
                s.outage = not delivered
                s.outage_after = s.taken  # records up to here were in or before that attempt

    def wait_backoff(self, seconds: float, records: int, hurry: int) -> bool:
        """Sleep ``seconds`` on the clock before ``records`` are retried (counted from now, so
        an outage shows in ``stats()``). Early and True once :attr:`hurry` differs from
        ``hurry`` (a flush or close came); early and False when the client stops."""
        with self._lock:
            if self.stopped:
                return False
            self._counts["retried"] += records
            deadline = self.clock.monotonic() + seconds
            self._backing_off = True
            self._progress.notify_all()  # synchronous callers stop waiting
            try:
                while not self.stopped:
                    remaining = deadline - self.clock.monotonic()
                    if remaining <= 0 or self.hurry != hurry:
                        return True
                    self.clock.wait(self._wakeup, remaining)
                return False
            finally:
                self._backing_off = False

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Refuse new records and let the worker drain what is left."""
        with self._lock:
            self._close()
            self._hurry()
            self._progress.notify_all()

    def stop(self) -> None:
        """Tell the worker to return now (what is left stays pending)."""
        with self._lock:
            self._close()
            self.stopped = True
            self._wakeup.notify_all()
            self._progress.notify_all()

    def _close(self) -> None:
        """Refuse new records, then fold the inboxes in (the lock held). In that order: an
        offer() whose append comes after the fold takes its record back and is told CLOSED,
        as a put() would be; one whose append came before it was told QUEUED, and the worker
        drains its record. Fold first, and an append between the fold and the refusal was
        told QUEUED and left in the inbox of a closed buffer."""
        opening = not self._closing
        self._closing = True
        for s in self._streams.values():
            self._revoke(s)
        if not opening:
            return  # what an inbox holds now is taken back by the offers that raced a close
        if self._busy:  # we interrupted this thread's own change: its holder folds them
            for s in self._streams.values():
                count = len(s.inbox)
                if count:  # one call into C, as in _fold_inbox
                    self._side.extend(zip(
                        itertools.repeat(s.name),
                        itertools.islice(iter(s.inbox.popleft, None), count),
                        itertools.repeat(None)))
            return
        self._fold_all()  # room stays 0: the buffer is closing

    def failed(self, stream: str) -> int:
        """Records of ``stream`` the worker gave up on (read without the lock: for a log)."""
        return self._streams[stream].failed

    def unsettled(self) -> Dict[str, int]:
        """Per stream, records accepted and not yet settled, read without the lock (which
        a thread cut short by the exit may hold)."""
        return {name: s.enqueued - s.settled + len(s.inbox)
                for name, s in list(self._streams.items())}

    def queued(self) -> int:
        """Records waiting in the queues, not taken by the worker (read without the lock)."""
        return sum(len(s.queue) + len(s.inbox) for s in list(self._streams.values()))

    def undelivered(self) -> Dict[str, int]:
        """Per stream, the records that did not reach the sink: failed, dropped or pending."""
        with self._lock:
            self._fold_inboxes()
            return {s.name: s.failed + s.drops - s.spilled + s.evicted + s.enqueued - s.settled
                    - s.spooled_ahead + len(s.inbox) for s in self._streams.values()}

    def snapshot(self) -> Dict[str, object]:
        with self._lock:
            self._fold_inboxes()
            counts, streams = self._counts, self._streams.values()
            # An inbox left after close: offers that raced it and have not taken theirs back.
            enqueued = sum(s.enqueued + len(s.inbox) for s in streams)
            enqueued += counts["spilled"]  # accepted for the spool: pending until written
            return {
                "enqueued": enqueued, "delivered": counts["delivered"],
                "pending": enqueued - counts["delivered"] - counts["failed"]
                - self._dropped["evicted"] - self._dropped["spool_error"] - counts["spooled"],
                "dropped": {reason: n for reason, n in self._dropped.items() if n},
                "failed": counts["failed"], "retried": counts["retried"],
                "batches": counts["batches"], "buffered_bytes": sum(s.bytes for s in streams),
            }
