"""capture_unhandled: uncaught exceptions become error records; programs print what they did.

The hooks only show what they do in a process that dies of an exception, so
most of these tests run a child interpreter and read its output and files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import orjson
import pytest

from dxtrack import DXTrack, MemorySink

MakeClient = Callable[..., DXTrack]

PRELUDE = """
import sys, threading, time
from dxtrack import dxtrack
OUT = sys.argv[1]
CAPTURE = sys.argv[2] == "capture"

class SlowSink:
    '''Takes half a second per batch, like a distant endpoint, then writes the lines.'''
    max_batch_lines, max_batch_bytes = 500, 4 * 1024 * 1024
    def send(self, stream, lines):
        time.sleep(0.5)
        with open(f"{OUT}/{stream}.jsonl", "ab") as f:
            f.writelines(lines)
        print("SINK SENT", file=sys.stderr, flush=True)
        return None
    def close(self):
        pass
"""


def run_child(tmp_path: Path, body: str, capture: bool = True) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), "capture" if capture else "plain"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )


def errors_in(tmp_path: Path) -> List[Dict[str, Any]]:
    path = tmp_path / "error.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


MAIN_THREAD_DIES = """
dxtrack.configure(stage="test", context="hooks", run_id="r1", output_dir=OUT,
                  capture_unhandled=CAPTURE, use_async_requests=True)
def parse():
    raise RuntimeError("no price on page 7")
parse()
"""

THREAD_DIES = """
dxtrack.configure(stage="test", context="hooks", run_id="r1", sink=SlowSink(),
                  capture_unhandled=CAPTURE, use_async_requests=True)
def crawl():
    raise LookupError("shop 12 vanished")
worker = threading.Thread(target=crawl, name="crawler-3")
worker.start()
worker.join()
s = dxtrack.stats()
print(f"after join: delivered={s['delivered']} pending={s['pending']}", flush=True)
"""


class TestMainThread:
    """A program that dies of an exception: recorded, and its traceback printed as before."""

    def test_the_error_is_recorded_and_stderr_is_unchanged(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        captured = run_child(tmp_path / "a", MAIN_THREAD_DIES)
        plain = run_child(tmp_path / "b", MAIN_THREAD_DIES, capture=False)
        assert captured.returncode == plain.returncode == 1
        assert "RuntimeError: no price on page 7" in captured.stderr
        assert captured.stderr.replace(str(tmp_path / "a"), "X") == \
            plain.stderr.replace(str(tmp_path / "b"), "X")
        (record,) = errors_in(tmp_path / "a")
        assert record["exception"]["type"] == "RuntimeError"
        assert record["exception"]["value"] == "no price on page 7"
        assert "in parse" in record["exception"]["traceback"]
        assert record["metadata"] == {"unhandled": True, "thread": "MainThread"}
        assert errors_in(tmp_path / "b") == []  # off: nothing recorded

    def test_default_mode_prints_the_traceback_before_waiting_for_delivery(
        self, tmp_path: Path
    ) -> None:
        """Synchronous mode: the record is queued, the traceback printed, then it is sent."""
        job = MAIN_THREAD_DIES.replace("output_dir=OUT,", "sink=SlowSink(),")
        result = run_child(tmp_path, job.replace("use_async_requests=True", "sync_timeout=30"))
        assert result.returncode == 1
        assert "RuntimeError: no price on page 7" in result.stderr
        assert result.stderr.index("RuntimeError: no price") < result.stderr.index("SINK SENT")
        (record,) = errors_in(tmp_path)
        assert record["metadata"]["thread"] == "MainThread"

    def test_a_hook_the_program_installed_still_runs(self, tmp_path: Path) -> None:
        result = run_child(tmp_path, textwrap.dedent("""
            def own_hook(kind, value, tb):
                print("own hook saw", kind.__name__, file=sys.stderr)
                sys.__excepthook__(kind, value, tb)
            sys.excepthook = own_hook
            """) + MAIN_THREAD_DIES)
        assert result.returncode == 1
        assert "own hook saw RuntimeError" in result.stderr
        assert "Traceback (most recent call last)" in result.stderr
        assert len(errors_in(tmp_path)) == 1

    def test_keyboard_interrupt_is_not_an_error(self, tmp_path: Path) -> None:
        result = run_child(tmp_path, MAIN_THREAD_DIES.replace(
            'raise RuntimeError("no price on page 7")', "raise KeyboardInterrupt"))
        assert "KeyboardInterrupt" in result.stderr
        assert errors_in(tmp_path) == []

    def test_the_record_reaches_firehose_before_the_process_ends(
        self, tmp_path: Path, landing: Any
    ) -> None:
        """Against the moto server, in buffered mode with an hour-long interval."""
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(f"""
            from dxtrack import dxtrack
            dxtrack.configure(stage="dev", context="hooks", run_id="r1",
                              endpoint_url={landing.url!r}, region_name="eu-west-1",
                              capture_unhandled=True, buffer_metrics=True,
                              use_async_requests=True, flush_interval=3600)
            dxtrack.metric("rows", 3)
            raise OSError("disk full")
            """))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                timeout=60, env=env)
        assert "OSError: disk full" in result.stderr
        (line,) = landing.lines("error")
        assert orjson.loads(line)["exception"]["value"] == "disk full"
        assert len(landing.lines("metric")) == 1


class TestThreads:
    """A thread that dies of an exception: recorded and flushed before the thread ends."""

    def test_recorded_flushed_and_printed(self, tmp_path: Path) -> None:
        result = run_child(tmp_path, THREAD_DIES)
        assert result.returncode == 0
        assert 'Exception in thread crawler-3' in result.stderr
        assert "LookupError: shop 12 vanished" in result.stderr
        # The slow sink takes 0.5 s: only the hook's flush explains delivery by join().
        assert "after join: delivered=1 pending=0" in result.stdout
        (record,) = errors_in(tmp_path)
        assert record["metadata"] == {"unhandled": True, "thread": "crawler-3"}
        assert "in crawl" in record["exception"]["traceback"]

    def test_off_by_default(self, tmp_path: Path) -> None:
        result = run_child(tmp_path, THREAD_DIES, capture=False)
        assert "LookupError: shop 12 vanished" in result.stderr
        assert "after join: delivered=0 pending=0" in result.stdout
        assert errors_in(tmp_path) == []

    def test_in_process_thread_with_memory_sink(
        self, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        previous_saw: List[str] = []
        monkeypatch.setattr(threading, "excepthook",
                            lambda args: previous_saw.append(args.exc_type.__name__))
        sink = MemorySink()
        make_client(sink=sink, capture_unhandled=True, use_async_requests=True)

        def fail() -> None:
            raise SystemExit(3)  # ignored in threads, by Python and by dxtrack

        def boom() -> None:
            raise ZeroDivisionError("rate")

        for target in (fail, boom):
            thread = threading.Thread(target=target, name=target.__name__)
            thread.start()
            thread.join()
        assert [r["metadata"]["thread"] for r in sink.records("error")] == ["boom"]
        assert previous_saw == ["SystemExit", "ZeroDivisionError"]  # the chain is intact


class TestInstallAndUninstall:
    """The hooks are in place exactly while a configuration asks for them."""

    def test_off_by_default(self, make_client: MakeClient) -> None:
        before = (sys.excepthook, threading.excepthook)
        make_client(sink=MemorySink())
        assert (sys.excepthook, threading.excepthook) == before

    def test_reconfigure_and_close_restore_the_previous_hooks(
        self, make_client: MakeClient
    ) -> None:
        before = (sys.excepthook, threading.excepthook)
        client = make_client(sink=MemorySink(), capture_unhandled=True)
        assert sys.excepthook is not before[0] and threading.excepthook is not before[1]
        client.configure(stage="test", context="t", run_id="2", sink=MemorySink())
        assert (sys.excepthook, threading.excepthook) == before
        client.configure(stage="test", context="t", run_id="3", sink=MemorySink(),
                         capture_unhandled=True)
        client.close()
        assert (sys.excepthook, threading.excepthook) == before

    def test_a_hook_chained_on_top_keeps_working_after_close(
        self, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        original = sys.excepthook
        sink = MemorySink()
        client = make_client(sink=sink, capture_unhandled=True)
        ours = sys.excepthook
        seen: List[str] = []

        def later_hook(kind: Any, value: Any, tb: Any) -> None:
            seen.append(kind.__name__)
            ours(kind, value, tb)

        sys.excepthook = later_hook
        try:
            client.close()
            assert sys.excepthook is later_hook  # not torn out from under it
            client.configure(stage="test", context="t", run_id="2", sink=sink)
            sys.excepthook(ValueError, ValueError("late"), None)
            assert seen == ["ValueError"]
            assert "ValueError: late" in capsys.readouterr().err  # passed through to the original
            assert sink.records("error") == []  # but no longer recorded
        finally:
            sys.excepthook = original

    def test_capturing_again_after_a_foreign_hook_came_and_went(
        self, framework_on_top: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client, sink, original = framework_on_top
        configure(client, sink, "2")  # capture off: ours stays in the framework's chain
        sys.excepthook = original  # the framework leaves, taking our link with it
        configure(client, sink, "3", capture_unhandled=True)
        assert sys.excepthook is not original  # a new link in front
        sys.excepthook(ValueError, ValueError("after the framework left"), None)
        assert client.flush_metrics_buffer(10)
        assert [r["exception"]["value"] for r in sink.records("error")] == [
            "after the framework left"
        ]
        assert "ValueError: after the framework left" in capsys.readouterr().err

    def test_two_links_of_one_client_record_once(
        self, framework_on_top: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client, sink, _ = framework_on_top
        configure(client, sink, "2")
        configure(client, sink, "3", capture_unhandled=True)
        # Now: new link -> framework -> old link -> original.
        sys.excepthook(KeyError, KeyError("twice?"), None)
        assert client.flush_metrics_buffer(10)
        assert len(sink.records("error")) == 1
        assert capsys.readouterr().err.count("KeyError: 'twice?'") == 1


def configure(client: DXTrack, sink: MemorySink, run_id: str, **options: Any) -> None:
    client.configure(stage="test", context="t", run_id=run_id, sink=sink,
                     use_async_requests=True, **options)


@pytest.fixture
def framework_on_top(make_client: MakeClient) -> Iterator[Tuple[DXTrack, MemorySink, Any]]:
    """A capturing client, and a framework's excepthook chained in front of dxtrack's."""
    original = sys.excepthook
    sink = MemorySink()
    client = make_client(sink=sink, capture_unhandled=True, use_async_requests=True)
    ours = sys.excepthook
    sys.excepthook = lambda kind, value, tb: ours(kind, value, tb)
    try:
        yield client, sink, original
    finally:
        client.close()
        sys.excepthook = original
