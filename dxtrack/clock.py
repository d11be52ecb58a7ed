"""Time, injectable: the pipeline asks a clock for the time and for bounded waits.

:class:`SystemClock` is what runs in production;
:class:`dxtrack.testing.ManualClock` lets a test move time forward by hand.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional, Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the pipeline needs from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        """Wait on ``condition`` (held by the caller) until notified or ``timeout`` passes;
        it may return early: callers re-check what they wait for, in a loop."""


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Condition.wait``."""

    monotonic = staticmethod(time.monotonic)

    def wait(self, condition: threading.Condition, timeout: Optional[float]) -> None:
        condition.wait(timeout)


def __getattr__(name: str) -> Any:
    """``ManualClock`` lives in :mod:`dxtrack.testing`, which needs the sinks: loaded late."""
    if name == "ManualClock":
        from .testing import ManualClock

        return ManualClock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
