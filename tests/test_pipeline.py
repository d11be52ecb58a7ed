"""The delivery pipeline (issue 3): buffer bounds, worker, modes, flush, close, retries, stats.

No test sleeps to wait for the worker: they wait on a flush, on an event a
test sink sets, on ``MemorySink.wait_for``, or move a :class:`ManualClock`.
The only polling (:func:`eventually`) watches threads the test itself started.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from sinks_for_tests import CrashingSink, FlakySink, GateSink, RaisingSink

from dxtrack import DXTrack, RetryPolicy
from dxtrack._logging import RateLimitedLog
from dxtrack.buffer import StreamBuffer
from dxtrack.clock import SystemClock
from dxtrack.records import RecordBuilder
from dxtrack.testing import ManualClock, MemorySink
from dxtrack.worker import Worker

INTERVAL = 5.0  # flush_interval of the buffered-mode tests; the worker jitters it by +-10 %


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def gate_sink(make_client: Callable[..., DXTrack]) -> Iterator[Callable[..., GateSink]]:
    """GateSinks, opened at teardown before ``make_client`` closes the clients."""
    made: List[GateSink] = []

    def make(**options: Any) -> GateSink:
        sink = GateSink(**options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.release()


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` (about threads the test started, never the worker)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.001)
    return True


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def values(sink: MemorySink, stream: str = "metric") -> List[float]:
    return sorted(record["value"] for record in sink.records(stream))


def barrier(client: DXTrack) -> None:
    """A default-mode error: returns once the worker has taken and settled it."""
    client.error(exception=RuntimeError("barrier"))


def in_thread(target: Callable[[], Any], name: str = "caller") -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class ObservedClock(SystemClock):
    """The system clock, telling the test which threads are waiting on it."""

    def __init__(self) -> None:
        self.waiting: Dict[str, threading.Event] = {}

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        self.waiting.setdefault(threading.current_thread().name, threading.Event()).set()
        super().wait(condition, timeout)


# -- volume --------------------------------------------------------------------


class TestVolume:
    """Many threads recording at once in async mode lose and duplicate nothing."""

    def test_eight_threads_of_25000_metrics_arrive_exactly_once(self, make_client):
        sink = MemorySink()
        # 'block' so that a worker slower than eight producers means waiting, not dropping:
        # exactly 200,000 (twice the buffer's 100,000) is then the only correct count.
        client = make_client(
            sink=sink, use_async_requests=True, on_full="block", block_timeout=60.0
        )
        threads_n, per_thread = 8, 25_000
        start = threading.Barrier(threads_n)

        def record(first: int) -> None:
            metric = client.metric
            start.wait()
            for value in range(first, first + per_thread):
                metric("load.rows", value)

        threads = [
            threading.Thread(target=record, args=(n * per_thread,)) for n in range(threads_n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert client.flush_metrics_buffer(timeout=60) is True
        records = sink.records("metric")
        total = threads_n * per_thread
        assert len(records) == total
        assert sorted(record["value"] for record in records) == [float(v) for v in range(total)]
        assert len({record["id"] for record in records}) == total
        stats = client.stats()
        assert (stats["enqueued"], stats["delivered"], stats["pending"]) == (total, total, 0)
        assert stats["dropped"] == {}


# -- the three delivery modes ----------------------------------------------------


class TestDefaultMode:
    """Default mode: metric(), error() and errors() return once their record is settled."""

    def test_records_are_in_the_sink_when_the_call_returns(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink)
        client.metric("rows", 1)
        assert values(sink) == [1.0]
        client.error(exception=ValueError("boom"))
        client.errors([KeyError("a"), OSError("b")])
        assert [r["exception"]["type"] for r in sink.records("error")] == [
            "ValueError", "KeyError", "OSError",
        ]

    def test_the_caller_waits_while_its_record_is_being_sent(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, sync_timeout=30)
        caller = in_thread(lambda: client.metric("rows", 1))
        assert sink.entered.wait(10)
        assert caller.is_alive()  # blocked inside metric() until the sink lets go
        sink.release()
        caller.join(10)
        assert not caller.is_alive()
        assert values(sink) == [1.0]

    def test_concurrent_callers_share_a_batch(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, sync_timeout=30)
        callers = [in_thread(lambda v=v: client.metric("rows", v)) for v in range(8)]
        assert sink.entered.wait(10)
        assert eventually(lambda: client.stats()["enqueued"] == 8)
        sink.release()
        for caller in callers:
            caller.join(10)
        assert values(sink) == [float(v) for v in range(8)]
        # The first record (or the first few) alone, then all that queued meanwhile, together.
        assert len(sink.calls) <= 2

    def test_a_hanging_sink_holds_a_caller_at_most_sync_timeout(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, sync_timeout=0.3)
        _, elapsed = timed(lambda: client.metric("rows", 1))
        assert 0.25 <= elapsed < 2.0
        _, elapsed = timed(lambda: client.error(exception=ValueError("x")))
        assert 0.25 <= elapsed < 2.0


class TestAsyncMode:
    """use_async_requests: calls return at once and the worker sends as soon as it can."""

    def test_calls_return_before_delivery(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, use_async_requests=True)
        client.metric("rows", 1)
        client.error(exception=ValueError("boom"))
        assert sink.entered.wait(10)
        assert sink.lines("metric") == [] and client.stats()["delivered"] == 0
        sink.release()
        assert client.flush(timeout=10) is True
        assert values(sink) == [1.0] and len(sink.lines("error")) == 1

    def test_records_go_out_without_a_flush(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, use_async_requests=True, clock=ManualClock())
        client.metric("rows", 1)
        assert sink.wait_for("metric", 1)  # time stands still: no interval involved

    def test_what_queues_during_a_send_goes_out_in_one_call(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, use_async_requests=True)
        client.metric("rows", 0)
        assert sink.entered.wait(10)
        for value in range(1, 200):
            client.metric("rows", value)
        sink.release()
        assert client.flush(timeout=10) is True
        assert [call.lines for call in sink.calls] == [1, 199]


class TestBufferedMode:
    """buffer_metrics: metrics wait for a full batch, the interval, a flush or exit."""

    def test_nothing_is_sent_before_the_interval_and_all_of_it_after(self, make_client):
        clock = ManualClock()
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=INTERVAL, clock=clock)
        for value in range(5):
            client.metric("rows", value)
        clock.advance(INTERVAL * 0.89)  # the jitter is at most 10 %
        barrier(client)
        assert sink.lines("metric") == []
        clock.advance(INTERVAL * 0.22)
        assert sink.wait_for("metric", 5)
        assert values(sink) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert client.stats()["batches"] == 2  # the barrier's error, then the five metrics

    def test_a_full_batch_goes_out_at_once(self, make_client):
        sink = MemorySink(max_batch_lines=10)
        client = make_client(sink=sink, buffer_metrics=True, clock=ManualClock())
        for value in range(9):
            client.metric("rows", value)
        barrier(client)
        assert sink.lines("metric") == []
        client.metric("rows", 9)
        assert sink.wait_for("metric", 10)
        assert values(sink) == [float(v) for v in range(10)]

    def test_a_flush_sends_them(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, clock=ManualClock())
        for value in range(5):
            client.metric("rows", value)
        assert client.flush_metrics_buffer() is True
        assert values(sink) == [0.0, 1.0, 2.0, 3.0, 4.0]

    def test_errors_are_not_buffered(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, clock=ManualClock())
        client.error(exception=ValueError("boom"))
        assert len(sink.lines("error")) == 1

    def test_the_interval_applies_again_after_the_worker_was_idle(self, make_client):
        # Real time on purpose: a ManualClock wakes every waiter on advance() and would hide a
        # worker that nobody woke when a record arrived in an empty buffer.
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=0.2)
        client.metric("rows", 1)
        assert client.flush(timeout=10) is True  # the worker now waits with nothing to do
        client.metric("rows", 2)
        assert sink.wait_for("metric", 2, timeout=5)

    def test_a_buffer_smaller_than_a_batch_is_sent_before_it_overflows(self, make_client):
        sink = MemorySink()  # batches of 10,000 lines
        client = make_client(
            sink=sink, buffer_metrics=True, max_buffer_records=100, clock=ManualClock()
        )
        for value in range(100):
            client.metric("rows", value)
        assert sink.wait_for("metric", 100, timeout=5)
        assert client.stats()["dropped"] == {}

    def test_block_gets_room_from_a_healthy_sink_when_the_buffer_is_smaller_than_a_batch(
        self, make_client
    ):
        sink = MemorySink()
        client = make_client(
            sink=sink, buffer_metrics=True, max_buffer_records=100, on_full="block",
            block_timeout=1.0, flush_interval=3600.0,
        )
        for value in range(300):
            _, elapsed = timed(lambda v=value: client.metric("rows", v))
            assert elapsed < 0.9, f"record {value} waited for room as long as block_timeout"
        assert client.stats()["dropped"] == {}
        assert client.flush(timeout=10) is True
        assert values(sink) == [float(v) for v in range(300)]


# -- a full buffer ----------------------------------------------------------------


def stalled(make_client, gate_sink, **options: Any) -> tuple[DXTrack, GateSink]:
    """An async client whose worker holds record 0 inside a send that does not return."""
    sink = gate_sink()
    client = make_client(sink=sink, use_async_requests=True, **options)
    client.metric("rows", 0)
    assert sink.entered.wait(10)
    return client, sink


class TestOnFull:
    """With a stalled sink the buffer stays within its bounds and every drop is counted."""

    def test_drop_newest_keeps_the_oldest(self, make_client, gate_sink, caplog):
        client, sink = stalled(make_client, gate_sink, max_buffer_records=100)
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            for value in range(1, 301):
                client.metric("rows", value)
        stats = client.stats()
        assert stats["dropped"] == {"buffer_full": 200}
        assert (stats["enqueued"], stats["pending"]) == (101, 101)
        full_warnings = [r for r in caplog.records if "buffer is full" in r.getMessage()]
        assert len(full_warnings) == 1  # rate-limited, not one per record
        sink.release()
        assert client.flush(timeout=10) is False  # 200 records recorded before it never went out
        assert values(sink) == [float(v) for v in range(101)]

    def test_drop_oldest_keeps_the_newest(self, make_client, gate_sink):
        client, sink = stalled(
            make_client, gate_sink, max_buffer_records=100, on_full="drop_oldest"
        )
        for value in range(1, 301):
            client.metric("rows", value)
        stats = client.stats()
        assert stats["dropped"] == {"evicted": 200}
        assert (stats["enqueued"], stats["pending"]) == (301, 101)
        sink.release()
        assert client.flush(timeout=10) is False
        assert values(sink) == [0.0] + [float(v) for v in range(201, 301)]

    def test_block_waits_block_timeout_then_drops_the_newest(self, make_client, gate_sink):
        client, sink = stalled(
            make_client, gate_sink, max_buffer_records=100, on_full="block", block_timeout=0.5
        )
        _, elapsed = timed(lambda: [client.metric("rows", v) for v in range(1, 101)])
        assert elapsed < 0.4  # room for all of them: nobody waited
        for value in (101, 102):
            _, elapsed = timed(lambda v=value: client.metric("rows", v))
            assert 0.5 <= elapsed < 1.5
        assert client.stats()["dropped"] == {"buffer_full": 2}
        assert client.stats()["pending"] == 101
        sink.release()
        assert client.flush(timeout=10) is False
        assert values(sink) == [float(v) for v in range(101)]

    def test_block_goes_on_as_soon_as_there_is_room(self, make_client, gate_sink):
        clock = ObservedClock()
        client, sink = stalled(
            make_client, gate_sink, max_buffer_records=100, on_full="block", block_timeout=30.0,
            clock=clock,
        )
        for value in range(1, 101):
            client.metric("rows", value)
        caller = in_thread(lambda: client.metric("rows", 101), name="blocked-caller")
        assert eventually(lambda: "blocked-caller" in clock.waiting)
        assert caller.is_alive()
        sink.release()
        caller.join(10)
        assert not caller.is_alive()
        assert client.flush(timeout=10) is True
        assert values(sink) == [float(v) for v in range(102)]
        assert client.stats()["dropped"] == {}

    @pytest.mark.parametrize("on_full", ["drop_newest", "drop_oldest", "block"])
    def test_bytes_stay_within_max_buffer_bytes(self, make_client, gate_sink, on_full):
        max_bytes = 1_024_000  # the smallest allowed: one Firehose record
        client, sink = stalled(
            make_client, gate_sink, max_buffer_bytes=max_bytes, on_full=on_full, block_timeout=0.05
        )
        metadata = {"pad": "x" * 100_000}
        size = len(RecordBuilder(client.config).metric("big", 1, metadata, 1.7e9))
        fits = max_bytes // size
        for _ in range(30):
            client.metric("big", 1, metadata, timestamp=1.7e9)
        stats = client.stats()
        assert stats["buffered_bytes"] == fits * size <= max_bytes
        assert stats["pending"] == 1 + fits
        reason = "evicted" if on_full == "drop_oldest" else "buffer_full"
        assert stats["dropped"] == {reason: 30 - fits}


# -- sinks that fail ------------------------------------------------------------------


class TestFailingSinks:
    """A sink that raises or hangs never stops the application, and every deadline holds."""

    def test_a_raising_sink(self, make_client):
        sink = RaisingSink()
        client = make_client(sink=sink, use_async_requests=True)
        _, elapsed = timed(lambda: [client.metric("rows", v) for v in range(1000)])
        assert elapsed < 1.0
        ok, elapsed = timed(lambda: client.flush(timeout=0.5))
        assert ok is False and 0.45 <= elapsed < 1.5
        assert len(sink.calls) >= 2  # it keeps trying...
        assert len({call.thread for call in sink.calls}) == 1  # ...on the same, living worker
        assert sink.calls[0].thread.is_alive()
        ok, elapsed = timed(lambda: client.close(timeout=0.3))
        assert ok is False and 0.25 <= elapsed < 1.5

    def test_a_hanging_sink(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, use_async_requests=True)
        for value in range(100):
            client.metric("rows", value)
        assert sink.entered.wait(10)
        ok, elapsed = timed(lambda: client.flush(timeout=0.3))
        assert ok is False and 0.25 <= elapsed < 1.5
        ok, elapsed = timed(lambda: client.close(timeout=0.3))
        assert ok is False and 0.25 <= elapsed < 1.5
        assert sink.closed is False  # the worker still holds it: not closed under its feet

    def test_the_worker_survives_an_exception(self, make_client):
        sink = FlakySink(failures=1, how="raise")
        client = make_client(sink=sink)
        client.metric("rows", 1)  # its attempt failed: the caller stopped waiting, not the retry
        assert client.flush(timeout=10)
        assert values(sink) == [1.0]
        client.metric("rows", 2)
        assert values(sink) == [1.0, 2.0]
        assert len({call.thread for call in sink.calls}) == 1
        assert client.stats()["retried"] == 1

    def test_a_dead_worker_is_replaced_by_the_next_call(self, make_client):
        sink = CrashingSink(crashes=1)
        client = make_client(sink=sink, sync_timeout=5)
        client.metric("rows", 1)  # kills the worker; its batch counts as failed
        assert client.stats()["failed"] == 1
        first_worker = sink.calls[0].thread
        client.metric("rows", 2)
        assert values(sink) == [2.0]  # delivered before the call returned: a new worker
        assert sink.calls[1].thread is not first_worker
        first_worker.join(10)
        assert not first_worker.is_alive()

    def test_a_dead_worker_is_replaced_by_a_flush(self, make_client):
        sink = CrashingSink(crashes=1)
        client = make_client(sink=sink, buffer_metrics=True, clock=ManualClock())
        client.metric("rows", 1)
        assert client.flush(timeout=10) is False
        sink.calls[0].thread.join(10)
        client.metric("rows", 2)  # buffered: only the flush will wake a worker
        assert client.flush(timeout=10) is True
        assert values(sink) == [2.0]


class TestRetries:
    """Lines the sink could not take are retried with capped backoff until retry_deadline."""

    def test_a_sink_that_fails_then_recovers_delivers_everything_once(self, make_client):
        sink = FlakySink(failures=3, how="raise")
        client = make_client(sink=sink, buffer_metrics=True)
        for value in range(10):
            client.metric("rows", value)
        assert client.flush(timeout=10) is True
        assert values(sink) == [float(v) for v in range(10)]
        assert len({r["id"] for r in sink.records("metric")}) == 10
        stats = client.stats()
        assert (stats["retried"], stats["delivered"], stats["failed"]) == (30, 10, 0)
        assert [call.lines for call in sink.calls] == [10, 10, 10, 10]

    def test_only_the_lines_the_sink_asks_for_are_sent_again(self, make_client):
        sink = FlakySink(failures=2, how="partial")
        client = make_client(sink=sink, buffer_metrics=True)
        for value in range(8):
            client.metric("rows", value)
        assert client.flush(timeout=10) is True
        assert [call.lines for call in sink.calls] == [8, 4, 2]
        assert values(sink) == [float(v) for v in range(8)]  # each once
        stats = client.stats()
        assert (stats["retried"], stats["delivered"], stats["batches"]) == (6, 8, 1)

    def test_lines_that_can_never_be_delivered_are_failed_at_once(self, make_client):
        sink = FlakySink(failures=1, how="failed")
        client = make_client(sink=sink, buffer_metrics=True)
        for value in range(4):
            client.metric("rows", value)
        assert client.flush(timeout=10) is False
        stats = client.stats()
        assert (stats["failed"], stats["retried"], stats["pending"]) == (4, 0, 0)
        assert len(sink.calls) == 1

    def test_past_retry_deadline_the_batch_counts_as_failed(self, make_client):
        sink = RaisingSink()
        client = make_client(sink=sink, buffer_metrics=True, retry_deadline=0.3)
        for value in range(5):
            client.metric("rows", value)
        ok, elapsed = timed(lambda: client.flush(timeout=10))
        assert ok is False and elapsed < 2.0
        stats = client.stats()
        assert (stats["failed"], stats["delivered"], stats["pending"]) == (5, 0, 0)
        assert len(sink.calls) >= 2

    def test_backoff_doubles_and_is_not_cut_short(self, make_client):
        clock = ManualClock()
        sink = RaisingSink(clock=clock.monotonic)
        no_jitter = RetryPolicy(jitter=lambda ceiling: ceiling)
        client = make_client(sink=sink, use_async_requests=True, clock=clock, retry=no_jitter)
        client.metric("rows", 1)
        # Time moves in small steps, with a moment of real time between them for the worker
        # to look at the clock; the sink notes the clock's time at every attempt.
        step, between_steps = 0.01, threading.Event()
        for _ in range(2000):
            if len(sink.calls) >= 5:
                break
            clock.advance(step)
            between_steps.wait(0.002)
        assert client.close(timeout=0) is False
        gaps = [later.at - earlier.at for earlier, later in zip(sink.calls, sink.calls[1:])]
        assert len(gaps) >= 4
        for gap, ceiling in zip(gaps, (0.1, 0.2, 0.4, 0.8)):
            assert ceiling - 1e-9 <= gap < ceiling + 0.25

    def test_close_wakes_a_worker_in_backoff(self, make_client):
        clock = ManualClock()  # backoff never ends by itself: only close() can end it
        sink = RaisingSink()
        client = make_client(sink=sink, use_async_requests=True, clock=clock)
        client.metric("rows", 1)
        assert sink.entered.wait(10)
        ok, elapsed = timed(lambda: client.close(timeout=0))
        assert ok is False and elapsed < 1.0
        worker = sink.calls[0].thread
        worker.join(5)
        assert not worker.is_alive()
        assert len(sink.calls) == 1  # no further attempt once stopped
        assert client.stats()["failed"] == 1

    def test_stop_ends_a_long_backoff(self):
        started = threading.Event()
        buffer = StreamBuffer(
            max_records=10, max_bytes=1_024_000, on_full="drop_newest", block_timeout=0,
            flush_interval=1.0, batch_lines=10, batch_bytes=1_000_000, clock=SystemClock(),
            start_worker=started.set,
        )
        sink = RaisingSink()
        worker = Worker(
            buffer, sink, retry_deadline=600, log=RateLimitedLog(),
            retry=RetryPolicy(backoff_base=300, backoff_cap=300),
        )
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        buffer.put("metric", b'{"value":1.0}', True)
        assert started.is_set(), "a buffer with no worker asks its pipeline for one"
        assert sink.entered.wait(10)
        buffer.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert buffer.snapshot()["failed"] == 1


# -- checkpoints -----------------------------------------------------------------------


class TestFlush:
    """flush_metrics_buffer(): both streams, from any thread, with an honest verdict."""

    def test_before_anything_was_recorded(self, make_client):
        assert DXTrack().flush_metrics_buffer() is True  # not even configured
        client = make_client(sink=MemorySink())
        assert client.flush_metrics_buffer() is True
        assert client.flush_metrics_buffer(timeout=0) is True
        assert client.flush is not None and client.flush(timeout=1) is True

    def test_sends_both_streams(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, use_async_requests=True)
        for value in range(3):
            client.metric("rows", value)
        client.errors([ValueError("a"), KeyError("b")])
        assert client.flush_metrics_buffer(timeout=10) is True
        assert len(sink.lines("metric")) == 3 and len(sink.lines("error")) == 2

    def test_from_many_threads_at_once(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, use_async_requests=True, buffer_metrics=True)
        start = threading.Barrier(8)
        verdicts: List[bool] = []

        def work(first: int) -> None:
            start.wait()
            verdicts.append(client.flush_metrics_buffer(timeout=30))
            for value in range(first, first + 1000):
                client.metric("rows", value)
                if value % 250 == 0:
                    verdicts.append(client.flush_metrics_buffer(timeout=30))
            verdicts.append(client.flush_metrics_buffer(timeout=30))

        threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(verdicts) == 8 * 6 and all(verdicts)
        assert values(sink) == [float(v) for v in range(8000)]

    def test_a_record_that_failed_before_the_flush_makes_it_false(self, make_client):
        sink = FlakySink(failures=1, how="failed")
        client = make_client(sink=sink)
        client.metric("rows", 1)  # default mode: settled (failed) when this returns
        assert client.stats()["failed"] == 1
        assert client.flush() is False
        assert client.flush() is True  # the loss was reported; nothing new since

    def test_true_again_after_a_drop_was_reported(self, make_client, gate_sink):
        client, sink = stalled(make_client, gate_sink, max_buffer_records=1)
        client.metric("rows", 1)
        client.metric("rows", 2)  # dropped
        sink.release()
        assert client.flush(timeout=10) is False
        assert client.flush(timeout=10) is True
        client.metric("rows", 3)
        assert client.flush(timeout=10) is True
        assert values(sink) == [0.0, 1.0, 3.0]

    def test_a_timed_out_flush_leaves_its_window_to_the_next(self, make_client, gate_sink):
        sink = gate_sink()
        client = make_client(sink=sink, use_async_requests=True, max_buffer_records=1)
        client.metric("rows", 0)
        assert sink.entered.wait(10)
        client.metric("rows", 1)
        client.metric("rows", 2)  # dropped
        assert client.flush(timeout=0.05) is False
        sink.release()
        assert client.flush(timeout=10) is False  # the drop still belongs to an unreported window
        assert client.flush(timeout=10) is True


class TestClose:
    """close(): flush, stop the worker, idempotent; afterwards records are refused."""

    def test_flushes_and_is_idempotent(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, clock=ManualClock())
        client.metric("rows", 1)
        assert client.close() is True
        assert values(sink) == [1.0] and sink.closed is True
        assert client.close() is True
        assert client.close(timeout=0) is True

    def test_a_failed_close_stays_failed_and_returns_at_once(self, make_client, gate_sink):
        client, sink = stalled(make_client, gate_sink)
        assert client.close(timeout=0.1) is False
        ok, elapsed = timed(lambda: client.close(timeout=5))
        assert ok is False and elapsed < 0.1

    def test_reports_what_was_left_in_one_log_line(self, make_client, gate_sink, caplog):
        client, sink = stalled(make_client, gate_sink)
        client.metric("rows", 1)
        with caplog.at_level(logging.ERROR, logger="dxtrack"):
            assert client.close(timeout=0.1) is False
        lines = [r.getMessage() for r in caplog.records if "closed with records" in r.getMessage()]
        assert len(lines) == 1 and "2 pending" in lines[0]

    def test_a_closed_client_refuses_records_with_a_warning(self, make_client, caplog):
        sink = MemorySink()
        client = make_client(sink=sink)
        client.close()
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            client.metric("rows", 1)
            client.error(exception=ValueError("late"))
            client.errors([KeyError("later")])
        assert sink.lines("metric") == [] and sink.lines("error") == []
        assert client.stats()["dropped"] == {"closed": 3}
        assert any("dxtrack was closed" in r.getMessage() for r in caplog.records)

    def test_concurrent_closes_agree(self, make_client):
        sink = MemorySink()
        client = make_client(sink=sink, use_async_requests=True)
        for value in range(1000):
            client.metric("rows", value)
        verdicts: List[bool] = []
        closers = [in_thread(lambda: verdicts.append(client.close(timeout=10))) for _ in range(4)]
        for closer in closers:
            closer.join(20)
        assert verdicts == [True] * 4
        assert len(sink.lines("metric")) == 1000


class TestStats:
    """stats() says what happened: enqueued, delivered, pending, dropped, failed, retried."""

    def test_counts(self, make_client, gate_sink):
        client, sink = stalled(make_client, gate_sink, max_buffer_records=5)
        for value in range(1, 8):
            client.metric("rows", value)  # 5 queued, 2 dropped
        client.errors([ValueError("a"), ValueError("b")])
        stats = client.stats()
        assert stats["enqueued"] == 8
        assert stats["pending"] == 8
        assert stats["dropped"] == {"buffer_full": 2}
        sink.release()
        client.flush(timeout=10)
        stats = client.stats()
        assert {k: stats[k] for k in ("enqueued", "delivered", "pending", "failed", "retried")} == {
            "enqueued": 8, "delivered": 8, "pending": 0, "failed": 0, "retried": 0,
        }
        assert stats["batches"] == len(sink.calls) == stats["sink_sends"]
        assert stats["dropped"] == {"buffer_full": 2}


class TestFairness:
    """A busy metric stream does not keep the error stream waiting."""

    def test_errors_are_not_queued_behind_every_metric_batch(self, make_client, gate_sink):
        sink = gate_sink(max_batch_lines=10)
        client = make_client(sink=sink, use_async_requests=True)
        client.metric("rows", 0)
        assert sink.entered.wait(10)
        for value in range(1, 41):
            client.metric("rows", value)
        client.error(exception=ValueError("urgent"))
        sink.release()
        assert client.flush(timeout=10) is True
        streams = [call.stream for call in sink.calls]
        assert streams.index("error") == 1, streams


class TestManualClock:
    """The test clock itself: a wait never misses time that moved before it began."""

    def test_a_wait_after_the_time_moved_returns_at_once(self):
        clock = ManualClock(max_real_wait=5.0)
        condition = threading.Condition()
        with condition:
            timeout = 1000.0 + 1.0 - clock.monotonic()
            mover = in_thread(lambda: clock.advance(2.0))
            mover.join(5)  # time moved between reading the clock and waiting on it
            _, elapsed = timed(lambda: clock.wait(condition, timeout))
        assert elapsed < 1.0

    def test_advance_wakes_a_waiter(self):
        clock = ManualClock(max_real_wait=30.0)
        condition = threading.Condition()
        woke: List[float] = []

        def waiter() -> None:
            with condition:
                deadline = clock.monotonic() + 100.0
                while clock.monotonic() < deadline:
                    clock.wait(condition, deadline - clock.monotonic())
                woke.append(clock.monotonic())

        thread = in_thread(waiter)
        clock.advance(150.0)  # before, during or after the waiter's first look: it must wake
        thread.join(5)
        assert woke == [1150.0]

    def test_a_wait_lasts_no_longer_than_its_timeout_in_real_seconds(self):
        clock = ManualClock(max_real_wait=30.0)
        condition = threading.Condition()
        with condition:
            clock.monotonic()
            _, elapsed = timed(lambda: clock.wait(condition, 0.05))
        assert elapsed < 5.0
        assert clock.monotonic() == 1000.0  # real time passing moves nothing


class TestCallsFromTheWorkerThread:
    """A sink (or a log handler it triggers) that calls dxtrack back never waits on itself."""

    def test_record_flush_and_close_from_inside_send(self, make_client: Any) -> None:
        seen: Dict[str, Any] = {}
        done = threading.Event()

        class CallingBack(MemorySink):
            def send(self, stream: str, lines: Any) -> Any:
                if stream == "metric" and "flush" not in seen:
                    started = time.monotonic()
                    client.metric("from.sink", 1)  # default mode: would wait sync_timeout
                    seen["flush"] = client.flush_metrics_buffer(timeout=30)
                    seen["seconds"] = time.monotonic() - started
                    done.set()
                return super().send(stream, lines)

        sink = CallingBack()
        client = make_client(sink=sink, sync_timeout=30)
        client.metric("rows", 1)
        assert done.wait(10)
        assert seen["flush"] is False  # it cannot wait for the batch it is sending
        assert seen["seconds"] < 5
        assert client.flush_metrics_buffer(timeout=10)
        assert sorted(r["metric_name"] for r in sink.records("metric")) == ["from.sink", "rows"]

    def test_close_from_inside_send_does_not_raise(self, make_client: Any) -> None:
        outcome: Dict[str, Any] = {}
        returned = threading.Event()

        class Closing(MemorySink):
            def send(self, stream: str, lines: Any) -> Any:
                try:
                    outcome["closed"] = client.close(timeout=1)
                except BaseException as exc:  # noqa: BLE001 - the test reports it
                    outcome["error"] = exc
                returned.set()
                return super().send(stream, lines)

        client = make_client(sink=Closing(), use_async_requests=True)
        client.metric("rows", 1)
        assert returned.wait(10)
        assert "error" not in outcome
        assert outcome.get("closed") is False
