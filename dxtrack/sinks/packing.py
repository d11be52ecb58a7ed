"""Planning PutRecordBatch calls within every Firehose limit.

Firehose bills each record rounded up to 5 KB and counts records against the
stream's quota, while the bytes that land in S3 are the records' data
concatenated. So newline-terminated lines packed into one Firehose record land
exactly as they would one per record, at a fraction of the cost.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

__all__ = ["MAX_CALL_BYTES", "MAX_CALL_RECORDS", "MAX_RECORD_BYTES", "plan_calls"]

#: PutRecordBatch takes at most 500 records ...
MAX_CALL_RECORDS = 500
#: ... and 4 MiB of data per call ...
MAX_CALL_BYTES = 4 * 1024 * 1024
#: ... each record at most 1,000 KiB before base64 (the largest line any sink takes by default).
MAX_RECORD_BYTES = 1_024_000

#: One Firehose record: its data and the lines it carries.
Record = Tuple[bytes, Sequence[bytes]]


def pack(lines: Sequence[bytes], max_record_bytes: int) -> Iterator[Record]:
    """Group consecutive lines, in order, into records of at most ``max_record_bytes``; a
    longer line (but within the service limit) travels alone."""
    group: List[bytes] = []
    size = 0
    for line in lines:
        if group and size + len(line) > max_record_bytes:
            yield b"".join(group), group
            group, size = [], 0
        group.append(line)
        size += len(line)
    if group:
        yield b"".join(group), group


def plan_calls(
    lines: Sequence[bytes], *, packed: bool, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[List[Record]]:
    """Split ``lines`` into PutRecordBatch calls that respect all three limits."""
    for line in lines:
        if len(line) > MAX_RECORD_BYTES:
            raise ValueError(f"a line of {len(line):,} bytes exceeds the Firehose record limit")
    records: Iterator[Record] = (pack(lines, max_record_bytes) if packed
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
