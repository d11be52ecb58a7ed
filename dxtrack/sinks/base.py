"""The seam between the pipeline and a destination: the :class:`Sink` base class.

A sink receives finished JSON lines (each ending in ``\\n``) of one stream,
``'metric'`` or ``'error'``, and reports what became of them. It makes one
attempt; retrying, backoff and deadlines belong to the pipeline, so every
sink gets them for free and the pipeline never knows which sink it feeds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from .packing import MAX_RECORD_BYTES

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


class Sink(abc.ABC):
    """A destination for finished lines: derive from it and write :meth:`send`.

    A sink is used by one worker thread at a time (an abandoned attempt, below,
    may still be running beside the next); ``send`` may raise, which the
    pipeline treats like a passing failure of every line. The class attributes
    are the defaults a sink may override.
    """

    #: How much the pipeline hands over in one :meth:`send`: lines and bytes.
    max_batch_lines: int = 10_000
    max_batch_bytes: int = 8 * 1024 * 1024
    #: The longest line (id and newline included) it takes; the record builder keeps every
    #: record within it. Firehose's by default: a record another sink accepts must be one the
    #: stage's Firehose would take too, so a program behaves alike whatever its sink.
    max_line_bytes: int = MAX_RECORD_BYTES
    #: ``send`` waits on the network: the worker calls it from a thread of its own, abandons
    #: an attempt that outlives the time left to its batch and calls :meth:`drop_connection`.
    blocking_io: bool = False
    #: With ``blocking_io``: no attempt lasts longer than this many seconds (None: no bound).
    attempt_timeout: Optional[float] = None
    #: Copies, not records (Papertrail): what it cannot send is counted, never logged as lost.
    best_effort: bool = False

    @abc.abstractmethod
    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        """Deliver ``lines`` of ``stream`` once and say what became of them."""

    def close(self) -> None:  # noqa: B027 - a hook, empty by default
        """Release files, sockets and clients. Called once, at shutdown."""

    def stats(self) -> Dict[str, int]:
        """Counters it publishes in the client's ``stats()``."""
        return {}

    def after_fork(self) -> None:  # noqa: B027 - a hook, empty by default
        """In a forked child: drop what belongs to the parent (clients, connections)."""

    def drop_connection(self) -> None:  # noqa: B027 - a hook, empty by default
        """An attempt was abandoned while it waited: the next one starts on a new connection."""

