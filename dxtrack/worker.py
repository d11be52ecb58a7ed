"""The daemon thread that moves records from the buffer to the sink.

One worker per client per process. It takes a batch, adds the ids, hands the
lines to the sink, and retries what the sink could not deliver with capped
exponential backoff and full jitter until ``retry_deadline`` has passed since
the first failed attempt; then the rest count as failed. Nothing it meets is
ever raised into the application.
"""

from __future__ import annotations

import random
import time
from typing import List, Optional, Sequence

from ._logging import RateLimitedLog
from .buffer import RingBuffer
from .records import finalize
from .sinks.base import DELIVERED, SendResult, Sink

__all__ = ["Worker"]

#: First backoff ceiling, seconds; doubles per attempt up to :data:`BACKOFF_CAP`.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0


class Worker:
    """Its :meth:`run` loops until the buffer is stopped, or closed and drained."""

    def __init__(
        self,
        buffer: RingBuffer,
        sink: Sink,
        *,
        retry_deadline: float,
        log: RateLimitedLog,
        backoff_base: Optional[float] = None,
        backoff_cap: Optional[float] = None,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.retry_deadline = retry_deadline
        # Read at construction, not import, so tests and users may tune the module values.
        self.backoff_base = BACKOFF_BASE if backoff_base is None else backoff_base
        self.backoff_cap = BACKOFF_CAP if backoff_cap is None else backoff_cap
        self.log = log

    def run(self, deadline: Optional[float] = None) -> None:
        """Send batches until stopped; with a ``deadline`` (monotonic), none after it."""
        try:
            while deadline is None or time.monotonic() < deadline:
                work = self.buffer.take()
                if work is None:
                    return
                self.deliver(*work)
        except BaseException:  # pragma: no cover - the last line of defence
            self.log.error("worker-crash", "dxtrack worker stopped unexpectedly", exc_info=True)

    def deliver(self, stream: str, bodies: List[bytes], first: int) -> None:
        """Send one batch until it is delivered, failed, or the client stops."""
        clock = self.buffer.clock
        pending: Sequence[bytes] = [finalize(body) for body in bodies]
        delivered = failed = attempt = 0
        started = None
        try:
            while pending:
                result = self._attempt(stream, pending)
                failed += result.failed
                delivered += len(pending) - len(result.retry) - result.failed
                if result.failed:
                    self.log.error(
                        f"failed:{stream}:{result.error}",
                        "dxtrack could not deliver %d %s record(s): %s",
                        result.failed, stream, result.error,
                    )
                pending = result.retry
                if not pending:
                    break
                now = clock.monotonic()
                started = now if started is None else started
                left = started + self.retry_deadline - now
                if left > 0 and not self.buffer.stopped:
                    self.log.warning(
                        f"retry:{stream}", "dxtrack will retry %d %s record(s): %s",
                        len(pending), stream, result.error,
                    )
                    ceiling = min(self.backoff_cap, self.backoff_base * (2 ** min(attempt, 30)))
                    attempt += 1
                    delay = min(random.uniform(0.0, ceiling), left)
                    if self.buffer.wait_backoff(delay, len(pending)):
                        continue
                why = "retry_deadline passed" if left <= 0 else "the client stopped"
                self.log.error(
                    f"gave-up:{stream}", "dxtrack gave up on %d %s record(s) (%s): %s",
                    len(pending), stream, why, result.error,
                )
                failed += len(pending)
                pending = ()
        finally:
            # Anything still pending here means an unexpected exception: count it lost.
            self.buffer.settle(stream, first, delivered, failed + len(pending))

    def _attempt(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        try:
            result = self.sink.send(stream, lines)
        except Exception as exc:
            return SendResult(retry=lines, error=f"{type(exc).__name__}: {exc}")
        return DELIVERED if result is None else result
