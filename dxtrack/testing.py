"""What tests of code that uses dxtrack need: :class:`MemorySink` keeps what was
delivered, :class:`ManualClock` (``DXTrack(clock=...)``) moves time only when told,
so a test of intervals and backoff never sleeps.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Set

import orjson

from .sinks.base import DELIVERED, SendResult, Sink

__all__ = ["ManualClock", "MemorySink"]


class MemorySink(Sink):
    """Keeps every delivered line, per stream (an example: docs/clients-and-sinks.md)."""

    def __init__(self, max_batch_lines: int = Sink.max_batch_lines,
                 max_batch_bytes: int = Sink.max_batch_bytes) -> None:
        self.max_batch_lines = max_batch_lines
        self.max_batch_bytes = max_batch_bytes
        self._lines: Dict[str, List[bytes]] = {"metric": [], "error": []}
        self._sends = 0
        self._changed = threading.Condition()
        self.closed = False

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        with self._changed:
            self._lines.setdefault(stream, []).extend(lines)
            self._sends += 1
            self._changed.notify_all()
        return DELIVERED

    def close(self) -> None:
        self.closed = True

    def lines(self, stream: str) -> List[bytes]:
        """The lines delivered so far on ``stream`` (a copy)."""
        with self._changed:
            return list(self._lines.get(stream, ()))

    def records(self, stream: str) -> List[Dict[str, Any]]:
        """The records delivered so far on ``stream``, parsed."""
        return [orjson.loads(line) for line in self.lines(stream)]

    def wait_for(self, stream: str, count: int, timeout: Optional[float] = 10.0) -> bool:
        """Block until ``count`` lines of ``stream`` arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._lines.get(stream, ())) >= count,
                                          timeout)

    @property
    def sends(self) -> int:
        """How many times ``send`` was called."""
        return self._sends

    def stats(self) -> Dict[str, int]:
        return {"sink_sends": self._sends}


class ManualClock:
    """A clock that moves only when :meth:`advance` is called.

    A wait returns when notified, when :meth:`advance` moves the time, or after
    ``min(timeout, max_real_wait)`` real seconds (so a broken test fails instead of hanging);
    callers re-check their deadline, so to them the last two are early wake-ups. A wait
    entered by a thread after the time moved past what that thread last read returns at
    once: its deadline arithmetic is stale, and that advance could not wake it.
    """

    def __init__(self, start: float = 1000.0, max_real_wait: float = 30.0) -> None:
        self._now = start
        self._max_real_wait = max_real_wait
        self._lock = threading.Lock()
        self._waiting: Set[threading.Condition] = set()
        self._seen = threading.local()  # the time each thread read last

    def monotonic(self) -> float:
        now = self._now
        self._seen.now = now
        return now

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            now = self._now
            if getattr(self._seen, "now", now) != now:
                self._seen.now = now
                return
            self._waiting.add(condition)
        real = self._max_real_wait if timeout is None else min(timeout, self._max_real_wait)
        try:
            condition.wait(real)
        finally:
            with self._lock:
                self._waiting.discard(condition)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every wait so it can look at the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back, got advance({seconds!r})")
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()
