"""Stage 'test' output: JSON-lines files that are only ever appended to, or stdout."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import orjson
import pytest

from dxtrack import DXTrack, FileSink, MemorySink, PrintSink

MakeClient = Callable[..., DXTrack]


def read_lines(path: Path) -> List[Dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


def record_error(client: DXTrack, message: str = "boom") -> None:
    try:
        raise ValueError(message)
    except ValueError:
        client.error()


class TestFileLayout:
    """Metrics go to <output_dir>/metric.jsonl, errors to error.jsonl, one JSON object a line."""

    def test_streams_in_their_own_files(self, make_client: MakeClient, tmp_path: Path) -> None:
        client = make_client(output_dir=str(tmp_path))
        client.metric("rows", 1)
        record_error(client)
        assert sorted(os.listdir(tmp_path)) == ["error.jsonl", "metric.jsonl"]
        assert [r["metric_name"] for r in read_lines(tmp_path / "metric.jsonl")] == ["rows"]
        assert [r["exception"]["value"] for r in read_lines(tmp_path / "error.jsonl")] == ["boom"]

    def test_each_line_is_a_finished_record(self, make_client: MakeClient, tmp_path: Path) -> None:
        client = make_client(output_dir=str(tmp_path))
        client.metric("rows", 1, metadata={"text": "two\nlines"})
        client.metric("rows", 2)
        raw = (tmp_path / "metric.jsonl").read_bytes()
        lines = raw.split(b"\n")
        assert lines[-1] == b"" and len(lines) == 3
        for line in lines[:-1]:
            record = orjson.loads(line)
            digest = record.pop("id")
            assert digest == hashlib.sha256(orjson.dumps(record)).hexdigest()

    def test_output_dir_is_created_with_its_parents(
        self, make_client: MakeClient, tmp_path: Path
    ) -> None:
        target = tmp_path / "a" / "b" / "out"
        client = make_client(output_dir=target)
        client.metric("rows", 1)
        assert len(read_lines(target / "metric.jsonl")) == 1

    def test_default_output_dir(
        self, make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        client = make_client()
        client.metric("rows", 1)
        assert len(read_lines(tmp_path / ".dxtrack_output" / "metric.jsonl")) == 1

    def test_only_streams_that_were_used_get_a_file(
        self, make_client: MakeClient, tmp_path: Path
    ) -> None:
        client = make_client(output_dir=str(tmp_path))
        client.metric("rows", 1)
        assert os.listdir(tmp_path) == ["metric.jsonl"]


class TestAppending:
    """Records are appended: across calls, across configure(), across clients; never truncated."""

    def test_across_calls(self, make_client: MakeClient, tmp_path: Path) -> None:
        client = make_client(output_dir=str(tmp_path))
        for i in range(5):
            client.metric("rows", i)
            record_error(client, f"e{i}")
        assert [r["value"] for r in read_lines(tmp_path / "metric.jsonl")] == [
            0.0,
            1.0,
            2.0,
            3.0,
            4.0,
        ]
        assert [r["exception"]["value"] for r in read_lines(tmp_path / "error.jsonl")] == [
            f"e{i}" for i in range(5)
        ]

    def test_across_configure(self, make_client: MakeClient, tmp_path: Path) -> None:
        client = make_client(output_dir=str(tmp_path), run_id="run-1")
        client.metric("rows", 1)
        client.configure(stage="test", context="tests", run_id="run-2", output_dir=str(tmp_path))
        client.metric("rows", 2)
        client.configure(
            stage="test",
            context="tests",
            run_id="run-3",
            output_dir=str(tmp_path),
            buffer_metrics=True,
        )
        client.metric("rows", 3)
        assert client.flush_metrics_buffer(timeout=5)
        assert [(r["run_id"], r["value"]) for r in read_lines(tmp_path / "metric.jsonl")] == [
            ("run-1", 1.0),
            ("run-2", 2.0),
            ("run-3", 3.0),
        ]

    def test_existing_content_is_kept(self, make_client: MakeClient, tmp_path: Path) -> None:
        earlier = b'{"from":"an earlier run"}\n'
        (tmp_path / "metric.jsonl").write_bytes(earlier)
        (tmp_path / "error.jsonl").write_bytes(earlier)
        client = make_client(output_dir=str(tmp_path))
        client.metric("rows", 1)
        record_error(client)
        for name in ("metric.jsonl", "error.jsonl"):
            data = (tmp_path / name).read_bytes()
            assert data.startswith(earlier) and data.count(b"\n") == 2

    def test_two_clients_one_directory(self, make_client: MakeClient, tmp_path: Path) -> None:
        a = make_client(output_dir=str(tmp_path), context="a")
        b = make_client(output_dir=str(tmp_path), context="b")
        a.metric("rows", 1)
        b.metric("rows", 2)
        a.metric("rows", 3)
        assert [(r["context"], r["value"]) for r in read_lines(tmp_path / "metric.jsonl")] == [
            ("a", 1.0),
            ("b", 2.0),
            ("a", 3.0),
        ]

    def test_buffered_flushes_append(self, make_client: MakeClient, tmp_path: Path) -> None:
        client = make_client(output_dir=str(tmp_path), buffer_metrics=True, flush_interval=3600)
        client.metric("rows", 1)
        assert client.flush_metrics_buffer(timeout=5)
        client.metric("rows", 2)
        client.metric("rows", 3)
        assert client.flush_metrics_buffer(timeout=5)
        assert [r["value"] for r in read_lines(tmp_path / "metric.jsonl")] == [1.0, 2.0, 3.0]


class TestNothingToWrite:
    """A flush or close with nothing pending creates no file and raises nothing."""

    @pytest.mark.parametrize("buffered", [True, False])
    def test_empty_flush_and_close(
        self, make_client: MakeClient, tmp_path: Path, buffered: bool
    ) -> None:
        out = tmp_path / "out"
        client = make_client(output_dir=str(out), buffer_metrics=buffered)
        assert client.flush_metrics_buffer(timeout=5) is True
        assert client.flush_metrics_buffer() is True
        assert client.close() is True
        assert not out.exists()

    def test_empty_flush_keeps_existing_files(
        self, make_client: MakeClient, tmp_path: Path
    ) -> None:
        client = make_client(output_dir=str(tmp_path), buffer_metrics=True)
        client.metric("rows", 1)
        assert client.flush_metrics_buffer(timeout=5)
        before = (tmp_path / "metric.jsonl").read_bytes()
        assert client.flush_metrics_buffer(timeout=5)
        assert (tmp_path / "metric.jsonl").read_bytes() == before
        assert not (tmp_path / "error.jsonl").exists()


class TestPrintOutput:
    """test_output='print' writes each record as a JSON line to stdout and no file."""

    def test_printed(
        self,
        make_client: MakeClient,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.chdir(tmp_path)
        client = make_client(test_output="print")
        assert isinstance(client.sink, PrintSink)
        client.metric("rows", 1, metadata={"shop": "é"})
        record_error(client)
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert out.endswith("\n") and len(lines) == 2
        metric, error = (orjson.loads(line) for line in lines)
        assert (metric["metric_name"], metric["metadata"]) == ("rows", {"shop": "é"})
        assert error["exception"]["value"] == "boom"
        assert os.listdir(tmp_path) == []

    def test_buffered_prints_on_flush(
        self, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client = make_client(test_output="print", buffer_metrics=True, flush_interval=3600)
        client.metric("rows", 1)
        client.metric("rows", 2)
        assert capsys.readouterr().out == ""
        assert client.flush_metrics_buffer(timeout=5)
        assert [orjson.loads(line)["value"] for line in capsys.readouterr().out.splitlines()] == [
            1.0,
            2.0,
        ]


class TestSinks:
    """FileSink, PrintSink and MemorySink each deliver lines as given."""

    def test_file_sink_appends_bytes_as_given(self, tmp_path: Path) -> None:
        sink = FileSink(tmp_path / "out")
        assert sink.send("metric", [b'{"a":1}\n', b'{"a":2}\n']).error is None
        assert sink.send("metric", [b'{"a":3}\n']).error is None
        assert (tmp_path / "out" / "metric.jsonl").read_bytes() == b'{"a":1}\n{"a":2}\n{"a":3}\n'
        sink.close()

    def test_file_sink_failure_is_reported_for_retry(self, tmp_path: Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        sink = FileSink(blocker)
        lines = [b'{"a":1}\n']
        result = sink.send("metric", lines)
        assert list(result.retry) == lines and result.failed == 0
        assert "cannot append" in (result.error or "")

    def test_print_sink(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert PrintSink().send("error", [b'{"a":1}\n', b'{"b":"\xc3\xa9"}\n']).error is None
        assert capsys.readouterr().out == '{"a":1}\n{"b":"é"}\n'

    def test_memory_sink(self) -> None:
        sink = MemorySink()
        sink.send("metric", [b'{"a":1}\n'])
        sink.send("error", [b'{"b":2}\n'])
        assert sink.records("metric") == [{"a": 1}] and sink.lines("error") == [b'{"b":2}\n']
        assert sink.wait_for("metric", 1, timeout=0)
        assert not sink.wait_for("metric", 2, timeout=0.01)
        assert sink.sends == 2 and sink.stats() == {"sink_sends": 2}
        sink.close()
        assert sink.closed

    def test_memory_sink_in_a_client(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, use_async_requests=True)
        for i in range(20):
            client.metric("rows", i)
        assert sink.wait_for("metric", 20, timeout=10)
        assert [r["value"] for r in sink.records("metric")] == [float(i) for i in range(20)]
