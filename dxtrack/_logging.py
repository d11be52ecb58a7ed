"""The ``dxtrack`` logger, with a rate limit so a failing endpoint cannot flood logs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from cachetools import LRUCache, TTLCache

__all__ = ["logger", "RateLimitedLog"]

logger = logging.getLogger("dxtrack")


class RateLimitedLog:
    """Logs a message once per ``period`` seconds per key; the next one says how many were
    held back. Keys live in bounded caches: a stream of distinct keys cannot grow memory."""

    def __init__(self, period: float = 60.0, maxsize: int = 256,
                 timer: Callable[[], float] = time.monotonic, log: logging.Logger = logger) -> None:
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=maxsize, ttl=period, timer=timer)
        self._suppressed: LRUCache[str, int] = LRUCache(maxsize=maxsize)  # bounded too
        self._log = log
        self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        """A new lock: the parent's may have been held by another thread at fork time.

        Reentrant, because a signal handler or a ``__del__`` that records can interrupt this
        thread inside :meth:`__call__`; such a call finds ``_busy`` set and holds its message
        back (counted) rather than touch the caches half way through a change.
        """
        self._lock = threading.RLock()
        self._busy = False

    def __call__(
        self, level: int, key: str, message: str, *args: Any, exc_info: Any = None
    ) -> bool:
        """Log unless ``key`` was logged within the period; returns whether it logged."""
        with self._lock:
            if self._busy:
                return False  # interrupting this thread's own bookkeeping (see above)
            self._busy = True
            try:
                if key in self._seen:
                    self._suppressed[key] = self._suppressed.get(key, 0) + 1
                    return False
                self._seen[key] = True
                held_back = self._suppressed.pop(key, 0)
            finally:
                self._busy = False
        if held_back:
            message += f" ({held_back} similar message(s) suppressed)"
        self._log.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, message: str, *args: Any) -> bool:
        return self(logging.WARNING, key, message, *args)

    def error(self, key: str, message: str, *args: Any, exc_info: Any = None) -> bool:
        return self(logging.ERROR, key, message, *args, exc_info=exc_info)
