"""Planning PutRecordBatch calls within every Firehose limit.

Firehose bills each record rounded up to 5 KB and counts records against the
stream's quota, while the bytes that land in S3 are the records' data
concatenated. So newline-terminated lines packed into one Firehose record land
exactly as they would one per record, at a fraction of the cost.

With ``compression="gzip"`` each record is one complete gzip member of whole lines, so an
object is a multi-member gzip file whose decompressed bytes are exactly the lines, and the
limits apply to the compressed bytes, which is also what Firehose bills and throttles by.
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

__all__ = ["GZIP_LEVEL", "GZIP_MARGIN", "MAX_CALL_BYTES", "MAX_CALL_RECORDS", "MAX_RECORD_BYTES",
           "Gzip", "plan_calls"]

#: PutRecordBatch takes at most 500 records ...
MAX_CALL_RECORDS = 500
#: ... and 4 MiB of data per call ...
MAX_CALL_BYTES = 4 * 1024 * 1024
#: ... each record at most 1,000 KiB before base64 (the largest line any sink takes by default).
MAX_RECORD_BYTES = 1_024_000

#: One Firehose record: its data and the lines it carries.
Record = Tuple[bytes, Sequence[bytes]]

#: zlib level 1: within a tenth of level 9's size on dxtrack's lines, at two fifths of its
#: CPU (benchmarks/RESULTS.md, "Issue 16").
GZIP_LEVEL = 1
#: The most gzip adds to a line that does not compress (zlib's ``deflateBound`` of 1,024,000
#: bytes is 337 more, the gzip wrapper included): a line this much under the record limit
#: always fits in one record, compressed.
GZIP_MARGIN = 512
#: A compressed record holds at most this many times ``max_record_bytes`` of lines, so one
#: record is never more than a few MiB of work however well its lines compress.
_MOST_RAW_PER_RECORD = 8.0


def pack(lines: Sequence[bytes], max_record_bytes: int) -> Iterator[Record]:
    """Group consecutive lines, in order, into records of at most ``max_record_bytes``; a
    longer line (but within the service limit) travels alone."""
    for group in _groups(lines, lambda: max_record_bytes):
        yield b"".join(group), group


def _groups(lines: Sequence[bytes], aim: Callable[[], float]) -> Iterator[Sequence[bytes]]:
    """Consecutive runs of ``lines`` of at most ``aim()`` bytes each (asked for every run),
    a longer line alone. The boundaries are found by bisecting the running total, not by a
    Python step per line."""
    ends = list(accumulate(map(len, lines)))
    start, done = 0, 0
    while start < len(ends):
        stop = max(bisect_right(ends, done + aim(), start), start + 1)
        yield lines[start:stop]
        start, done = stop, ends[stop - 1]


class Gzip:
    """Packs lines into records of one gzip member each, at most ``max_record_bytes``
    compressed (a single line that compresses to more travels alone, within the service
    limit: lines are at most ``MAX_RECORD_BYTES - GZIP_MARGIN``).

    How many lines go into a record is guessed from the ratio the last record compressed
    by; a guess that comes out too large is split in two and compressed again, so the
    limit holds whatever the lines are. zlib releases the GIL while it compresses: the
    job's threads go on meanwhile.
    """

    def __init__(self, max_record_bytes: int, level: int = GZIP_LEVEL) -> None:
        self.max_record_bytes = max_record_bytes
        self.level = level
        #: Line bytes per compressed byte of the last record (a guess to start with).
        self.ratio = 4.0
        #: Records compressed again because a guess came out too large.
        self.splits = 0

    def compress(self, data: bytes) -> bytes:
        """One complete gzip member (no file name, time 0: the same lines give the same
        bytes)."""
        packer = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        return packer.compress(data) + packer.flush()

    def pack(self, lines: Sequence[bytes], packed: bool = True) -> Iterator[Record]:
        if not packed:
            for line in lines:
                yield self.compress(line), (line,)
            return
        for group in _groups(lines, self._aim):
            yield from self._fit(group)

    def _aim(self) -> float:
        """Line bytes for the next record: a little under the limit, as the ratio varies."""
        return self.max_record_bytes * min(self.ratio * 0.9, _MOST_RAW_PER_RECORD)

    def _fit(self, group: Sequence[bytes]) -> Iterator[Record]:
        raw = b"".join(group)
        data = self.compress(raw)
        if len(data) <= self.max_record_bytes or len(group) == 1:
            self.ratio = len(raw) / max(len(data), 1)
            yield data, group
            return
        self.splits += 1
        middle = _middle(group)
        yield from self._fit(group[:middle])
        yield from self._fit(group[middle:])


def _middle(group: Sequence[bytes]) -> int:
    """Where to cut ``group`` (two or more lines) into halves of about equal bytes."""
    half, size = sum(map(len, group)) / 2, 0
    for index, line in enumerate(group):
        size += len(line)
        if size >= half:
            return min(max(index, 1), len(group) - 1)
    return len(group) // 2


def plan_calls(
    lines: Sequence[bytes], *, packed: bool, max_record_bytes: int = MAX_RECORD_BYTES,
    gzip: Optional[Gzip] = None,
) -> Iterator[List[Record]]:
    """Split ``lines`` into PutRecordBatch calls that respect all three limits."""
    if not isinstance(lines, (list, tuple)):
        lines = list(lines)  # sliced below
    most = MAX_RECORD_BYTES - GZIP_MARGIN if gzip else MAX_RECORD_BYTES
    longest = max(map(len, lines), default=0)
    if longest > most:
        raise ValueError(f"a line of {longest:,} bytes exceeds the Firehose record limit")
    records: Iterator[Record]
    if gzip is not None:
        records = gzip.pack(lines, packed)
    else:
        records = (pack(lines, max_record_bytes) if packed
                   else ((line, (line,)) for line in lines))
    call: List[Record] = []
    size = 0
    for record in records:
        data = record[0]
        if call and (len(call) == MAX_CALL_RECORDS or size + len(data) > MAX_CALL_BYTES):
            yield call
            call, size = [], 0
        call.append(record)
        size += len(data)
    if call:
        yield call
