"""Recording is safe from code that interrupts dxtrack itself, and from Ctrl-C.

A signal handler, a ``__del__`` or a weakref callback can run in the middle
of ``metric()`` on the same thread, and may record too; a ``KeyboardInterrupt``
can land between any two calls. These tests interrupt dxtrack's own code
deterministically: a trace function stops the buffer's code at each of its
instructions in turn and does there what such code would do. Every scenario
runs in a thread with a bounded join, so a deadlock fails the test instead of
hanging it.
"""

from __future__ import annotations

import dis
import functools
import sys
import threading
import time
import types
import weakref
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import pytest

from dxtrack import DXTrack, MemorySink
from dxtrack.buffer import StreamBuffer
from dxtrack.clock import SystemClock


def _code(*names: str) -> Set[types.CodeType]:
    return {getattr(StreamBuffer, name).__code__ for name in names if hasattr(StreamBuffer, name)}


#: The buffer's code that runs while its lock is held, on the caller's side and the worker's.
CALLER_CODE = _code("offer", "_raced", "put", "_accept", "_fold", "_fold_inbox", "_fold_inboxes",
                    "_make_room")
WORKER_CODE = _code("take", "_fold_inboxes", "_take_batch", "settle")

HANG = 20.0  # seconds after which a scenario counts as deadlocked


def within(seconds: float, target: Callable[[], Any]) -> Any:
    """Run ``target`` in a daemon thread; fail the test if it does not end in time."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", target()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlocked: the scenario did not end"
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


def after_calls(code: types.CodeType) -> Set[int]:
    """Offsets where CPython may run a signal handler: right after each call returns."""
    offsets = set()
    previous = None
    for instruction in dis.get_instructions(code):
        if previous is not None and previous.opname.startswith("CALL"):
            offsets.add(instruction.offset)
        previous = instruction
    return offsets


class Interrupter:
    """A trace function that acts once, at the ``n``-th instruction of the watched code."""

    def __init__(
        self, code: Set[types.CodeType], n: int, action: Callable[[], None],
        only: Optional[Callable[[types.CodeType, int], bool]] = None,
    ) -> None:
        self.code, self.n, self.action, self.only = code, n, action, only
        self.seen = 0
        self.fired = False
        self.armed = True

    def __call__(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code not in self.code or not self.armed:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and not self.fired and (
            self.only is None or self.only(frame.f_code, frame.f_lasti)
        ):
            self.seen += 1
            if self.seen == self.n:
                self.fired = True
                self.action()
        return self


def points(code: Set[types.CodeType], scenario: Callable[[Interrupter], None],
           only: Any = None) -> Iterator[int]:
    """1, 2, ... up to the number of watched instructions the scenario runs through."""
    dry = Interrupter(code, 0, lambda: None, only)
    scenario(dry)
    assert dry.seen > 0, "the trace never reached the buffer's code"
    yield from range(1, dry.seen + 1)


def at_each_point(
    code: Set[types.CodeType], scenario: Callable[..., None], make: Callable[[], DXTrack],
    act: Callable[[DXTrack], None], only: Any = None,
) -> Iterator[Tuple[int, DXTrack]]:
    """Run ``scenario`` once per watched instruction, doing ``act`` at that one."""
    for n in points(code, scenario, only):
        client = make()
        tracer = Interrupter(code, n, functools.partial(act, client), only)
        within(HANG, functools.partial(scenario, tracer, client))
        assert tracer.fired
        yield n, client


def record_inner(client: DXTrack) -> None:
    client.metric("inner", 1)


def worker_waits_again(client: DXTrack) -> None:
    """Return once the client's worker waits for work again: its lock is free (the wait let go
    of it) and it said it is idle. A flush returns as the worker settles, before the worker's
    last steps, which a busy machine would otherwise let the caller cut at any instruction."""
    buffer = client._state[1].buffer
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        with buffer._lock:
            if buffer._worker_idle:
                return
        time.sleep(0.001)
    raise AssertionError("the worker never waited again")


def interrupt(client: DXTrack) -> None:
    raise KeyboardInterrupt


@pytest.fixture(params=["default", "async", "buffered"])
def mode(request: pytest.FixtureRequest) -> dict:
    return {"default": {}, "async": {"use_async_requests": True},
            "buffered": {"buffer_metrics": True}}[request.param]


_sinks: weakref.WeakKeyDictionary[DXTrack, MemorySink] = weakref.WeakKeyDictionary()


def new_client(**options: Any) -> DXTrack:
    client = DXTrack()
    _sinks[client] = MemorySink()
    client.configure(stage="test", context="c", run_id="r", sink=_sinks[client], **options)
    return client


def names(client: DXTrack) -> List[str]:
    """What reached the client's sink (it stays readable after close())."""
    return sorted(record["metric_name"] for record in _sinks[client].records("metric"))


class TestRecordingFromInterruptingCode:
    """metric() called by code that interrupted metric() or the worker on the same thread."""

    def test_from_every_instruction_of_the_callers_append(self, mode: dict) -> None:
        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or new_client(**mode)
            client.metric("warm-up", 0)  # the worker runs; the trace watches what follows
            worker_waits_again(client)  # every run starts from the same state
            sys.settrace(tracer)
            try:
                client.metric("outer", 1)
            finally:
                sys.settrace(None)
            client.close(timeout=5)

        for n, client in at_each_point(CALLER_CODE, scenario, lambda: new_client(**mode),
                                       record_inner):
            assert names(client) == ["inner", "outer", "warm-up"], f"instruction {n}"

    def test_from_every_instruction_of_the_workers_take_and_settle(self) -> None:
        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or new_client(use_async_requests=True)
            threading.settrace(tracer)  # the worker thread starts with the first record
            try:
                client.metric("outer", 1)
                client.flush(timeout=5)
                worker_waits_again(client)  # every run counts the same instructions
            finally:
                threading.settrace(None)  # type: ignore[arg-type]
                tracer.armed = False  # what close() does is not the point here
            client.close(timeout=5)

        make = functools.partial(new_client, use_async_requests=True)
        for n, client in at_each_point(WORKER_CODE, scenario, make, record_inner):
            assert names(client) == ["inner", "outer"], f"instruction {n}"

    def test_from_every_instruction_of_a_waiting_callers_wait(self) -> None:
        """A default-mode caller waiting for its record is interrupted before its wait has
        registered: the record made there must not make the caller miss its wake-up."""
        wait_code = {threading.Condition.wait.__code__, SystemClock.wait.__code__}

        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or new_client(sync_timeout=3600)
            client.metric("warm-up", 0)
            worker_waits_again(client)
            sys.settrace(tracer)
            try:
                client.metric("outer", 1)
            finally:
                sys.settrace(None)
                tracer.armed = False
            client.close(timeout=5)

        make = functools.partial(new_client, sync_timeout=3600)
        for n, client in at_each_point(wait_code, scenario, make, record_inner):
            assert names(client) == ["inner", "outer", "warm-up"], f"instruction {n}"

    def test_a_signal_handler_that_records(self) -> None:
        """A real SIGALRM handler recording while the main thread records (POSIX only)."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            pytest.skip("signals need the main thread")
        client = new_client(use_async_requests=True)
        handled: List[int] = []

        def on_alarm(signum: int, frame: Any) -> None:
            client.metric("handler", len(handled))
            handled.append(1)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        try:
            calls = 0
            while len(handled) < 200:
                client.metric("main", calls)
                calls += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
        assert client.flush(timeout=10)
        recorded = names(client)
        assert recorded.count("main") == calls and recorded.count("handler") == len(handled)
        client.close(timeout=5)


class TestKeyboardInterrupt:
    """Ctrl-C anywhere in metric() leaves no lock held: the exit flush still completes."""

    def test_after_every_call_in_the_callers_append(self, mode: dict) -> None:
        def only(code: types.CodeType, offset: int) -> bool:
            return offset in after_calls(code)

        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or new_client(**mode)
            client.metric("warm-up", 0)
            worker_waits_again(client)
            sys.settrace(tracer)
            try:
                client.metric("interrupted", 1)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)

        for n, client in at_each_point(CALLER_CODE, scenario, lambda: new_client(**mode),
                                       interrupt, only):
            # Another thread can record, and a flush and a close complete: no lock was kept.
            within(HANG, functools.partial(client.metric, "after", 2))
            assert within(HANG, functools.partial(client.flush, timeout=5)), f"call {n}"
            assert within(HANG, functools.partial(client.close, timeout=5))
            recorded = names(client)
            assert recorded.count("warm-up") == 1 and recorded.count("after") == 1
            assert recorded.count("interrupted") <= 1


class TestKeyboardInterruptInClose:
    """Ctrl-C anywhere in close() leaves the next close() able to do the work."""

    def test_after_every_call_in_close(self) -> None:
        from dxtrack.pipeline import Pipeline

        code = {Pipeline.close.__code__}

        def only(code: types.CodeType, offset: int) -> bool:
            return offset in after_calls(code)

        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or new_client(buffer_metrics=True)
            client.metric("before", 1)
            sys.settrace(tracer)
            try:
                client.close(timeout=5)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)

        make = functools.partial(new_client, buffer_metrics=True)
        for n, client in at_each_point(code, scenario, make, interrupt, only):
            assert within(HANG, functools.partial(client.close, timeout=5)), f"call {n}"
            assert names(client) == ["before"]


class TestLoggingFromInterruptingCode:
    """A refused record logs a warning; recording again from inside that logging is safe."""

    def test_from_every_instruction_of_the_rate_limited_log(self) -> None:
        from dxtrack._logging import RateLimitedLog

        code = {RateLimitedLog.__call__.__code__}

        def closed_client() -> DXTrack:
            client = new_client()
            client.close(timeout=5)
            return client

        def scenario(tracer: Interrupter, client: Optional[DXTrack] = None) -> None:
            client = client or closed_client()
            sys.settrace(tracer)
            try:
                client.metric("outer", 1)  # refused: the client is closed, and it says so
            finally:
                sys.settrace(None)

        for n, client in at_each_point(code, scenario, closed_client, record_inner):
            assert client.stats()["dropped"] == {"closed": 2}, f"instruction {n}"
