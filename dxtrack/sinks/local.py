"""Stage ``test`` destinations: JSON-lines files, or standard output.

They stand in for Firehose and keep its record limit (the :class:`Sink` default
``max_line_bytes``), so a test run refuses what a prod run would.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .base import DELIVERED, SendResult, Sink

__all__ = ["FileSink", "PrintSink"]


class FileSink(Sink):
    """Appends each stream's lines to ``<output_dir>/<stream>.jsonl``, opened for every batch
    and written in one call: earlier runs and other processes' lines are never overwritten."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = os.fspath(output_dir)

    def path(self, stream: str) -> str:
        return os.path.join(self.output_dir, f"{stream}.jsonl")

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(self.path(stream), "ab") as out:
                out.write(b"".join(lines))
        except OSError as exc:
            return SendResult(retry=lines, error=f"cannot append to {self.path(stream)}: {exc}")
        return DELIVERED

    def __repr__(self) -> str:
        return f"FileSink({self.output_dir!r})"


class PrintSink(Sink):
    """Writes each line to standard output (as it is at the time of writing)."""

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        out = sys.stdout
        out.write(b"".join(lines).decode("utf-8"))
        out.flush()
        return DELIVERED

    def __repr__(self) -> str:
        return "PrintSink()"
