"""Destinations for finished records, all behind the :class:`Sink` base class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..testing import MemorySink
from .base import DELIVERED, SendResult, Sink
from .local import FileSink, PrintSink

if TYPE_CHECKING:  # config imports the Firehose limit from .packing: no import back at run time
    from ..config import Config

__all__ = ["DELIVERED", "FileSink", "MemorySink", "PrintSink", "SendResult", "Sink", "sink_for"]


def sink_for(config: Config) -> Sink:
    """The sink a configuration asks for: its own ``sink``, else the stage's."""
    if isinstance(config.sink, Sink):
        return config.sink
    if config.sink is not None:
        return _Adapted(config.sink)
    if config.stage == "test":
        return PrintSink() if config.test_output == "print" else FileSink(config.output_dir)
    from .firehose import FirehoseSink  # boto3 is imported only when it is needed

    return FirehoseSink(config)


class _Adapted(Sink):
    """A user's sink that does not derive from :class:`Sink`, read once, here: what it
    has replaces the default. Its ``send`` may return None (delivered)."""

    def __init__(self, sink: Any) -> None:
        self.wrapped = sink
        for name in ("max_batch_lines", "max_batch_bytes", "max_line_bytes", "blocking_io",
                     "attempt_timeout", "best_effort"):
            if hasattr(sink, name):
                setattr(self, name, getattr(sink, name))
        for name in ("close", "stats", "after_fork", "drop_connection"):
            if callable(getattr(sink, name, None)):  # its own method, in place of the default
                setattr(self, name, getattr(sink, name))

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        result = self.wrapped.send(stream, lines)
        return DELIVERED if result is None else result

    def __repr__(self) -> str:
        return repr(self.wrapped)
