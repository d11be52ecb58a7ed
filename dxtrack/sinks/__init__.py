"""Destinations for finished records, all behind the :class:`Sink` protocol."""

from __future__ import annotations

from ..config import Config
from .base import DELIVERED, SendResult, Sink
from .local import FileSink, PrintSink
from .memory import MemorySink

__all__ = ["DELIVERED", "FileSink", "MemorySink", "PrintSink", "SendResult", "Sink", "sink_for"]


def sink_for(config: Config) -> Sink:
    """The sink a configuration asks for: its own ``sink``, else the stage's."""
    if config.sink is not None:
        return config.sink  # type: ignore[no-any-return]
    if config.stage == "test":
        return PrintSink() if config.test_output == "print" else FileSink(config.output_dir)
    from .firehose import FirehoseSink  # boto3 is imported only when it is needed

    return FirehoseSink(config)
