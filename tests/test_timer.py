"""dxtrack.timer(): elapsed seconds as a metric, from a block or a function."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from typing import Any, Callable, List, Tuple

import pytest

from dxtrack import DXTrack, MemorySink
from dxtrack.clock import ManualClock

MakeClient = Callable[..., DXTrack]


@pytest.fixture
def timed(make_client: MakeClient) -> Tuple[DXTrack, MemorySink, ManualClock]:
    """A synchronous client on a manual clock: durations are exactly what a test advances."""
    sink, clock = MemorySink(), ManualClock()
    return make_client(sink=sink, clock=clock, default_metadata={"host": "w3"}), sink, clock


class TestTimingABlock:
    """``with client.timer(name):`` records the seconds the block took."""

    def test_records_the_elapsed_seconds_with_metadata(self, timed: Any) -> None:
        client, sink, clock = timed
        with client.timer("scrape.seconds", metadata={"shop": "a"}) as timer:
            clock.advance(2.25)
        (record,) = sink.records("metric")
        assert (record["metric_name"], record["value"]) == ("scrape.seconds", 2.25)
        assert record["metadata"] == {"host": "w3", "shop": "a"}
        assert timer.elapsed == 2.25

    def test_records_when_the_block_raises_and_lets_the_exception_through(
        self, timed: Any
    ) -> None:
        client, sink, clock = timed
        with pytest.raises(KeyError, match="missing"):
            with client.timer("scrape.seconds"):
                clock.advance(1.5)
                raise KeyError("missing")
        assert [r["value"] for r in sink.records("metric")] == [1.5]

    def test_one_timer_nests_and_repeats(self, timed: Any) -> None:
        client, sink, clock = timed
        timer = client.timer("step.seconds")
        with timer:
            clock.advance(1)
            with timer:
                clock.advance(2)
            clock.advance(3)
        with timer:
            clock.advance(4)
        assert [r["value"] for r in sink.records("metric")] == [2.0, 6.0, 4.0]

    def test_concurrent_blocks_in_threads_keep_their_own_start(self, timed: Any) -> None:
        """A enters at 0, B at 10, A leaves at 11, B at 15: 11 and 5 seconds."""
        client, sink, clock = timed
        timer = client.timer("overlap.seconds")
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        def a() -> None:
            with timer:
                a_in.set()
                b_in.wait(10)
                clock.advance(1)
            a_out.set()

        def b() -> None:
            a_in.wait(10)
            clock.advance(10)
            with timer:
                b_in.set()
                a_out.wait(10)
                clock.advance(4)

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert [r["value"] for r in sink.records("metric")] == [11.0, 5.0]

    def test_overlapping_asyncio_tasks_keep_their_own_start(self, timed: Any) -> None:
        """One timer, two tasks on one thread: A 0-3 s, B 2-5 s."""
        client, sink, clock = timed
        timer = client.timer("fetch.seconds")

        async def main() -> None:
            b_started, a_done = asyncio.Event(), asyncio.Event()

            async def a() -> None:
                with timer:
                    clock.advance(2)
                    await b_started.wait()
                    clock.advance(1)
                a_done.set()

            async def b() -> None:
                await asyncio.sleep(0)
                with timer:
                    b_started.set()
                    await a_done.wait()
                    clock.advance(2)

            await asyncio.gather(a(), b())

        asyncio.run(main())
        assert [r["value"] for r in sink.records("metric")] == [3.0, 3.0]

    def test_a_block_that_ends_in_another_context_raises_nothing(
        self, timed: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each step of a generator run in a thread pool gets a fresh copy of the context."""
        client, sink, _ = timed
        timer = client.timer("step.seconds")
        contextvars.copy_context().run(timer.__enter__)
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            timer.__exit__(None, None, None)
        assert sink.records("metric") == []
        assert "ended in another context" in caplog.text

    def test_the_clock_is_monotonic(self, make_client: MakeClient) -> None:
        """A change of the wall clock never shows up as a duration."""
        client = make_client(sink=MemorySink())
        assert client.timer("quick.seconds")._clock is time.monotonic

    def test_metadata_is_taken_as_it_is_at_timer(self, timed: Any) -> None:
        client, sink, clock = timed
        metadata = {"shop": "a"}
        timer = client.timer("scrape.seconds", metadata=metadata)
        metadata["shop"] = "changed later"
        with timer:
            clock.advance(1)
        assert sink.records("metric")[0]["metadata"]["shop"] == "a"

    def test_a_metric_that_cannot_be_recorded_never_hides_the_blocks_exception(
        self, timed: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        client, sink, clock = timed
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            with pytest.raises(KeyError, match="the block's own"):
                with client.timer("big.seconds", metadata={"blob": "x" * 1_100_000}):
                    raise KeyError("the block's own")
        assert sink.records("metric") == []
        assert "dxtrack.timer('big.seconds') could not record its metric" in caplog.text


class TestTimingAFunction:
    """``@client.timer(name)`` records each call."""

    def test_each_call_is_recorded_and_the_result_returned(self, timed: Any) -> None:
        client, sink, clock = timed

        @client.timer("export.seconds", metadata={"kind": "daily"})
        def export(rows: int) -> int:
            clock.advance(rows / 10)
            return rows * 2

        assert export(5) == 10 and export(20) == 40
        assert export.__name__ == "export"
        records = sink.records("metric")
        assert [r["value"] for r in records] == [0.5, 2.0]
        assert {r["metadata"]["kind"] for r in records} == {"daily"}

    def test_a_raising_call_is_recorded_and_reraised(self, timed: Any) -> None:
        client, sink, clock = timed

        @client.timer("load.seconds")
        def load() -> None:
            clock.advance(3)
            raise OSError("disk")

        with pytest.raises(OSError, match="disk"):
            load()
        assert [r["value"] for r in sink.records("metric")] == [3.0]

    def test_coroutine_functions_are_timed_when_awaited(self, timed: Any) -> None:
        client, sink, clock = timed

        @client.timer("fetch.seconds")
        async def fetch() -> str:
            await asyncio.sleep(0)
            clock.advance(0.75)
            return "page"

        assert asyncio.iscoroutinefunction(fetch)
        assert asyncio.run(fetch()) == "page"
        assert [r["value"] for r in sink.records("metric")] == [0.75]


class TestBadArguments:
    """Bad arguments fail at timer(), not when the block ends."""

    @pytest.mark.parametrize("name", ["", None, 3])
    def test_bad_name(self, timed: Any, name: Any) -> None:
        client, sink, _ = timed
        with pytest.raises(ValueError, match="metric name"):
            client.timer(name)

    def test_bad_metadata(self, timed: Any) -> None:
        client, _, _ = timed
        with pytest.raises(TypeError, match="metadata must be a dict"):
            client.timer("x.seconds", metadata=["shop"])  # type: ignore[arg-type]

    def test_generator_functions_are_refused(self, timed: Any) -> None:
        client, _, _ = timed

        def rows() -> Any:
            yield 1

        async def pages() -> Any:
            yield 1

        for func in (rows, pages):
            with pytest.raises(TypeError, match="generator function"):
                client.timer("x.seconds")(func)

    def test_ready_made_client_has_it(self) -> None:
        from dxtrack import dxtrack

        names: List[str] = [dxtrack.timer("a").name]
        assert names == ["a"]
