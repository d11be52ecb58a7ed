"""The seam between the pipeline and a destination: the :class:`Sink` base class.

A sink makes one attempt to deliver the JSON lines of one stream and says what became of
them; retrying, backoff and deadlines are the pipeline's (docs/clients-and-sinks.md).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from .packing import MAX_RECORD_BYTES

__all__ = ["DELIVERED", "SendResult", "Sink"]


@dataclass(frozen=True)
class SendResult:
    """The outcome of one :meth:`Sink.send`: lines neither in ``retry`` nor counted in
    ``failed`` were delivered."""

    #: Lines to send again after a backoff (throttling, a passing outage).
    retry: Sequence[bytes] = ()
    #: How many lines can never be delivered (missing stream, access denied).
    failed: int = 0
    #: Of those, the lines a later attempt could deliver once the cause is fixed (the call
    #: was refused: credentials, access, a missing stream), which the disk spool keeps.
    refused: Sequence[bytes] = ()
    #: What went wrong, for the log; ``None`` when everything was delivered.
    error: Optional[str] = None


DELIVERED = SendResult()


class Sink(abc.ABC):
    """A destination for finished lines: derive from it and write :meth:`send`.

    One worker thread uses it at a time (an abandoned attempt, below, may still be running
    beside the next); ``send`` may raise, which counts as a passing failure of every line.
    The class attributes are the defaults a sink may override (docs/clients-and-sinks.md).
    """

    #: How much the pipeline hands over in one :meth:`send`: lines and bytes.
    max_batch_lines: int = 10_000
    max_batch_bytes: int = 8 * 1024 * 1024
    #: The longest line (newline included) the record builder makes. Firehose's by default, so
    #: a program refuses alike whatever its sink.
    max_line_bytes: int = MAX_RECORD_BYTES
    #: ``send`` waits on the network: the worker calls it from a thread of its own and abandons
    #: an attempt that outlives its batch's time (then calls :meth:`drop_connection`).
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

