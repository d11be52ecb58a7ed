"""Time, injectable: the pipeline asks a clock for the time and for bounded waits.

:class:`SystemClock` is what runs in production. :class:`ManualClock` lets a
test move time forward by hand, so interval and backoff behaviour is tested
without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Protocol, Set

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """What the pipeline needs from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        """Wait on ``condition`` (held by the caller) until notified or ``timeout`` passes."""


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Condition.wait``."""

    monotonic = staticmethod(time.monotonic)

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        condition.wait(timeout)


class ManualClock:
    """A clock that moves only when :meth:`advance` is called.

    A wait with a timeout returns when notified or when :meth:`advance` has
    moved the time past its deadline. ``max_real_wait`` bounds every real wait,
    so a broken test fails instead of hanging.
    """

    def __init__(self, start: float = 1000.0, max_real_wait: float = 30.0) -> None:
        self._now = start
        self._max_real_wait = max_real_wait
        self._lock = threading.Lock()
        self._waiting: Set[threading.Condition] = set()

    def monotonic(self) -> float:
        return self._now

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            self._waiting.add(condition)
        try:
            condition.wait(self._max_real_wait)
        finally:
            with self._lock:
                self._waiting.discard(condition)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every wait so it can look at the new time."""
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()
