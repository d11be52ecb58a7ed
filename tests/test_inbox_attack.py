"""The inbox (dxtrack/buffer.py's docstring) against what can happen between two of its steps.

Each race is made deterministic: a trace function stops the buffer's code at each of its
instructions in turn (as tests/test_reentrancy.py does) and there lets another, real thread
record, or raises KeyboardInterrupt where CPython runs a signal handler (right after a call
returns). A record whose metric() returned must then be delivered once, in its thread's
order, by the buffer's own timing rules (at once in async mode, at the interval in buffered
mode: no flush, put or stats() comes to fold it in), or be refused as closed; and stats()
must agree with what the sink got.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import types
from typing import Any, Callable, Iterator, List, Optional, Set

import pytest
from test_inbox import HANG, INTERVAL, make_buffer  # noqa: E402

from dxtrack import DXTrack, MemorySink
from dxtrack.buffer import CLOSED, IDLE, QUEUED, StreamBuffer
from dxtrack.records import METRIC


def body(n: int) -> bytes:
    return b'{"n":%d' % n


def code_of(*names: str) -> Set[types.CodeType]:
    return {getattr(StreamBuffer, name).__code__ for name in names if hasattr(StreamBuffer, name)}


from test_reentrancy import after_calls  # noqa: E402


class Stop:
    """A trace function that runs ``action`` once, at the ``n``-th watched instruction."""

    def __init__(self, code: Set[types.CodeType], n: int, action: Callable[[], None],
                 only_after_calls: bool = False) -> None:
        self.code, self.n, self.action = code, n, action
        self.only = {c: after_calls(c) for c in code} if only_after_calls else None
        self.seen = 0

    def __call__(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code not in self.code:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and (self.only is None or frame.f_lasti in self.only[frame.f_code]):
            self.seen += 1
            if self.seen == self.n:
                self.action()
        return self


def traced(stop: Stop, call: Callable[[], Any]) -> Any:
    sys.settrace(stop)
    try:
        return call()
    finally:
        sys.settrace(None)  # type: ignore[arg-type]


def each_instruction(code: Set[types.CodeType], run: Callable[[Stop], None],
                     only_after_calls: bool = False) -> Iterator[int]:
    """1, 2, ... up to the number of watched instructions one undisturbed run goes through."""
    dry = Stop(code, 0, lambda: None, only_after_calls)
    run(dry)
    assert dry.seen > 0, "the trace never reached the buffer's code"
    yield from range(1, dry.seen + 1)


class OtherThread:
    """Another thread calls ``call`` now; it is given a moment (it may need the lock the
    stopped thread holds, and then finishes once that is let go)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: List[Any] = []
        self.thread = threading.Thread(target=lambda: self.result.append(call()), daemon=True)
        self.thread.start()
        self.thread.join(0.05)

    def value(self) -> Any:
        self.thread.join(HANG)
        assert self.result, "the other thread never finished"
        return self.result[0]


def sent_by_the_rules(buffer: StreamBuffer, urgent: bool) -> List[bytes]:
    """What the worker sends from here with nobody else taking the lock: at once in async
    mode, once the interval passed in buffered mode."""
    sent: List[bytes] = []
    for _ in range(3):
        if not urgent:
            buffer.clock.advance(INTERVAL * 1.2)  # type: ignore[attr-defined]
        batch = buffer.take(idle=0)
        if batch is None or batch is IDLE:
            continue
        stream, bodies, first = batch
        buffer.settle(stream, first, len(bodies), 0)
        sent += bodies
    return sent


TAKE_CODE = code_of("take", "_fold_inboxes", "_fold_inbox", "_set_room", "_take_batch",
                    "_revoke")
CLOSE_CODE = code_of("close", "_close", "_fold_inboxes", "_fold_inbox", "_set_room", "_revoke",
                     "_fold", "_accept")
FOLD_CODE = code_of("put", "_accept", "_fold_inbox", "_fold_inboxes", "request_flush",
                    "snapshot")


class TestAnotherThreadRecordsDuringTheWorkersTake:
    @pytest.mark.parametrize("who", ["another-thread", "the-worker"])
    @pytest.mark.parametrize("urgent", [False, True], ids=["buffered", "async"])
    def test_at_every_instruction_of_the_take(self, urgent: bool, who: str) -> None:
        """A record offered while the worker is between its fold and its cut of the batch
        (by another thread, or by a __del__ the garbage collector runs on the worker) was
        told QUEUED and stayed in the inbox behind an empty queue: in async mode, the
        worker's next take folded it in as a record that waits for the interval."""
        for n in each_instruction(TAKE_CODE,
                                  lambda stop: self._scenario(stop, None, urgent, who)):
            self._scenario(Stop(TAKE_CODE, n, lambda: None), n, urgent, who)

    @staticmethod
    def _scenario(stop: Stop, n: Optional[int], urgent: bool, who: str) -> None:
        buffer = make_buffer(urgent)
        buffer.offer(body(0))  # the locked put: the queue is not empty, the inbox opens
        assert buffer.offer(body(1)) == QUEUED
        if not urgent:
            buffer.clock.advance(INTERVAL * 1.2)  # type: ignore[attr-defined]
        holder: List[OtherThread] = []
        mine: List[int] = []
        if n is not None and who == "another-thread":
            stop.action = lambda: holder.append(OtherThread(lambda: buffer.offer(body(2))))
        elif n is not None:
            stop.action = lambda: mine.append(buffer.offer(body(2)))
        batch = traced(stop, lambda: buffer.take(idle=0))
        assert batch is not None and batch is not IDLE
        result = holder[0].value() if holder else mine[0] if mine else None
        stream, bodies, first = batch
        buffer.settle(stream, first, len(bodies), 0)
        sent = bodies + sent_by_the_rules(buffer, urgent)
        expected = [body(0), body(1)] + ([] if result is None else [body(2)])
        assert sent == expected, (f"instruction {n}: offer() said {result}; sent {sent}, "
                                  f"left in the inbox {list(buffer._metric.inbox)}")
        stats = buffer.snapshot()
        assert (stats["enqueued"], stats["delivered"], stats["pending"]) == (
            len(expected), len(expected), 0)


class TestAnotherThreadRecordsDuringClose:
    def test_at_every_instruction_of_close(self) -> None:
        """A record offered while close() is between its fold and its revoke was told QUEUED
        and stayed in the inbox of a closed buffer: never delivered, never refused."""
        for n in each_instruction(CLOSE_CODE, lambda stop: self._scenario(stop, None)):
            self._scenario(Stop(CLOSE_CODE, n, lambda: None), n)

    @staticmethod
    def _scenario(stop: Stop, n: Optional[int]) -> None:
        buffer = make_buffer()
        buffer.offer(body(0))
        assert buffer.offer(body(1)) == QUEUED
        holder: List[OtherThread] = []
        if n is not None:
            stop.action = lambda: holder.append(OtherThread(lambda: buffer.offer(body(2))))
        traced(stop, buffer.close)
        result = holder[0].value() if holder else None
        sent: List[bytes] = []
        while True:  # the worker drains a closed buffer
            batch = buffer.take(idle=0)
            if batch is None or batch is IDLE:
                break
            stream, bodies, first = batch
            buffer.settle(stream, first, len(bodies), 0)
            sent += bodies
        expected = [body(0), body(1)] + ([] if result in (None, CLOSED) else [body(2)])
        assert sent == expected, (f"instruction {n}: offer() said {result}; sent {sent}, "
                                  f"left in the inbox {list(buffer._metric.inbox)}")
        assert not buffer._metric.inbox
        stats = buffer.snapshot()
        assert (stats["enqueued"], stats["pending"]) == (len(expected), 0)

    def test_a_client_closed_while_a_thread_records(self) -> None:
        """The same through DXTrack: a thread that read the client's state before close()
        records; its metric is delivered or refused as closed (counted, logged), and
        nothing is left pending."""
        code = code_of("_close", "_fold_inboxes", "_fold_inbox", "_set_room", "_revoke")

        def record(client: DXTrack, state: Any, name: str, value: int) -> None:
            """DXTrack.metric() on a state read before close() took it away."""
            builder, pipeline = state
            body = builder.metric(name, value, None, None)
            seq = pipeline.offer(body)
            if seq <= 0 or pipeline.metric_waits:
                client._submit(pipeline, METRIC, [body], seqs=[seq])

        def scenario(stop: Stop, n: Optional[int]) -> None:
            sink = MemorySink()
            client = DXTrack()
            client.configure(stage="test", context="c", run_id="r", sink=sink,
                             buffer_metrics=True, flush_interval=INTERVAL)
            state = client._state
            buffer = state[1].buffer  # type: ignore[index]
            holder: List[OtherThread] = []
            original = buffer._close

            def close() -> None:  # watch the buffer's close(), not the flush before it
                buffer._close = original  # type: ignore[method-assign]  # stop() closes too
                record(client, state, "queued", 1)  # the queue is not empty: the inbox opens
                record(client, state, "inbox", 2)
                sys.settrace(stop)
                try:
                    original()
                finally:
                    sys.settrace(None)  # type: ignore[arg-type]

            client.metric("before", 0)
            buffer._close = close  # type: ignore[method-assign]
            if n is not None:
                stop.action = lambda: holder.append(
                    OtherThread(lambda: record(client, state, "raced", 3)))
            assert client.close(timeout=5)
            if holder:
                holder[0].value()
            stats = client.stats()
            names = [r["metric_name"] for r in sink.records("metric")]
            refused = stats["dropped"].get("closed", 0)
            assert names[:3] == ["before", "queued", "inbox"], f"instruction {n}: {names}"
            assert len(names) - 3 + refused == (1 if holder else 0), (
                f"instruction {n}: delivered {names}, refused {refused}, stats {stats}")
            assert stats["pending"] == 0, f"instruction {n}: {stats}"

        for n in each_instruction(code, lambda stop: scenario(stop, None)):
            scenario(Stop(code, n, lambda: None), n)


class TestKeyboardInterruptWhileFolding:
    """Ctrl-C lands right after a call returns. While the inbox is folded in, that was after
    popleft() and before the append (a record gone), and before the counters (enqueued
    behind the queue: later flushes said True before their records were sent)."""

    @pytest.mark.parametrize("operation", ["flush", "stats", "long-metric"])
    def test_after_every_call(self, operation: str) -> None:
        def scenario(stop: Stop) -> None:
            sink = MemorySink()
            client = DXTrack()
            client.configure(stage="test", context="c", run_id="r", sink=sink,
                             buffer_metrics=True, flush_interval=INTERVAL)
            for n in range(20):  # one locked put, then the inbox
                client.metric("m", n)
            call = {"flush": lambda: client.flush(timeout=5), "stats": client.stats,
                    "long-metric": lambda: client.metric("m", 20, {"pad": "x" * 3000})}
            interrupted = False
            try:
                traced(stop, call[operation])
            except KeyboardInterrupt:
                interrupted = True
            for n in range(21, 25):  # metric() goes on; a flush is judged on what it sent
                client.metric("m", n)
            assert client.flush(timeout=5)
            flushed = [int(r["value"]) for r in sink.records("metric")]
            stats = client.stats()
            assert client.close(timeout=5)
            values = [int(r["value"]) for r in sink.records("metric")]
            expected = list(range(25))
            if operation != "long-metric" or (interrupted and 20 not in values):
                expected.remove(20)  # not recorded, or its own call raised: at most once
            assert values == expected, f"instruction {stop.n}: {values}"
            assert flushed == values, f"instruction {stop.n}: the flush said True early"
            assert (stats["enqueued"], stats["delivered"], stats["pending"]) == (
                len(values), len(values), 0), f"instruction {stop.n}: {stats}"

        def interrupt() -> None:
            raise KeyboardInterrupt

        for n in each_instruction(FOLD_CODE, scenario, only_after_calls=True):
            scenario(Stop(FOLD_CODE, n, interrupt, only_after_calls=True))

    @pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
    def test_a_real_sigalrm_that_raises(self) -> None:
        """A SIGALRM handler raising KeyboardInterrupt while the main thread records in
        buffered mode: every metric() that returned is delivered once, stats() agree."""
        if threading.current_thread() is not threading.main_thread():
            pytest.skip("signals need the main thread")
        sink = MemorySink()
        client = DXTrack()
        client.configure(stage="test", context="c", run_id="r", sink=sink, buffer_metrics=True,
                         flush_interval=INTERVAL, max_buffer_records=1_000_000)

        def on_alarm(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, on_alarm)
        returned: Set[int] = set()
        n = 0
        try:
            for attempt in range(300):
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0.0002 + (attempt % 13) * 0.00005)
                    while True:
                        client.metric("m", n)
                        returned.add(n)
                        n += 1
                except KeyboardInterrupt:
                    n += 1
                while True:
                    try:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        break
                    except KeyboardInterrupt:
                        pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert client.flush(timeout=30)
        stats = client.stats()
        client.close(timeout=10)
        counts = collections.Counter(int(r["value"]) for r in sink.records("metric"))
        assert not [v for v in returned if counts[v] != 1], "records lost or duplicated"
        assert max(counts.values()) == 1
        delivered = sum(counts.values())
        assert (stats["enqueued"], stats["delivered"], stats["pending"]) == (
            delivered, delivered, 0)


class TestTakingARecordBack:
    def test_an_equal_body_of_another_thread_keeps_its_place(self) -> None:
        """A caller whose append crossed a take takes back its own body, not an equal one
        another thread queued since (a copy with the same name, value and timestamp):
        that one would move behind the other thread's later records."""
        buffer = make_buffer()
        buffer.offer(body(0))
        results: List[Any] = []

        class Interleaved(collections.deque):
            step: Optional[Callable[[], None]] = None

            def append(self, item: bytes) -> None:
                step, self.step = self.step, None
                if step is not None:
                    step()
                super().append(item)

        def others() -> None:
            buffer.request_flush()
            batch = buffer.take(idle=0)  # the worker takes body 0: gen moves
            assert batch is not None and batch is not IDLE
            buffer.settle(batch[0], batch[2], len(batch[1]), 0)
            buffer.put(METRIC, body(1), False)  # the inbox opens again
            results.append(buffer.offer(body(7)))  # thread B: 7, then 8
            results.append(buffer.offer(body(8)))

        inbox = Interleaved()
        inbox.step = others
        buffer._metric.inbox = inbox
        buffer.offer(body(7))  # thread A checked room before the take; appends after it
        assert results == [QUEUED, QUEUED]
        buffer.request_flush()
        batch = buffer.take(idle=0)
        assert batch is not None and batch is not IDLE
        sent = batch[1]
        assert sent.count(body(7)) == 2
        assert sent.index(body(7)) < sent.index(body(8)), f"B's 7 went after its 8: {sent}"


class TestKeyboardInterruptAfterTheAppend:
    @pytest.mark.parametrize("urgent", [False, True], ids=["buffered", "async"])
    def test_after_an_append_that_crossed_a_take(self, urgent: bool) -> None:
        """Ctrl-C lands right after the append, before the caller looks at gen again: a take
        had emptied the queue, so the record waited in the inbox for the next put or flush."""
        buffer = make_buffer(urgent)
        buffer.offer(body(0))
        first: List[List[bytes]] = []

        class Interrupted(collections.deque):
            armed = True

            def append(self, item: bytes) -> None:
                if not self.armed:
                    return super().append(item)
                self.armed = False
                buffer.request_flush()
                batch = buffer.take(idle=0)
                assert batch is not None and batch is not IDLE
                buffer.settle(batch[0], batch[2], len(batch[1]), 0)
                first.append(batch[1])
                super().append(item)
                raise KeyboardInterrupt  # as the append returns

        buffer._metric.inbox = Interrupted()
        with pytest.raises(KeyboardInterrupt):
            buffer.offer(body(1))
        assert first == [[body(0)]]
        # The worker, back from sending body 0, may wait already: with an empty queue, no
        # due time and nobody to wake it, it would not fold the inbox in.
        assert not buffer._metric.inbox, "left in the inbox behind an empty queue"
        sent = sent_by_the_rules(buffer, urgent)
        assert sent in ([], [body(1)])  # its call raised: at most once, and then by the rules
        stats = buffer.snapshot()
        assert stats["pending"] == 0


class TestAFlushFromASignalHandler:
    def test_that_interrupted_a_put_does_not_let_go_of_the_lock(self) -> None:
        """A signal handler that flushes, run where a put() is half way through its change
        (_busy set, the lock held): its wait let go of the lock, so another thread's put
        found _busy set and went to the side queue (DEFERRED, as if it interrupted itself),
        and that thread's next metric, through the inbox, was sent before it."""
        code = code_of("put", "_accept", "_fold_inbox")

        def scenario(stop: Stop) -> None:
            sink = MemorySink()
            client = DXTrack()
            client.configure(stage="test", context="c", run_id="r", sink=sink,
                             buffer_metrics=True, flush_interval=INTERVAL)
            client.metric("m", 0)
            client.metric("m", 1)  # in the inbox: the next put folds it in

            def other() -> None:
                client.metric("x", 1, {"pad": "y" * 3000})  # the locked path
                client.metric("x", 2)  # the inbox, while it has room

            holder: List[OtherThread] = []

            def handler() -> None:
                holder.append(OtherThread(other))
                client.flush(timeout=0.5)

            stop.action = handler
            traced(stop, lambda: client.metric("m", 2, {"pad": "z" * 3000}))
            if holder:
                holder[0].value()
            assert client.close(timeout=5)
            sent = [(r["metric_name"], int(r["value"])) for r in sink.records("metric")]
            assert [v for name, v in sent if name == "m"] == [0, 1, 2], sent
            assert [v for name, v in sent if name == "x"] == ([1, 2] if holder else []), (
                f"instruction {stop.n}: {sent}")

        for n in each_instruction(code, scenario, only_after_calls=True):
            scenario(Stop(code, n, lambda: None, only_after_calls=True))
