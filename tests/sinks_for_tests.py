"""Test doubles of dxtrack's own Sink base class: sinks that stall, hang, raise, fail or crash.

They all extend :class:`dxtrack.MemorySink`, so whatever they finally accept
can be read back with ``lines()``, ``records()`` and ``wait_for()``. Each one
keeps a log of its calls (stream, number of lines, clock time, thread) so a
test can see how the pipeline used it. None of them sleeps: they block on
events the test controls.

This module is also imported by the child interpreters of ``test_exit.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

from dxtrack import MemorySink, SendResult
from dxtrack.sinks.base import DELIVERED

__all__ = [
    "Call",
    "CrashingSink",
    "FlakySink",
    "GateSink",
    "RaisingSink",
    "SinkCrash",
]


class Call(NamedTuple):
    """One ``send`` as the sink saw it."""

    stream: str
    lines: int
    at: float
    thread: threading.Thread


class _LoggingSink(MemorySink):
    """A MemorySink that remembers every call, and signals the first one."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, **limits: int
    ) -> None:
        super().__init__(**limits)
        self.calls: List[Call] = []
        self.entered = threading.Event()
        self._clock = clock
        self._calls_lock = threading.Lock()

    def _log_call(self, stream: str, lines: Sequence[bytes]) -> int:
        with self._calls_lock:
            self.calls.append(Call(stream, len(lines), self._clock(), threading.current_thread()))
            number = len(self.calls)
        self.entered.set()
        return number

    def deliver(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        return MemorySink.send(self, stream, lines)


class GateSink(_LoggingSink):
    """Every send waits until the gate is open; ``entered`` is set at the first send.

    With the gate never opened it is a sink that hangs (a dead endpoint with no
    timeout). ``release()`` opens it for good.
    """

    def __init__(self, *, hang_for: Optional[float] = None, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self._hang_for = hang_for

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        self._log_call(stream, lines)
        self.gate.wait(self._hang_for)
        return self.deliver(stream, lines)

    def release(self) -> None:
        self.gate.set()


class RaisingSink(_LoggingSink):
    """Raises ``RuntimeError`` on every send (an endpoint that is down)."""

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        number = self._log_call(stream, lines)
        raise RuntimeError(f"endpoint down (attempt {number})")


class FlakySink(_LoggingSink):
    """Fails the first ``failures`` sends, then delivers.

    ``how``: ``'raise'`` raises; ``'retry'`` asks for every line again;
    ``'partial'`` delivers the even-numbered lines and asks for the odd ones
    again (a 200 response with ``FailedPutCount > 0``); ``'failed'`` reports
    every line as failed for good.
    """

    def __init__(self, failures: int, how: str = "raise", **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.failures = failures
        self.how = how

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        number = self._log_call(stream, lines)
        if number > self.failures:
            return self.deliver(stream, lines)
        if self.how == "raise":
            raise ConnectionError(f"flaky endpoint (attempt {number})")
        if self.how == "retry":
            return SendResult(retry=list(lines), error="ServiceUnavailableException")
        if self.how == "partial":
            self.deliver(stream, lines[0::2])
            return SendResult(retry=list(lines[1::2]), error="ServiceUnavailableException")
        if self.how == "failed":
            return SendResult(failed=len(lines), error="ResourceNotFoundException")
        raise AssertionError(f"unknown failure mode {self.how!r}")


class SinkCrash(BaseException):
    """Not an ``Exception``: what a sink raising ``SystemExit``-like errors looks like."""


class CrashingSink(_LoggingSink):
    """Raises :class:`SinkCrash` on the first ``crashes`` sends, then delivers."""

    def __init__(self, crashes: int = 1, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.crashes = crashes

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        number = self._log_call(stream, lines)
        if number <= self.crashes:
            raise SinkCrash(f"sink crash {number}")
        self.deliver(stream, lines)
        return DELIVERED
