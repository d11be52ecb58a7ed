"""Processes and pools: every record of every process lands exactly once.

All of these run against the moto server, so that children of any start
method send over real sockets to one place the test can count.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import mp_jobs
import orjson
import pytest

from dxtrack import dxtrack

START_METHODS = ["fork", "spawn", "forkserver"]
MODES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "async": {"use_async_requests": True},
    "buffered": {"buffer_metrics": True},
}
# In the default mode every call waits for its own PutRecordBatch, which moto answers in about
# 7 ms and stores as its own S3 object: 4 x 5,000 of them take about five minutes per case, so
# `make test` runs that mode with 50 per worker (same mechanism) and `make test-full`
# (pytest --full-counts) runs every mode with 5,000.
METRICS_PER_WORKER = {"default": 50, "async": 5000, "buffered": 5000}
FULL_COUNT = 5000
ERRORS_PER_WORKER = 5
WORKERS = 4


@pytest.fixture
def global_client(landing: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Configures the ready-made ``dxtrack`` for the moto server; closes it afterwards.

    Credentials come from the environment, as a user who wants spawned
    children to find them would provide them.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    options = landing.client_options()
    del options["aws_access_key_id"], options["aws_secret_access_key"]

    def configure(**extra: Any) -> None:
        dxtrack.configure(context="pool-tests", run_id="run-1", **{**options, **extra})

    yield configure
    dxtrack.close(timeout=10)


@pytest.fixture
def local_client(tmp_path: Any) -> Iterator[Callable[..., Callable[[], List[bytes]]]]:
    """The ready-made ``dxtrack`` writing local files; returns a reader of metric lines.

    For the signal tests: appending to a file is immediate, so a record that
    reaches dxtrack after its pipelines were closed is missing, not racing.
    """
    path = tmp_path / "metric.jsonl"

    def configure(**extra: Any) -> Callable[[], List[bytes]]:
        dxtrack.configure(stage="test", context="pool-tests", run_id="run-1",
                          output_dir=str(tmp_path), **extra)
        return lambda: path.read_bytes().splitlines() if path.exists() else []

    yield configure
    dxtrack.close(timeout=10)


def run_style(style: str, ctx: Any, jobs: List[tuple], join_timeout: float = 60) -> List[int]:
    if style == "pool-with":
        with ctx.Pool(WORKERS) as pool:
            return pool.map(mp_jobs.emit, jobs, chunksize=1)
    if style == "pool-close-join":
        pool = ctx.Pool(WORKERS)
        try:
            return pool.map(mp_jobs.emit, jobs, chunksize=1)
        finally:
            pool.close()
            pool.join()
    if style == "executor":
        with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx) as executor:
            return list(executor.map(mp_jobs.emit, jobs))
    processes = [ctx.Process(target=mp_jobs.emit, args=(job,)) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(join_timeout)
        assert process.exitcode == 0
    return [metrics + errors for _, metrics, errors in jobs]


def assert_exactly_once(landing: Any, metrics: int, errors: int) -> None:
    metric_lines = landing.lines("metric")
    error_lines = landing.lines("error")
    ids = [orjson.loads(line)["id"] for line in metric_lines + error_lines]
    assert (len(metric_lines), len(error_lines)) == (metrics, errors)
    assert len(set(ids)) == len(ids), "duplicated records"


class TestPoolsDeliverExactlyOnce:
    """Every start method, pool style and delivery mode: all lines in S3, once."""

    @pytest.mark.parametrize("mode", list(MODES))
    @pytest.mark.parametrize("style", ["pool-with", "pool-close-join", "executor", "process"])
    @pytest.mark.parametrize("start_method", START_METHODS)
    def test_workers_records_land_once(
        self, landing: Any, global_client: Callable[..., None], start_method: str, style: str,
        mode: str, request: pytest.FixtureRequest,
    ) -> None:
        global_client(**MODES[mode])
        full = request.config.getoption("full_counts")
        metrics = FULL_COUNT if full else METRICS_PER_WORKER[mode]
        jobs = [(worker, metrics, ERRORS_PER_WORKER) for worker in range(WORKERS)]
        ctx = multiprocessing.get_context(start_method)

        emitted = run_style(style, ctx, jobs, join_timeout=900 if full else 60)

        assert sum(emitted) == WORKERS * (metrics + ERRORS_PER_WORKER)
        assert_exactly_once(landing, WORKERS * metrics, WORKERS * ERRORS_PER_WORKER)


class TestTerminatedWorkers:
    """SIGTERM reaches a worker whose main thread is blocked, and it flushes on its way out."""

    def test_dxtrack_thread_leaves_signals_to_the_main_thread(self, make_client: Any,
                                                               tmp_path: Any) -> None:
        client = make_client(use_async_requests=True, output_dir=str(tmp_path))
        client.metric("rows", 1)
        [worker] = [t for t in threading.enumerate() if t.name == "dxtrack-worker"]
        with open(f"/proc/self/task/{worker.native_id}/status") as task:
            status = task.read()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        for signum in (signal.SIGTERM, signal.SIGINT):
            assert blocked & (1 << (signum - 1)), f"{signum!r} could land on dxtrack's thread"

    @pytest.mark.parametrize("start_method", START_METHODS)
    def test_terminate_while_blocked_in_a_lock(
        self, landing: Any, global_client: Callable[..., None], start_method: str
    ) -> None:
        global_client(buffer_metrics=True, flush_interval=3600)
        ctx = multiprocessing.get_context(start_method)
        lock = ctx.Lock()
        lock.acquire()
        try:
            readies = [ctx.Event() for _ in range(3)]
            children = [ctx.Process(target=mp_jobs.emit_then_block, args=(lock, ready, 200))
                        for ready in readies]
            for child in children:
                child.start()
            for ready in readies:  # each child has recorded (buffered) and is about to block
                assert ready.wait(30)
            for child in children:
                child.terminate()
            for child in children:
                child.join(20)
                assert child.exitcode is not None, "a terminated worker hung"
        finally:
            lock.release()
        assert_exactly_once(landing, 3 * 200, 0)

    @pytest.mark.parametrize("start_method", START_METHODS)
    def test_sigterm_the_main_thread_never_acts_on(
        self, landing: Any, global_client: Callable[..., None], start_method: str
    ) -> None:
        """dxtrack's own thread flushes and ends the child within shutdown_timeout + 1 s."""
        global_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=5)
        ctx = multiprocessing.get_context(start_method)
        ready = ctx.Event()
        child = ctx.Process(target=mp_jobs.emit_then_miss_sigterm, args=(ready, 300))
        child.start()
        assert ready.wait(30)
        child.terminate()
        child.join(5 + 1 + 10)  # shutdown_timeout + 1 s, and slack; it would sleep 120 s
        assert child.exitcode == 143  # woken, it unwound through dxtrack's handler
        assert_exactly_once(landing, 300, 0)

    def test_a_sigterm_the_program_ignored_stays_ignored(
        self, local_client: Callable[..., Callable[[], List[bytes]]]
    ) -> None:
        """Its own handler took the signal and then gave dxtrack's back: nothing happens."""
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=mp_jobs.ignore_one_sigterm_then_carry_on, args=(ready, 50))
        child.start()
        assert ready.wait(30)
        child.terminate()
        child.join(30)
        assert child.exitcode == 0
        assert len(lines()) == 100

    def test_a_grandchild_forked_from_a_thread_ends_when_terminated(
        self, local_client: Callable[..., Callable[[], List[bytes]]]
    ) -> None:
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
        child = multiprocessing.get_context("fork").Process(
            target=mp_jobs.terminate_a_grandchild_from_a_thread, args=(50,)
        )
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert len(lines()) == 100

    def test_a_grandchilds_signal_on_the_watcher_changes_nothing(
        self, local_client: Callable[..., Callable[[], List[bytes]]]
    ) -> None:
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
        child = multiprocessing.get_context("fork").Process(
            target=mp_jobs.hear_a_grandchilds_sigterm, args=(50,)
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert len(lines()) == 100

    def test_a_sigterm_held_back_during_a_fork_still_flushes(self, tmp_path: Any) -> None:
        """Its handler runs inside the after-fork hook, where SystemExit would be swallowed."""
        import mp_fork_signal

        child = multiprocessing.get_context("spawn").Process(
            target=mp_fork_signal.sigterm_during_fork, args=(str(tmp_path), 100)
        )
        child.start()
        child.join(30)
        assert child.exitcode == 143
        assert len((tmp_path / "metric.jsonl").read_bytes().splitlines()) == 100

    def test_the_bound_follows_the_latest_configure(self, tmp_path: Any) -> None:
        """Terminated after a reconfigure from shutdown_timeout 0.5 to 5: a 2 s flush lands."""
        path = str(tmp_path / "metric.jsonl")
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=mp_jobs.reconfigure_longer_then_wait, args=(ready, path, 20))
        child.start()
        assert ready.wait(30)
        child.terminate()
        child.join(30)
        assert child.exitcode == 143
        with open(path, "rb") as landed:
            assert len(landed.read().splitlines()) == 21

    def test_a_handler_the_program_installs_later_is_left_to_work(
        self, local_client: Callable[..., Callable[[], List[bytes]]]
    ) -> None:
        """dxtrack installed its handler at the first record; the program's own one wins."""
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=mp_jobs.emit_then_drain_on_own_sigterm, args=(ready, 100))
        child.start()
        assert ready.wait(30)
        child.terminate()
        child.join(30)
        assert child.exitcode == 0  # drained and returned, not ended by dxtrack
        assert len(lines()) == 200

    def test_a_terminated_grandchild_leaves_its_parent_alone(
        self, local_client: Callable[..., Callable[[], List[bytes]]]
    ) -> None:
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
        child = multiprocessing.get_context("fork").Process(
            target=mp_jobs.terminate_a_grandchild, args=(50,)
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert len(lines()) == 100

    @pytest.mark.parametrize("start_method", START_METHODS)
    def test_records_made_while_unwinding_land(
        self, local_client: Callable[..., Callable[[], List[bytes]]], start_method: str
    ) -> None:
        lines = local_client(buffer_metrics=True, flush_interval=3600, shutdown_timeout=3)
        ctx = multiprocessing.get_context(start_method)
        ready = ctx.Event()
        child = ctx.Process(target=mp_jobs.record_while_unwinding, args=(ready, 100))
        child.start()
        assert ready.wait(30)
        child.terminate()
        child.join(30)
        assert child.exitcode == 143
        assert len(lines()) == 101


class TestForkKeepsParentAndChildApart:
    """A fork neither loses nor duplicates the parent's pending records."""

    def test_parent_pending_records_land_once_after_children(
        self, landing: Any, global_client: Callable[..., None]
    ) -> None:
        global_client(buffer_metrics=True, flush_interval=3600)
        for i in range(1000):
            dxtrack.metric("parent.rows", i)
        assert dxtrack.stats()["pending"] == 1000

        ctx = multiprocessing.get_context("fork")
        children = [ctx.Process(target=mp_jobs.emit, args=((w, 100, 1),)) for w in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
            assert child.exitcode == 0

        assert dxtrack.flush_metrics_buffer(timeout=30)
        records = landing.records("metric")
        assert sorted(r["metric_name"] for r in records).count("parent.rows") == 1000
        assert len(records) == 1000 + 3 * 100
        assert len(landing.lines("error")) == 3
        assert len({r["id"] for r in records}) == len(records)

    def test_fork_under_load_does_not_deadlock(self, make_client: Any, tmp_path: Any) -> None:
        # Room for everything the hammer below records (12,000 to 24,000 queued at the peak
        # here; once, on a fresh CI machine, more than the default 100,000): a record dropped
        # as buffer_full would fail the final flush for a reason this test is not about.
        client = make_client(use_async_requests=True, output_dir=str(tmp_path),
                             max_buffer_records=2_000_000, max_buffer_bytes=1 << 30)
        stop = threading.Event()
        emitted = [0]

        def hammer() -> None:
            while not stop.is_set():
                client.metric("parent.loop", emitted[0])
                emitted[0] += 1

        thread = threading.Thread(target=hammer)
        thread.start()
        children = []
        try:
            for n in range(50):
                pid = os.fork()
                if pid == 0:  # the child: record, flush, leave without running the parent's cleanup
                    status = 1
                    try:
                        client.metric("child.rows", n)
                        status = 0 if client.flush_metrics_buffer(timeout=10) else 2
                    finally:
                        os._exit(status)
                children.append(pid)
        finally:
            stop.set()
            thread.join()

        deadline = time.monotonic() + 30
        statuses = {}
        while children and time.monotonic() < deadline:
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
                    children.remove(pid)
            time.sleep(0.01)  # polling child processes, not the worker
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        assert not children, f"{len(children)} children deadlocked"
        assert set(statuses.values()) == {0}

        assert client.flush_metrics_buffer(timeout=30)
        lines = (tmp_path / "metric.jsonl").read_bytes().splitlines()
        names = [orjson.loads(line)["metric_name"] for line in lines]
        assert names.count("child.rows") == 50
        assert names.count("parent.loop") == emitted[0]
        assert len({orjson.loads(line)["id"] for line in lines}) == len(lines)


class TestSpawnedChildrenInheritSettings:
    """spawn and forkserver children find dxtrack configured, without secrets."""

    @pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
    def test_settings_reach_children_without_secrets(self, landing: Any, start_method: str) -> None:
        ctx = multiprocessing.get_context(start_method)
        before = dict(os.environ)
        dxtrack.configure(context="pool-tests", run_id="run-1", **landing.client_options())
        try:
            assert dict(os.environ) == before, "settings travel with the process, not the env"
            with ctx.Pool(1) as pool:
                text = pool.apply(mp_jobs.inherited_settings)
            published = orjson.loads(text)
            assert published["endpoint_url"] == landing.url
            assert published["run_id"] == "run-1"
            assert published["explicit_credentials"] is True
            assert b"testing" not in text  # the moto credentials' value
            for secret in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
                assert secret not in published
        finally:
            dxtrack.close(timeout=10)
        with ctx.Pool(1) as pool:
            assert pool.apply(mp_jobs.inherited_settings) == b"null", (
                "children started after close() must not configure"
            )

    def test_settings_json_cannot_hold_are_not_handed_on(self, tmp_path: Any, caplog: Any) -> None:
        """A tuple key in default_metadata: recorded as text, but children get nothing (and
        not the previous settings), and configure() says so instead of raising."""
        options = dict(context="pool-tests", stage="test", output_dir=str(tmp_path))
        dxtrack.configure(run_id="first", **options)
        try:
            dxtrack.configure(run_id="second", default_metadata={("a", "b"): 1}, **options)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                assert pool.apply(mp_jobs.inherited_settings) == b"null"
        finally:
            dxtrack.close(timeout=10)
        assert "could not hand its settings to child processes" in caplog.text

    def test_forkserver_children_see_the_latest_configure(self, tmp_path: Any) -> None:
        """The forkserver keeps the environment it started with; settings still follow."""
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(1) as pool:  # starts the forkserver (if not yet) before any configure()
            pool.apply(os.getpid)
        options = dict(context="pool-tests", stage="test", output_dir=str(tmp_path))
        dxtrack.configure(run_id="first", **options)
        with ctx.Pool(1) as pool:
            assert pool.apply(mp_jobs.configured_run_id) == "first"
        dxtrack.configure(run_id="second", **options)
        try:
            with ctx.Pool(1) as pool:
                run_id = pool.apply(mp_jobs.configured_run_id)
        finally:
            dxtrack.close(timeout=10)
        assert run_id == "second"

    @pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
    def test_explicit_keys_reach_workers_through_an_initializer(
        self, landing: Any, start_method: str
    ) -> None:
        """The documented line for users who pass keys to configure()."""
        settings = dict(context="pool-tests", run_id="run-1", use_async_requests=True,
                        **landing.client_options())
        dxtrack.configure(**settings)
        try:
            ctx = multiprocessing.get_context(start_method)
            with ctx.Pool(2, initializer=mp_jobs.configure_worker, initargs=(settings,)) as pool:
                pool.map(mp_jobs.emit, [(w, 300, 1) for w in range(2)])
        finally:
            dxtrack.close(timeout=10)
        assert_exactly_once(landing, 600, 2)

    def test_without_keys_a_spawned_child_records_nothing_and_says_why(
        self, landing: Any, tmp_path: Any
    ) -> None:
        dxtrack.configure(context="pool-tests", run_id="run-1", **landing.client_options())
        try:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                stats = pool.apply(mp_jobs.emit_and_report, ((0, 10, 0),))
        finally:
            dxtrack.close(timeout=10)
        assert stats["dropped"].get("not_configured") == 10
        assert landing.lines("metric") == []


class TestIndependentClientsInChildren:
    """A DXTrack of the user's own is fork-safe too."""

    def test_forked_child_sends_its_own_records_only(self, make_client: Any, tmp_path: Any) -> None:
        client = make_client(buffer_metrics=True, flush_interval=3600, output_dir=str(tmp_path))
        for i in range(10):
            client.metric("parent.rows", i)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                client.metric("child.rows", 1)
                status = 0 if client.flush_metrics_buffer(timeout=10) else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.flush_metrics_buffer(timeout=10)
        names = [orjson.loads(line)["metric_name"]
                 for line in (tmp_path / "metric.jsonl").read_bytes().splitlines()]
        assert sorted(names) == ["child.rows"] + ["parent.rows"] * 10


class TestNothingLeftBehind:
    """Importing dxtrack changes nothing; a configured process killed hard leaves nothing."""

    def test_import_leaves_the_environment_alone(self, tmp_path: Any) -> None:
        code = ("import os; before = dict(os.environ); import dxtrack; "
                "assert dict(os.environ) == before, sorted(set(os.environ) ^ set(before))")
        env = {name: value for name, value in os.environ.items() if not name.startswith("DXTRACK_")}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stderr

    def test_kill_9_leaves_no_file(self, tmp_path: Any) -> None:
        temp = tmp_path / "tmp"
        temp.mkdir()
        job = tmp_path / "job.py"
        job.write_text(textwrap.dedent("""
            import multiprocessing, sys, time
            from dxtrack import dxtrack
            if __name__ == "__main__":
                dxtrack.configure(stage="test", context="killed", run_id="r1",
                                  output_dir=sys.argv[1], buffer_metrics=True)
                dxtrack.metric("rows", 1)
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    pool.apply(len, ("ready",))
                    print("configured", flush=True)
                    time.sleep(60)
        """))
        env = {**os.environ, "TMPDIR": str(temp)}
        child = subprocess.Popen([sys.executable, str(job), str(tmp_path / "out")], env=env,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "configured\n"
        finally:
            child.kill()
            child.wait(30)
        leftovers = [path.name for path in temp.iterdir()]
        assert not [name for name in leftovers if "dxtrack" in name], leftovers
