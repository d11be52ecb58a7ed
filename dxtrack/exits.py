"""The end of a process: every live pipeline is flushed, within its ``shutdown_timeout``.

Three ways out, each hook set up once per process: interpreter exit, an ``atexit`` hook
(test_exit); a ``multiprocessing`` child's exit, which skips ``atexit`` (fork and forkserver
children end with ``os._exit``), a finalizer registered when it first records
(test_processes); SIGTERM, dxtrack's handler (:mod:`dxtrack.signals`), installed from the main
thread where SIGTERM is at its default and ``handle_sigterm`` is on, and given back when the
last pipeline closes (test_sigterm).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from typing import TYPE_CHECKING, Dict

from . import signals
from .records import ERROR, METRIC
from .worker import quantity

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["after_fork_in_child", "close_all", "prepare", "track", "untrack"]

_live: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_lock = threading.Lock()
_finalizer = False   # this process registered its child-exit finalizer
_handler = False     # this process installed (or declined to install) the SIGTERM handler


def track(pipeline: Pipeline) -> None:
    """Flush ``pipeline`` when the process ends, until :func:`untrack`."""
    with _lock:
        _live.add(pipeline)


def untrack(pipeline: Pipeline) -> None:
    """``pipeline`` is closed; with none left, SIGTERM gets its default back."""
    global _handler
    with _lock:
        _live.discard(pipeline)
        last = not _live
    if last and signals.release_sigterm():
        _handler = False


def prepare(handle_sigterm: bool) -> None:
    """Make sure this process flushes when it ends; cheap after the first call. Called when a
    pipeline is created and when its worker starts (a child process records from a worker
    thread first, and only the main thread may install a handler)."""
    global _finalizer, _handler
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not handle_sigterm and _handler and signals.release_sigterm():
        _handler = False  # a configure() that asks dxtrack to leave signals alone
    if _finalizer and (_handler or not on_main_thread or not handle_sigterm):
        return
    with _lock:
        if not _finalizer:
            _finalizer = True
            if signals.in_child_process():
                from multiprocessing import util

                util.Finalize(None, close_all, exitpriority=100)
        if not _handler and on_main_thread and handle_sigterm:
            _handler = True
            signals.install_sigterm_handler(_grace, close_all, _unsent)


def after_fork_in_child() -> None:
    """Called by :mod:`dxtrack.forks`: the child registers its own finalizer and handler."""
    global _lock, _finalizer, _handler
    _lock = threading.Lock()
    _finalizer = _handler = False


def close_all() -> None:
    """Close every live pipeline, all within the longest ``shutdown_timeout``."""
    pipelines = list(_live)
    if not pipelines:
        return
    signals.mark_exiting()
    deadline = time.monotonic() + max(p.config.shutdown_timeout for p in pipelines)
    for pipeline in pipelines:
        remaining = min(pipeline.config.shutdown_timeout, deadline - time.monotonic())
        with contextlib.suppress(Exception):  # never let exit fail because of telemetry
            pipeline.close(max(0.0, remaining))


def _grace() -> float:
    """One grace after a SIGTERM: the longest shutdown_timeout, plus one second. The main
    thread gets one to unwind, the flush one more (see signals._UnwindOnSigterm)."""
    return max((p.config.shutdown_timeout for p in list(_live)), default=0.0) + 1.0


def _unsent() -> str:
    """What every live pipeline still holds, read without a lock (one may be held)."""
    counts: Dict[str, int] = {METRIC: 0, ERROR: 0}
    for pipeline in list(_live):
        for name, count in pipeline.buffer.unsettled().items():
            counts[name] += count
    return (f"{quantity(counts[METRIC], METRIC)} and {quantity(counts[ERROR], ERROR)} "
            "were not delivered")


# At import, not at the first configure(): atexit runs its hooks last-registered first, and a
# hook the program registered before configure() may still record (test_exit).
atexit.register(close_all)
