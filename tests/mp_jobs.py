"""Jobs that test processes run; importable by spawned and forkserver children."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import orjson

from dxtrack import dxtrack


class JobError(Exception):
    """Raised and reported by the jobs below."""


def emit(args: Tuple[int, int, int]) -> int:
    """Record ``metrics`` metrics and ``errors`` errors as worker ``worker``; returns the count."""
    worker, metrics, errors = args
    for i in range(metrics):
        dxtrack.metric("mp.rows", i, metadata={"worker": worker, "pid": os.getpid()})
    for i in range(errors):
        try:
            raise JobError(f"worker {worker} error {i}")
        except JobError:
            dxtrack.error(metadata={"worker": worker})
    return metrics + errors


def emit_star(worker: int, metrics: int, errors: int) -> int:
    return emit((worker, metrics, errors))


def configure_worker(settings: Dict[str, Any]) -> None:
    """A pool initializer: configure dxtrack in the worker, with credentials passed explicitly."""
    dxtrack.configure(**settings)


def emit_and_report(args: Tuple[int, int, int]) -> Dict[str, Any]:
    """Run :func:`emit`, then return this process's dxtrack counters."""
    emit(args)
    return dxtrack.stats()


def configured_run_id() -> Any:
    """Record one metric (adopting the parent's settings if needed); return the run_id in use."""
    dxtrack.metric("mp.probe", 1)
    return dxtrack.config.run_id if dxtrack.config else None


def inherited_settings() -> bytes:
    """What this child inherited from its parent, as JSON (``null``: nothing)."""
    from dxtrack import inherit

    return orjson.dumps(inherit.inherited())


def emit_then_block(lock: Any, ready: Any, metrics: int) -> None:
    """Record, say so, then wait on ``lock`` as an idle pool worker waits on its task queue."""
    for i in range(metrics):
        dxtrack.metric("mp.blocked", i)
    ready.set()
    with lock:  # held by the parent until it gives up on us
        pass


def emit_then_miss_sigterm(ready: Any, metrics: int) -> None:
    """Record, then sleep where a SIGTERM cannot wake the main thread.

    The main thread blocks SIGTERM and sleeps; another thread has it
    unblocked, so the kernel hands the signal to that thread: Python's
    handler is due, but the main thread never runs it. This is what a pool
    worker looks like when a SIGTERM lands just before it blocks on its task
    queue.
    """
    import signal
    import threading
    import time

    for i in range(metrics):
        dxtrack.metric("mp.missed", i)
    idle = threading.Event()
    threading.Thread(target=idle.wait, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready.set()
    time.sleep(120)


def emit_then_drain_on_own_sigterm(ready: Any, metrics: int) -> None:
    """Record, then install a SIGTERM handler of the program's own, which drains gracefully."""
    import signal
    import threading
    import time

    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    ready.set()
    stop.wait(60)
    time.sleep(1.5)  # draining takes a while: longer than dxtrack waits before it acts
    for i in range(metrics):  # the drain records too, after the signal
        dxtrack.metric("mp.drained", i)


def _sleep_long() -> None:
    import time

    time.sleep(60)


def terminate_a_grandchild(metrics: int) -> None:
    """Record, start and terminate a forked child of our own, then record some more."""
    import multiprocessing
    import time

    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    grandchild = multiprocessing.get_context("fork").Process(target=_sleep_long)
    grandchild.start()
    grandchild.terminate()
    grandchild.join(30)
    assert grandchild.exitcode is not None
    time.sleep(1.5)  # working on, longer than dxtrack's grace for a main thread
    for i in range(metrics):
        dxtrack.metric("mp.after", i)


def record_while_unwinding(ready: Any, metrics: int) -> None:
    """Block; when SIGTERM unwinds us, record in a ``finally`` on the way out."""
    import threading
    import time

    dxtrack.metric("mp.started", 1)
    try:
        ready.set()
        threading.Event().wait(60)
    finally:
        time.sleep(0.05)
        for i in range(metrics):
            dxtrack.metric("mp.unwinding", i)


def ignore_one_sigterm_then_carry_on(ready: Any, metrics: int) -> None:
    """Record; ignore a SIGTERM with a handler of our own, put dxtrack's back, work on."""
    import signal
    import threading
    import time

    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    got = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.set())
    ready.set()
    got.wait(60)
    signal.signal(signal.SIGTERM, previous)  # dxtrack's handler is back
    time.sleep(1.5)  # still working, in a C call, past dxtrack's grace
    for i in range(metrics):
        dxtrack.metric("mp.after", i)


def terminate_a_grandchild_from_a_thread(metrics: int) -> None:
    """Like terminate_a_grandchild, forking from a thread (as Pool does for new workers)."""
    import multiprocessing
    import threading

    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    exit_codes = []

    def fork_and_terminate() -> None:
        grandchild = multiprocessing.get_context("fork").Process(target=_sleep_long)
        grandchild.start()
        grandchild.terminate()
        grandchild.join(20)
        exit_codes.append(grandchild.exitcode)
        if grandchild.exitcode is None:
            grandchild.kill()

    thread = threading.Thread(target=fork_and_terminate)
    thread.start()
    thread.join(30)
    assert exit_codes and exit_codes[0] is not None, "the terminated grandchild slept on"
    for i in range(metrics):
        dxtrack.metric("mp.after", i)


def hear_a_grandchilds_sigterm(metrics: int) -> None:
    """A SIGTERM byte from another process reaches our watcher (as in the instant after a
    fork, before the child's fork hook): we must carry on."""
    import signal
    import time

    from dxtrack import signals

    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    assert signals._wakeup is not None, "no watcher in this child"
    writer = os.dup(signals._wakeup[1])
    pid = os.fork()
    if pid == 0:
        os.write(writer, bytes([signal.SIGTERM]))
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(writer)
    time.sleep(1.5)
    for i in range(metrics):
        dxtrack.metric("mp.after", i)


class SlowFileSink:
    """Writes lines to a file, taking ``delay`` seconds per batch."""

    max_batch_lines, max_batch_bytes = 500, 4 * 1024 * 1024

    def __init__(self, path: str, delay: float) -> None:
        self.path, self.delay = path, delay

    def send(self, stream: str, lines: Any) -> None:
        import time

        time.sleep(self.delay)
        with open(self.path, "ab") as out:
            out.writelines(lines)

    def close(self) -> None:
        pass


def reconfigure_longer_then_wait(ready: Any, path: str, metrics: int) -> None:
    """Record under a short shutdown_timeout, reconfigure with a longer one and a slow sink."""
    import threading

    dxtrack.configure(stage="test", context="c", run_id="r", shutdown_timeout=0.5,
                      buffer_metrics=True, flush_interval=3600, sink=SlowFileSink(path, 0))
    dxtrack.metric("mp.first", 1)  # the SIGTERM handler is installed now
    dxtrack.configure(stage="test", context="c", run_id="r", shutdown_timeout=5,
                      buffer_metrics=True, flush_interval=3600, sink=SlowFileSink(path, 2.0))
    for i in range(metrics):
        dxtrack.metric("mp.slow", i)
    ready.set()
    threading.Event().wait(60)


def sigterm_while_finalizers_run(output_dir: str, metrics: int) -> None:
    """Record buffered metrics, then arrange a SIGTERM while ``multiprocessing`` runs its
    exit finalizers, before dxtrack's (a higher exit priority runs first): the moment
    ``Pool.terminate()`` hits in practice when a worker is already on its way out."""
    import multiprocessing.util
    import signal

    dxtrack.configure(stage="test", context="c", run_id="r", output_dir=output_dir,
                      buffer_metrics=True, flush_interval=3600, shutdown_timeout=5)
    for i in range(metrics):
        dxtrack.metric("mp.finalizers", i)
    multiprocessing.util.Finalize(
        None, os.kill, args=(os.getpid(), signal.SIGTERM), exitpriority=200
    )


def emit_buffered(count: int) -> int:
    """Record ``count`` metrics in whatever mode the inherited client is in; returns the pid."""
    for i in range(count):
        dxtrack.metric("pool.rows", i, metadata={"pid": os.getpid()})
    return os.getpid()
