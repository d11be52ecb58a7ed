"""dxtrack: metrics and errors from Python jobs to Amazon Data Firehose.

>>> from dxtrack import dxtrack
>>> dxtrack.configure(stage="test", context="shop-scraper", run_id="2026-11-27")
>>> dxtrack.metric("scrape.products", 120, metadata={"shop": "example"})
"""

from __future__ import annotations

from ._version import __version__
from .client import DXTrack
from .config import Config
from .exceptions import ConfigurationError, DXTrackError
from .handler import DXTrackHandler
from .sinks import FileSink, MemorySink, PrintSink, SendResult, Sink
from .timer import Timer
from .worker import RetryPolicy

__all__ = [
    "Config",
    "ConfigurationError",
    "DXTrack",
    "DXTrackError",
    "DXTrackHandler",
    "FileSink",
    "MemorySink",
    "PrintSink",
    "RetryPolicy",
    "SendResult",
    "Sink",
    "Timer",
    "__version__",
    "dxtrack",
]

#: The ready-made client most programs use; its settings reach child processes.
dxtrack = DXTrack(inherit=True)
