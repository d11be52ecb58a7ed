"""metric()'s lock-free path: the buffer's inbox (dxtrack/buffer.py's docstring).

In async and buffered mode a metric is appended to its stream's inbox without the
buffer's lock while ``room`` allows; whoever takes the lock next folds the inbox in.
These tests pin what that must never change: a record offered is delivered exactly
once, in order, within the buffer's bounds and its timing rules, whatever the worker,
a flush or a close does between the caller's check and its append. The races are made
deterministic by an inbox that runs the interfering step at the moment in question.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, List, Optional

import pytest

from dxtrack import DXTrack, MemorySink
from dxtrack import buffer as buffer_module
from dxtrack.buffer import CLOSED, IDLE, QUEUED, StreamBuffer
from dxtrack.records import METRIC
from dxtrack.testing import ManualClock

INTERVAL = 3600.0
HANG = 10.0


def make_buffer(urgent: bool = False, **options: Any) -> StreamBuffer:
    settings: dict = dict(
        max_records=1000, max_bytes=10**6, on_full="drop_newest", block_timeout=0.0,
        flush_interval=INTERVAL, batch_lines=100, batch_bytes=10**6, clock=ManualClock(),
        offer_urgent=urgent)
    settings.update(options)
    return StreamBuffer(**settings)


def body(n: int, size: int = 20) -> bytes:
    return b'{"n":%d,"pad":"%s"' % (n, b"x" * max(0, size - 20))


def within(seconds: float, call: Callable[[], Any]) -> Optional[List[Any]]:
    """``call``'s result in a list, or None if it did not return in ``seconds``."""
    result: List[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return None if thread.is_alive() else result


class LockHeld:
    """Another thread holds the buffer's lock until :meth:`release`."""

    def __init__(self, buffer: StreamBuffer) -> None:
        self._taken, self._release = threading.Event(), threading.Event()

        def hold() -> None:
            with buffer._lock:
                self._taken.set()
                self._release.wait(HANG)

        self._thread = threading.Thread(target=hold, daemon=True)
        self._thread.start()
        assert self._taken.wait(HANG)

    def release(self) -> None:
        self._release.set()
        self._thread.join(HANG)


def waits_for_the_lock(buffer: StreamBuffer, call: Callable[[], Any]) -> Any:
    """Assert that ``call`` waits while another thread holds the buffer's lock; then let it
    finish and return its result."""
    held = LockHeld(buffer)
    result: List[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    try:
        thread.start()
        thread.join(0.3)
        assert thread.is_alive(), "it did not wait for the lock"
    finally:
        held.release()
    thread.join(HANG)
    assert result, "it never finished"
    return result[0]


class Interleaved(collections.deque):
    """An inbox that runs ``step`` once, just before (or just after) the next append:
    the moment another thread could take its turn in a real run."""

    def __init__(self, step: Callable[[], Any], after: bool = False) -> None:
        super().__init__()
        self.step: Optional[Callable[[], Any]] = step
        self.after = after

    def append(self, item: bytes) -> None:
        step, self.step = self.step, None
        if step is not None and not self.after:
            step()
        super().append(item)
        if step is not None and self.after:
            step()


def taken(buffer: StreamBuffer) -> List[bytes]:
    """The worker's next batch, if one is due (a flush makes it due)."""
    buffer.request_flush()
    batch = buffer.take(idle=0)
    assert batch is not None and batch is not IDLE
    stream, bodies, first = batch
    buffer.settle(stream, first, len(bodies), 0)
    return bodies


class TestTheCommonPath:
    def test_offers_after_the_first_take_no_lock(self) -> None:
        buffer = make_buffer()
        assert buffer.offer(body(0)) == 1  # an empty queue: the locked put sets its due time
        held = LockHeld(buffer)
        try:
            results = within(HANG, lambda: [buffer.offer(body(n)) for n in range(1, 50)])
            assert results == [[QUEUED] * 49], "an offer waited for the lock"
        finally:
            held.release()
        assert taken(buffer) == [body(n) for n in range(50)]
        assert buffer.snapshot()["enqueued"] == 50

    def test_the_record_that_makes_a_batch_ready_takes_the_lock_and_is_ready(self) -> None:
        buffer = make_buffer()  # batches of 100 lines: 100 queued are sent without waiting
        buffer.offer(body(0))
        held = LockHeld(buffer)
        try:
            assert within(HANG, lambda: [buffer.offer(body(n)) for n in range(1, 99)]) == [
                [QUEUED] * 98]
        finally:
            held.release()
        assert waits_for_the_lock(buffer, lambda: buffer.offer(body(99))) == 100
        batch = buffer.take(idle=0)  # ready now, an hour before its due time
        assert batch is not None and batch[1] == [body(n) for n in range(100)]

    @pytest.mark.parametrize("max_records,max_bytes", [(10, 10**6), (1000, 6 * 2048)])
    def test_queue_and_inbox_stay_within_the_bounds(self, max_records: int,
                                                    max_bytes: int) -> None:
        buffer = make_buffer(max_records=max_records, max_bytes=max_bytes)
        s = buffer._metric
        for n in range(3 * max_records):
            buffer.offer(body(n, size=1000))
            assert len(s.queue) + len(s.inbox) <= max_records
            assert s.bytes + sum(map(len, s.inbox)) <= max_bytes
        stats = buffer.snapshot()
        assert stats["enqueued"] + stats["dropped"]["buffer_full"] == 3 * max_records

    def test_a_large_body_takes_the_lock(self) -> None:
        buffer = make_buffer()
        buffer.offer(body(0))
        assert waits_for_the_lock(buffer, lambda: buffer.offer(body(1, size=5000))) == 2

    def test_async_mode_offers_only_while_a_take_is_coming(self) -> None:
        buffer = make_buffer(urgent=True)
        assert buffer.offer(body(0)) == 1
        assert buffer.offer(body(1)) == QUEUED  # the first one's take will fold it in
        assert taken(buffer) == [body(0), body(1)]
        assert buffer.offer(body(2)) == 3  # an empty queue again: the locked put wakes the worker

    def test_async_mode_never_leaves_a_metric_behind_one_that_waits(self) -> None:
        buffer = make_buffer(urgent=True)
        buffer.put(METRIC, body(0), False)  # a record that waits for the interval ...
        buffer.offer(body(1))  # ... does not make the next async metric wait with it
        batch = buffer.take(idle=0)
        assert batch is not IDLE and batch is not None and batch[1] == [body(0), body(1)]

    def test_without_a_gil_every_offer_takes_the_lock(self, monkeypatch:
                                                      pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(buffer_module, "_INBOX_OK", False)
        buffer = make_buffer()
        assert [buffer.offer(body(n)) for n in range(5)] == [1, 2, 3, 4, 5]
        assert waits_for_the_lock(buffer, lambda: buffer.offer(body(5))) == 6


class TestRaces:
    """The interfering step runs between the caller's check of ``room`` and its append
    (``after=False``), or between its append and its second look at ``gen`` (``after=True``)."""

    @pytest.mark.parametrize("urgent", [False, True], ids=["buffered", "async"])
    def test_a_take_before_the_append(self, urgent: bool) -> None:
        buffer = make_buffer(urgent=urgent)
        buffer.offer(body(0))
        first: List[List[bytes]] = []
        buffer._metric.inbox = Interleaved(lambda: first.append(taken(buffer)))
        seq = buffer.offer(body(1))
        assert first == [[body(0)]]
        assert seq == 2  # taken back and put the ordinary way: numbered, queued
        assert list(buffer._metric.queue) == [body(1)] and not buffer._metric.inbox
        if urgent:
            assert buffer.take(idle=0)[1] == [body(1)]  # urgent still: it goes at once
        else:
            assert buffer.take(idle=0) is IDLE  # not stranded: it waits for its own due time
            buffer.clock.advance(INTERVAL * 1.2)
            assert buffer.take(idle=0)[1] == [body(1)]

    def test_a_take_after_the_append(self) -> None:
        buffer = make_buffer(urgent=True)
        buffer.offer(body(0))
        first: List[List[bytes]] = []
        buffer._metric.inbox = Interleaved(lambda: first.append(taken(buffer)), after=True)
        assert buffer.offer(body(1)) == QUEUED
        assert first == [[body(0), body(1)]]  # the take folded it in: sent once, no copy left
        assert not buffer._metric.queue and not buffer._metric.inbox
        assert buffer.snapshot()["enqueued"] == 2

    def test_a_close_before_the_append_refuses_it(self) -> None:
        buffer = make_buffer()
        buffer.offer(body(0))
        buffer._metric.inbox = Interleaved(buffer.close)
        assert buffer.offer(body(1)) == CLOSED  # as put() says it: the client hands it on
        assert not buffer._metric.inbox
        assert buffer.snapshot()["enqueued"] == 1

    def test_a_close_after_the_append_keeps_it(self) -> None:
        buffer = make_buffer()
        buffer.offer(body(0))
        buffer._metric.inbox = Interleaved(buffer.close, after=True)
        assert buffer.offer(body(1)) == QUEUED  # close() folded it in before it closed
        assert taken(buffer) == [body(0), body(1)]

    def test_equal_bodies_racing_are_each_kept_once(self) -> None:
        buffer = make_buffer(urgent=True)
        buffer.offer(body(0))
        buffer.offer(body(7))  # one equal to the next, already in the inbox
        inbox = Interleaved(lambda: None)
        inbox.extend(buffer._metric.inbox)
        batches: List[List[bytes]] = []
        inbox.step = lambda: batches.append(taken(buffer))
        buffer._metric.inbox = inbox
        assert buffer.offer(body(7)) == 3
        assert batches == [[body(0), body(7)]]
        assert taken(buffer) == [body(7)]

    def test_a_reconfigure_racing_a_metric_delivers_it_once(self) -> None:
        first, second = MemorySink(), MemorySink()
        client = DXTrack()
        client.configure(stage="test", context="c", run_id="r", sink=first,
                         buffer_metrics=True)
        try:
            client.metric("before", 0)
            pipeline = client._state[1]
            pipeline.buffer._metric.inbox = Interleaved(lambda: client.configure(
                stage="test", context="c", run_id="r", sink=second, buffer_metrics=True))
            client.metric("raced", 1)
            assert client.flush(timeout=HANG)
            assert [r["metric_name"] for r in first.records("metric")] == ["before"]
            assert [r["metric_name"] for r in second.records("metric")] == ["raced"]
        finally:
            client.close(timeout=5)


class TestCallers:
    @pytest.mark.parametrize("mode", ["buffered", "async"])
    def test_threads_and_flushes_lose_duplicate_and_reorder_nothing(self, mode: str) -> None:
        sink = MemorySink()
        client = DXTrack()
        client.configure(stage="test", context="c", run_id="r", sink=sink,
                         max_buffer_records=1_000_000, flush_interval=0.01,
                         **{"buffered": {"buffer_metrics": True},
                            "async": {"use_async_requests": True}}[mode])
        threads_n, per_thread = 6, 20_000
        start = threading.Barrier(threads_n + 1)
        done = threading.Event()

        def record(thread: int) -> None:
            start.wait()
            for n in range(per_thread):
                client.metric(f"t{thread}", n)

        def flush() -> None:
            start.wait()
            while not done.is_set():
                client.flush(timeout=HANG)

        threads = [threading.Thread(target=record, args=(t,)) for t in range(threads_n)]
        flusher = threading.Thread(target=flush)
        for thread in [*threads, flusher]:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        flusher.join()
        try:
            assert client.flush(timeout=60)
            seen: dict = collections.defaultdict(list)
            for record in sink.records("metric"):
                seen[record["metric_name"]].append(record["value"])
            for t in range(threads_n):
                assert seen[f"t{t}"] == [float(n) for n in range(per_thread)], f"thread {t}"
            stats = client.stats()
            total = threads_n * per_thread
            assert (stats["enqueued"], stats["delivered"], stats["pending"]) == (total, total, 0)
        finally:
            client.close(timeout=5)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
    def test_a_fork_leaves_the_inbox_to_the_parent(self, tmp_path: Any) -> None:
        sink = MemorySink()
        client = DXTrack()
        client.configure(stage="test", context="c", run_id="r", sink=sink, buffer_metrics=True,
                         flush_interval=INTERVAL)
        try:
            for n in range(10):
                client.metric("parent", n)
            assert client._state[1].buffer._metric.inbox  # some of them wait there
            pid = os.fork()
            if pid == 0:  # the child: nothing of the parent's to send, and it records its own
                code = 1
                try:
                    client.metric("child", 0)
                    stats = client.stats()
                    code = 0 if stats["enqueued"] == 1 and client.flush(timeout=HANG) and [
                        r["metric_name"] for r in sink.records("metric")] == ["child"] else 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert client.flush(timeout=HANG)
            assert [r["value"] for r in sink.records("metric")
                    if r["metric_name"] == "parent"] == [float(n) for n in range(10)]
        finally:
            client.close(timeout=5)
