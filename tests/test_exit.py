"""Exit semantics, in child interpreters: the atexit flush, and an exit that is always bounded.

Each test writes a small job, runs it with ``sys.executable`` and reads what
it left in its output directory (stage ``test``, one JSON-lines file per
stream). A job prints ``time.monotonic()`` right before it ends, so the time
the interpreter then takes to exit can be measured from this process (the
monotonic clock is shared by every process on the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple

import orjson
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RECORDS = 2000

ENDINGS = {
    "normally": ("pass", 0),
    "with sys.exit(3)": ("sys.exit(3)", 3),
    "by an unhandled exception": ("raise RuntimeError('the job failed')", 1),
}


class Run(NamedTuple):
    returncode: int
    stderr: str
    exit_seconds: float  # from the job's last statement until the process was gone
    output: Path

    def records(self, stream: str) -> List[Dict[str, Any]]:
        path = self.output / f"{stream}.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    def closing_reports(self) -> List[str]:
        marker = "closed with records not delivered"
        return [line for line in self.stderr.splitlines() if marker in line]


def run_job(tmp_path: Path, body: str, ending: str = "pass", timeout: float = 60.0) -> Run:
    """Run ``body`` (after a configured-client preamble) in a new interpreter, then ``ending``."""
    output = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from dxtrack import dxtrack\n"
        f"OUTPUT = {str(output)!r}\n"
        + textwrap.dedent(body)
        + "\nprint(time.monotonic(), flush=True)\n"
        + ending
        + "\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    process = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    ended = time.monotonic()
    printed = process.stdout.strip().splitlines()
    assert printed, f"the job did not reach its end:\n{process.stderr}"
    return Run(process.returncode, process.stderr, ended - float(printed[-1]), output)


class TestExitFlush:
    """What is still queued when the job ends is written at exit, however it ends."""

    @pytest.mark.parametrize("ending", list(ENDINGS))
    @pytest.mark.parametrize(
        "mode",
        [
            "use_async_requests=True",
            # An interval far beyond the job's life: only the exit flush can send these.
            "buffer_metrics=True, flush_interval=3600",
        ],
    )
    def test_every_record_is_in_the_output(self, tmp_path, mode, ending):
        code, returncode = ENDINGS[ending]
        run = run_job(
            tmp_path,
            f"""
            dxtrack.configure(
                stage="test", context="exit", run_id="run-1", output_dir=OUTPUT, {mode}
            )
            for value in range({RECORDS}):
                dxtrack.metric("rows", value)
            dxtrack.errors([ValueError(str(n)) for n in range(3)])
            """,
            code,
        )
        assert run.returncode == returncode, run.stderr
        metrics = run.records("metric")
        assert sorted(r["value"] for r in metrics) == [float(v) for v in range(RECORDS)]
        assert len({r["id"] for r in metrics}) == RECORDS
        assert sorted(r["exception"]["value"] for r in run.records("error")) == ["0", "1", "2"]
        assert run.closing_reports() == []
        if returncode == 1:
            assert "RuntimeError: the job failed" in run.stderr

    def test_an_atexit_hook_registered_before_configure_still_records(self, tmp_path):
        """atexit runs its hooks last-registered first: the program's hook comes first."""
        run = run_job(
            tmp_path,
            """
            import atexit
            atexit.register(lambda: dxtrack.metric("at.exit", 1))
            dxtrack.configure(stage="test", context="exit", run_id="r", output_dir=OUTPUT,
                              buffer_metrics=True, flush_interval=3600)
            dxtrack.metric("rows", 0)
            """,
        )
        assert run.returncode == 0, run.stderr
        assert sorted(r["metric_name"] for r in run.records("metric")) == ["at.exit", "rows"]
        assert "dropped" not in run.stderr

    def test_the_exit_flush_takes_no_longer_than_the_work(self, tmp_path):
        run = run_job(
            tmp_path,
            """
            dxtrack.configure(stage="test", context="exit", run_id="r", output_dir=OUTPUT,
                              buffer_metrics=True, flush_interval=3600, shutdown_timeout=30)
            for value in range(10):
                dxtrack.metric("rows", value)
            """,
        )
        assert run.returncode == 0 and len(run.records("metric")) == 10
        assert run.exit_seconds < 5.0  # nowhere near shutdown_timeout


class TestBoundedExit:
    """Whatever the sink does, exit takes at most shutdown_timeout and says what was left."""

    SHUTDOWN = 1.0

    @pytest.mark.parametrize(
        "sink, options",
        [
            ("GateSink()", "use_async_requests=True"),  # hangs forever
            ("RaisingSink()", "use_async_requests=True"),  # fails forever (retry_deadline 60 s)
            ("GateSink()", "sync_timeout=0.2"),  # default mode: each call waits 0.2 s at most
            ("GateSink()", "buffer_metrics=True, flush_interval=3600"),
        ],
    )
    @pytest.mark.parametrize("ending", ["normally", "with sys.exit(3)"])
    def test_exit_is_bounded(self, tmp_path, sink, options, ending):
        code, returncode = ENDINGS[ending]
        run = run_job(
            tmp_path,
            f"""
            from sinks_for_tests import GateSink, RaisingSink
            dxtrack.configure(
                stage="test", context="exit", run_id="r", sink={sink},
                shutdown_timeout={self.SHUTDOWN}, {options}
            )
            for value in range(5):
                dxtrack.metric("rows", value)
            """,
            code,
            timeout=30,
        )
        assert run.returncode == returncode, run.stderr
        assert self.SHUTDOWN * 0.9 <= run.exit_seconds < self.SHUTDOWN + 2.0
        reports = run.closing_reports()
        assert len(reports) == 1, run.stderr
        assert "5 pending" in reports[0] or "5 failed" in reports[0], reports[0]
