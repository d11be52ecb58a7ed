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
        """Wait on ``condition`` (held by the caller) until notified or ``timeout`` passes.

        It may return early: callers re-check what they wait for, in a loop.
        """


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Condition.wait``."""

    monotonic = staticmethod(time.monotonic)

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        condition.wait(timeout)


class ManualClock:
    """A clock that moves only when :meth:`advance` is called.

    A wait returns when notified, when :meth:`advance` moves the time, or
    after ``min(timeout, max_real_wait)`` real seconds, whichever comes
    first; callers re-check their deadline against :meth:`monotonic`, so to
    them the last two are early wake-ups. ``max_real_wait`` bounds every real
    wait, so a broken test fails instead of hanging.

    A wait entered by a thread after the time moved past what that thread last
    read returns at once: the caller's deadline arithmetic is stale, and the
    advance that made it so could not wake a wait that had not begun yet.
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
