"""plan_calls: every PutRecordBatch call within Firehose's limits, the bytes unchanged."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dxtrack.sinks.packing import (
    MAX_CALL_BYTES,
    MAX_CALL_RECORDS,
    MAX_RECORD_BYTES,
    plan_calls,
)

# Large lines cost real memory: a drawn plan has many small lines and only a few big ones.
SMALL = st.integers(min_value=1, max_value=3_000)
BIG = st.integers(min_value=MAX_RECORD_BYTES - 30_000, max_value=MAX_RECORD_BYTES)
MEDIUM = st.integers(min_value=3_000, max_value=400_000)


@st.composite
def line_batches(draw: st.DrawFn) -> List[bytes]:
    """Newline-terminated, numbered lines of mixed sizes in a random order."""
    sizes = draw(st.lists(SMALL, max_size=1_500))
    sizes += draw(st.lists(MEDIUM, max_size=10))
    sizes += draw(st.lists(BIG, max_size=6))
    sizes = draw(st.permutations(sizes))
    return [_line(index, size) for index, size in enumerate(sizes)]


def _line(index: int, size: int) -> bytes:
    """A line of exactly ``size`` bytes (at least its number and newline) that says its number."""
    head = b"%d:" % index
    return head + b"x" * max(0, size - len(head) - 1) + b"\n"


def _check_limits(calls: List[list]) -> None:
    for call in calls:
        assert 1 <= len(call) <= MAX_CALL_RECORDS
        assert sum(len(data) for data, _ in call) <= MAX_CALL_BYTES
        for data, carried in call:
            assert 0 < len(data) <= MAX_RECORD_BYTES
            assert data == b"".join(carried)


def _check_calls_are_full(calls: List[list]) -> None:
    """No call but the last could have taken the next record: calls are not wasted."""
    for call, following in zip(calls, calls[1:]):
        size = sum(len(data) for data, _ in call)
        assert len(call) == MAX_CALL_RECORDS or size + len(following[0][0]) > MAX_CALL_BYTES


class TestPlanProperties:
    """Any input: the limits hold, the bytes and their order are kept."""

    @settings(max_examples=60, deadline=None)
    @given(lines=line_batches(), max_record_bytes=st.integers(1024, MAX_RECORD_BYTES))
    def test_packed_calls_respect_every_limit_and_keep_the_bytes(
        self, lines: List[bytes], max_record_bytes: int
    ) -> None:
        calls = list(plan_calls(lines, packed=True, max_record_bytes=max_record_bytes))
        _check_limits(calls)
        _check_calls_are_full(calls)
        records = [record for call in calls for record in call]
        assert b"".join(data for data, _ in records) == b"".join(lines)
        assert [line for _, carried in records for line in carried] == lines
        for (data, carried), following in zip(records, records[1:]):
            # A record holds several lines only within max_record_bytes ...
            assert len(carried) == 1 or len(data) <= max_record_bytes
            # ... and is closed only when the next line would not have fitted.
            assert len(data) + len(following[1][0]) > max_record_bytes

    @settings(max_examples=60, deadline=None)
    @given(lines=line_batches())
    def test_unpacked_calls_carry_one_line_per_record(self, lines: List[bytes]) -> None:
        calls = list(plan_calls(lines, packed=False))
        _check_limits(calls)
        _check_calls_are_full(calls)
        records = [record for call in calls for record in call]
        assert [data for data, _ in records] == lines
        assert all(list(carried) == [data] for data, carried in records)


class TestPlanEdges:
    """The boundaries named by the service, one by one."""

    def test_no_lines_make_no_call(self) -> None:
        assert list(plan_calls([], packed=True)) == []
        assert list(plan_calls([], packed=False)) == []

    def test_a_line_of_exactly_the_record_limit_is_sent(self) -> None:
        line = _line(0, MAX_RECORD_BYTES)
        assert len(line) == MAX_RECORD_BYTES
        for packed in (True, False):
            calls = list(plan_calls([line], packed=packed))
            assert [[(data, list(carried)) for data, carried in call] for call in calls] == [
                [(line, [line])]
            ]

    @pytest.mark.parametrize("packed", [True, False])
    def test_a_line_over_the_record_limit_is_refused(self, packed: bool) -> None:
        with pytest.raises(ValueError, match="record limit"):
            list(plan_calls([b"ok\n", _line(1, MAX_RECORD_BYTES + 1)], packed=packed))

    def test_a_line_over_max_record_bytes_travels_alone(self) -> None:
        small, big = _line(0, 100), _line(1, 5_000)
        calls = list(plan_calls([small, big, small], packed=True, max_record_bytes=1024))
        assert [list(carried) for _, carried in calls[0]] == [[small], [big], [small]]

    def test_501_lines_unpacked_make_two_calls(self) -> None:
        lines = [_line(i, 50) for i in range(501)]
        calls = list(plan_calls(lines, packed=False))
        assert [len(call) for call in calls] == [500, 1]

    def test_five_records_of_a_million_bytes_make_two_calls(self) -> None:
        lines = [_line(i, 1_000_000) for i in range(5)]
        calls = list(plan_calls(lines, packed=True, max_record_bytes=1_000_000))
        assert [len(call) for call in calls] == [4, 1]

    def test_small_lines_pack_into_few_records(self) -> None:
        lines = [_line(i, 200) for i in range(20_000)]  # 4,000,000 bytes
        calls = list(plan_calls(lines, packed=True, max_record_bytes=1_000_000))
        assert [len(call) for call in calls] == [4]
