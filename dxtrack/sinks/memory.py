"""An in-memory sink, for tests of code that uses dxtrack."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence

import orjson

from .base import DELIVERED, SendResult

__all__ = ["MemorySink"]


class MemorySink:
    """Keeps every delivered line, per stream.

    >>> sink = MemorySink()
    >>> client = DXTrack()
    >>> client.configure(stage="test", context="job", run_id="1", sink=sink)
    >>> client.metric("rows", 3); client.flush_metrics_buffer()
    >>> sink.records("metric")[0]["value"]
    3.0
    """

    def __init__(
        self, max_batch_lines: int = 10_000, max_batch_bytes: int = 8 * 1024 * 1024
    ) -> None:
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
            return self._changed.wait_for(
                lambda: len(self._lines.get(stream, ())) >= count, timeout
            )

    @property
    def sends(self) -> int:
        """How many times ``send`` was called."""
        return self._sends

    def stats(self) -> Dict[str, int]:
        return {"sink_sends": self._sends}
