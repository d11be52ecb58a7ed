"""The seam between the pipeline and a destination.

A sink receives finished JSON lines (each ending in ``\\n``) of one stream,
``'metric'`` or ``'error'``, and reports what became of them. It makes one
attempt; retrying, backoff and deadlines belong to the pipeline, so every
sink gets them for free and the pipeline never knows which sink it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Sequence, runtime_checkable

__all__ = ["DELIVERED", "SendResult", "Sink"]


@dataclass(frozen=True)
class SendResult:
    """The outcome of one :meth:`Sink.send`.

    Lines not in ``retry`` and not counted in ``failed`` were delivered.
    """

    #: Lines to send again after a backoff (throttling, a passing outage).
    retry: Sequence[bytes] = ()
    #: How many lines can never be delivered (missing stream, access denied).
    failed: int = 0
    #: What went wrong, for the log; ``None`` when everything was delivered.
    error: Optional[str] = None


DELIVERED = SendResult()


@runtime_checkable
class Sink(Protocol):
    """A destination for finished lines.

    ``max_batch_lines`` and ``max_batch_bytes`` tell the pipeline how much to
    hand over in one :meth:`send`. A sink is used by one worker thread at a
    time (an abandoned attempt, below, may still be running beside the next);
    ``send`` may raise, which the pipeline treats like a passing failure
    of every line.

    Optional: ``blocking_io = True`` says that ``send`` waits on the network;
    the worker then calls it from a thread of its own and abandons an attempt
    that outlives the time left to its batch, calling ``drop_connection()``
    (when the sink has one) so that the next attempt starts afresh.
    """

    max_batch_lines: int
    max_batch_bytes: int

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        """Deliver ``lines`` of ``stream`` once and say what became of them."""

    def close(self) -> None:
        """Release files, sockets and clients. Called once, at shutdown."""


def sink_stats(sink: object) -> Dict[str, int]:
    """Counters a sink chooses to publish in ``stats()`` (none by default)."""
    stats = getattr(sink, "stats", None)
    return dict(stats()) if callable(stats) else {}


def sink_after_fork(sink: object) -> None:
    """Let a sink drop what it must not share with a forked parent (clients, files)."""
    hook = getattr(sink, "after_fork", None)
    if callable(hook):
        hook()
