"""SIGTERM: a process that is told to stop delivers what it recorded, then ends with 143.

In child processes (pool workers ended by ``terminate()``), including a
SIGTERM that lands while ``multiprocessing`` is already running its exit
finalizers; and in the main process (``docker stop``, Kubernetes, systemd),
where the program left SIGTERM at its default. ``handle_sigterm=False``
leaves every signal alone, and a handler the program installed is never
replaced. Each case runs real processes and reads the files they left.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import mp_jobs
import orjson
import pytest

TESTS = Path(__file__).resolve().parent
SIGTERM_STATUS = 128 + int(signal.SIGTERM)


def landed(output: Path, stream: str = "metric") -> List[dict]:
    path = output / f"{stream}.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


class TestChildProcesses:
    """A SIGTERM during a child's exit no longer cuts its flush short."""

    @pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
    def test_sigterm_while_multiprocessing_runs_its_finalizers(
        self, tmp_path: Path, method: str
    ) -> None:
        # Before the fix: dxtrack's handler raised SystemExit inside _run_finalizers, which
        # aborted the finalizers still to run, dxtrack's flush among them: 0 of 1,000 landed.
        context = multiprocessing.get_context(method)
        child = context.Process(
            target=mp_jobs.sigterm_while_finalizers_run, args=(str(tmp_path), 1000)
        )
        child.start()
        child.join(60)
        assert child.exitcode == SIGTERM_STATUS
        records = landed(tmp_path)
        assert sorted(r["value"] for r in records) == [float(i) for i in range(1000)]


def start_job(tmp_path: Path, body: str, group: bool = False) -> subprocess.Popen[str]:
    """Run ``body`` in a new interpreter; returns once it printed ``ready``.

    ``group``: in a process group of its own, so the test can signal the whole group.
    """
    script = tmp_path / "job.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from dxtrack import dxtrack\n"
        f"OUTPUT = {str(tmp_path / 'out')!r}\n"
        "def ready():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        + textwrap.dedent(body)
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    job = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, start_new_session=group)
    assert job.stdout is not None
    line = job.stdout.readline()
    assert line == "ready\n", (line, job.stderr.read() if job.poll() is not None else "")
    return job


def terminate(job: subprocess.Popen[str], group: bool = False) -> str:
    if group:  # as systemd, supervisord's stopasgroup and `kill -- -PGID` do
        os.killpg(job.pid, signal.SIGTERM)
    else:
        job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    return stderr


CONFIGURE = """
dxtrack.configure(stage="test", context="c", run_id="r", output_dir=OUTPUT,
                  buffer_metrics=True, flush_interval=3600{options})
for i in range(1000):
    dxtrack.metric("main.before", i)
"""


class TestMainProcess:
    """The main process flushes on SIGTERM, unless told to leave signals alone."""

    def test_buffered_records_are_delivered_and_the_status_is_143(self, tmp_path: Path) -> None:
        job = start_job(tmp_path, CONFIGURE.format(options="") + "ready()\n")
        stderr = terminate(job)
        assert job.returncode == SIGTERM_STATUS, stderr
        assert len(landed(tmp_path / "out")) == 1000

    def test_finally_blocks_still_record_on_the_way_out(self, tmp_path: Path) -> None:
        body = CONFIGURE.format(options="") + textwrap.dedent("""
            try:
                ready()
            finally:
                dxtrack.metric("main.finally", 1)
        """)
        job = start_job(tmp_path, body)
        stderr = terminate(job)
        assert job.returncode == SIGTERM_STATUS, stderr
        names = [r["metric_name"] for r in landed(tmp_path / "out")]
        assert names.count("main.before") == 1000 and names.count("main.finally") == 1

    def test_handle_sigterm_false_leaves_the_signal_alone(self, tmp_path: Path) -> None:
        body = CONFIGURE.format(options=", handle_sigterm=False") + textwrap.dedent("""
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            ready()
        """)
        job = start_job(tmp_path, body)
        terminate(job)
        assert job.returncode == -signal.SIGTERM  # ended by the signal, as the program asked
        assert landed(tmp_path / "out") == []

    def test_a_handler_of_the_program_is_never_replaced(self, tmp_path: Path) -> None:
        body = textwrap.dedent("""
            def mine(signum, frame):
                dxtrack.metric("main.handled", 1)
                sys.exit(7)
            signal.signal(signal.SIGTERM, mine)
        """) + CONFIGURE.format(options="") + textwrap.dedent("""
            assert signal.getsignal(signal.SIGTERM) is mine
            ready()
        """)
        job = start_job(tmp_path, body)
        stderr = terminate(job)
        assert job.returncode == 7, stderr
        names = [r["metric_name"] for r in landed(tmp_path / "out")]
        assert names.count("main.before") == 1000 and names.count("main.handled") == 1

    def test_close_gives_the_signal_back(self, tmp_path: Path) -> None:
        body = CONFIGURE.format(options="") + textwrap.dedent("""
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            dxtrack.close()
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            ready()
        """)
        job = start_job(tmp_path, body)
        terminate(job)
        assert job.returncode == -signal.SIGTERM
        assert len(landed(tmp_path / "out")) == 1000


POOL = """
import multiprocessing, mp_jobs
if __name__ == "__main__":
    os.makedirs(OUTPUT, exist_ok=True)
    METRICS = os.path.join(OUTPUT, "metric.jsonl")
    dxtrack.configure(stage="test", context="c", run_id="r", output_dir=OUTPUT,
                      buffer_metrics=True, flush_interval=3600{options})
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pids = pool.map(mp_jobs.emit_buffered, [1000, 1000], chunksize=1)
            ready()
    finally:
        dxtrack.metric("main.after_pool", len(set(pids)))
"""


class TestPools:
    """A main process with a pool: the workers' records and the main's both land."""

    def test_sigterm_to_the_whole_process_group(self, tmp_path: Path) -> None:
        # Each worker gets the group's SIGTERM, and then another from the pool's terminate()
        # as the main process unwinds: the second must not cut the workers' flush short.
        options = ", sink=mp_jobs.SlowFileSink(METRICS, 1.0)"  # still flushing at the second
        job = start_job(tmp_path, POOL.format(options=options), group=True)
        stderr = terminate(job, group=True)
        assert job.returncode == SIGTERM_STATUS, stderr
        names = [r["metric_name"] for r in landed(tmp_path / "out")]
        assert names.count("pool.rows") == 2000 and names.count("main.after_pool") == 1

    def test_the_main_process_waits_while_its_workers_flush(self, tmp_path: Path) -> None:
        # The workers' sink takes 4 s a send (500 lines): the main process spends that long
        # inside the pool's exit before it records again and flushes; dxtrack must not end it
        # meanwhile (it gave the main thread half of shutdown_timeout + 1 s, 3.5 s here).
        options = ", shutdown_timeout=6, sink=mp_jobs.SlowFileSink(METRICS, 4.0)"
        job = start_job(tmp_path, POOL.format(options=options).replace("1000, 1000", "500, 500"))
        stderr = terminate(job)
        assert job.returncode == SIGTERM_STATUS, stderr
        names = [r["metric_name"] for r in landed(tmp_path / "out")]
        assert names.count("pool.rows") == 1000 and names.count("main.after_pool") == 1


class TestReconfigure:
    """configure(handle_sigterm=False) after dxtrack's handler was installed takes it away."""

    def test_the_handler_goes(self, tmp_path: Path) -> None:
        body = CONFIGURE.format(options="") + textwrap.dedent("""
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            dxtrack.configure(stage="test", context="c", run_id="r", output_dir=OUTPUT,
                              handle_sigterm=False)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            ready()
        """)
        job = start_job(tmp_path, body)
        terminate(job)
        assert job.returncode == -signal.SIGTERM


class TestSignalsDuringError:
    """A signal whose handler runs while error() formats a traceback is not swallowed.

    The standard library formats with bare ``except:`` clauses; this exception's
    ``__str__`` signals its own process the second time it is called, from inside
    the traceback formatting.
    """

    BODY = textwrap.dedent("""
        dxtrack.configure(stage="test", context="c", run_id="r", output_dir=OUTPUT,
                          use_async_requests=True)
        class PageError(Exception):
            calls = 0
            def __str__(self):
                PageError.calls += 1
                if PageError.calls == 2:
                    os.kill(os.getpid(), signal.{name})
                return "no price on page"
        try:
            try:
                raise PageError()
            except PageError:
                dxtrack.error()
            print("error() returned: the signal was swallowed", flush=True)
        finally:
            print("finally ran", flush=True)
    """)

    @pytest.mark.parametrize(
        "name, status", [("SIGTERM", SIGTERM_STATUS), ("SIGINT", -signal.SIGINT)]
    )
    def test_the_signal_acts_once_the_record_is_made(
        self, tmp_path: Path, name: str, status: int
    ) -> None:
        script = tmp_path / "job.py"
        script.write_text("import os, signal\nfrom dxtrack import dxtrack\n"
                          f"OUTPUT = {str(tmp_path / 'out')!r}\n" + self.BODY.format(name=name))
        job = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60)
        assert job.returncode == status, job.stderr
        assert job.stdout == "finally ran\n"
        assert [r["exception"]["value"] for r in landed(tmp_path / "out", "error")] == [
            "no price on page"
        ]


class TestTheWatchdog:
    """Whatever hangs after a SIGTERM, the process ends within twice the grace, saying so."""

    def test_a_sink_that_never_closes(self, tmp_path: Path) -> None:
        body = textwrap.dedent("""
            from dxtrack import MemorySink
            class Stuck(MemorySink):
                def close(self):
                    time.sleep(60)
            dxtrack.configure(stage="test", context="c", run_id="r", sink=Stuck(),
                              shutdown_timeout=0.5)
            dxtrack.metric("m", 1)
            ready()
        """)
        job = start_job(tmp_path, body)
        stderr = terminate(job)
        assert job.returncode == SIGTERM_STATUS, stderr
        assert "dxtrack: ended the process 3 s after SIGTERM; 0 metrics and 0 errors were" in stderr
