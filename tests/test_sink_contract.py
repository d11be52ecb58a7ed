"""The contract every sink keeps, run against each of them.

A sink takes finished lines of one stream, delivers them in order, says so
with a :class:`SendResult`, and can be closed. The pipeline relies on nothing
else, so a sink that passes these tests can stand behind ``configure(sink=...)``.
A sink of the user's that does not derive from :class:`Sink` is taken as well.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Tuple

import orjson
import pytest

from dxtrack import DXTrack, FileSink, MemorySink, PrintSink, SendResult, Sink
from dxtrack.config import Config
from dxtrack.sinks.firehose import FirehoseSink

Reader = Callable[[str], List[bytes]]


@pytest.fixture(params=["file", "print", "memory", "firehose"])
def sink_and_reader(
    request: pytest.FixtureRequest, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> Iterator[Tuple[Any, Reader]]:
    """A sink, and a way to read back what it delivered on a stream."""
    kind = request.param
    if kind == "file":
        sink: Any = FileSink(tmp_path)

        def read(stream: str) -> List[bytes]:
            path = tmp_path / f"{stream}.jsonl"
            return path.read_bytes().splitlines(keepends=True) if path.exists() else []
    elif kind == "print":
        sink = PrintSink()
        printed: List[bytes] = []

        def read(stream: str) -> List[bytes]:
            printed.extend(capsys.readouterr().out.encode().splitlines(keepends=True))
            return [line for line in printed if f'"stream":"{stream}"'.encode() in line]
    elif kind == "memory":
        sink = MemorySink()
        read = sink.lines
    else:
        landing = request.getfixturevalue("landing")
        sink = FirehoseSink(Config(context="contract", run_id="1", **landing.client_options()))

        def read(stream: str) -> List[bytes]:
            return [line + b"\n" for line in landing.lines(stream)]
    yield sink, read
    sink.close()


def lines_for(stream: str, count: int) -> List[bytes]:
    return [orjson.dumps({"stream": stream, "n": n}) + b"\n" for n in range(count)]


class TestSinkContract:
    """Every sink: declared limits, in-order delivery per stream, an honest result, close."""

    def test_is_a_sink_with_usable_batch_limits(self, sink_and_reader: Tuple[Any, Reader]) -> None:
        sink, _ = sink_and_reader
        assert isinstance(sink, Sink)
        assert sink.max_batch_lines >= 1
        assert sink.max_batch_bytes >= 1_024_000  # one record of the largest size fits
        assert sink.max_line_bytes == 1_024_000  # Firehose's: a test run refuses what prod does

    def test_delivers_each_line_of_each_stream_once(
        self, sink_and_reader: Tuple[Any, Reader]
    ) -> None:
        sink, read = sink_and_reader
        metrics, errors = lines_for("metric", 300), lines_for("error", 7)
        for stream, lines in (("metric", metrics[:150]), ("error", errors),
                              ("metric", metrics[150:])):
            result = sink.send(stream, lines)
            assert isinstance(result, SendResult)
            assert (list(result.retry), result.failed) == ([], 0)
        # S3 lists a stream's objects by key, not by time: compare as multisets.
        assert sorted(read("metric")) == sorted(metrics)
        assert sorted(read("error")) == sorted(errors)

    def test_close_twice_is_harmless(self, sink_and_reader: Tuple[Any, Reader]) -> None:
        sink, _ = sink_and_reader
        sink.close()
        sink.close()

    def test_records_round_trip_through_a_client(
        self, sink_and_reader: Tuple[Any, Reader], tmp_path: Any
    ) -> None:
        sink, read = sink_and_reader
        client = DXTrack()
        client.configure(stage="dev", context="contract", run_id="1", sink=sink,
                         output_dir=str(tmp_path / "unused"))
        try:
            client.metric("rows", 3, metadata={"stream": "metric"})
            try:
                raise KeyError("sku")
            except KeyError:
                client.error(metadata={"stream": "error"})
            assert client.flush_metrics_buffer(timeout=30)
        finally:
            client.close(timeout=10)
        [metric] = [orjson.loads(line) for line in read("metric")]
        [error] = [orjson.loads(line) for line in read("error")]
        assert (metric["metric_name"], metric["value"]) == ("rows", 3.0)
        assert error["exception"]["type"] == "KeyError"


class TestSinksOfTheUsersOwn:
    """An object with a ``send`` method is enough; what it declares beyond that is used."""

    def test_one_with_send_alone_delivers(self, make_client: Any) -> None:
        class Bare:
            def __init__(self) -> None:
                self.lines: List[bytes] = []

            def send(self, stream: str, lines: Any) -> None:  # None: delivered
                self.lines.extend(lines)

        bare = Bare()
        client = make_client(sink=bare)
        client.metric("rows", 3)
        assert client.flush(timeout=10) is True
        assert [orjson.loads(line)["value"] for line in bare.lines] == [3.0]
        assert repr(client.sink) == repr(bare)  # what the log names
        assert client.close(timeout=10) is True

    def test_what_it_declares_is_used(self, make_client: Any) -> None:
        class Declared:
            max_line_bytes = 2048
            max_batch_lines = 2

            def __init__(self) -> None:
                self.batches: List[int] = []
                self.closed = False

            def send(self, stream: str, lines: Any) -> SendResult:
                self.batches.append(len(lines))
                return SendResult()

            def stats(self) -> Dict[str, int]:
                return {"declared_batches": len(self.batches)}

            def close(self) -> None:
                self.closed = True

        sink = Declared()
        client = make_client(sink=sink, buffer_metrics=True)
        with pytest.raises(ValueError, match="record limit of 2,048 bytes"):
            client.metric("big", 1, metadata={"pad": "x" * 2048})
        for n in range(5):
            client.metric("rows", n)
        assert client.flush(timeout=10) is True
        assert sink.batches == [2, 2, 1]
        assert client.stats()["declared_batches"] == 3
        client.close(timeout=10)
        assert sink.closed
