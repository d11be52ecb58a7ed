"""Processes: forks, child processes that end, and spawned children's settings.

What dxtrack does so that records survive ``multiprocessing``:

- **fork**: an ``os.register_at_fork`` hook gives every pipeline in the child
  fresh locks, an empty buffer and no worker; the parent's pending records
  stay the parent's to send. The hook logs nothing (the logging lock may have
  been held by another thread at fork time).
- **children that end**: the atexit hook does not run in a child started by
  fork or forkserver (it ends with ``os._exit``), but
  ``multiprocessing``'s own exit function does run the finalizers registered
  in the child. When a child sends its first record, dxtrack registers one
  that flushes, bounded by ``shutdown_timeout``.
- **terminated pool workers**: ``with Pool() as pool:`` ends with
  ``terminate()``, a SIGTERM to each worker. In a child process whose SIGTERM
  is still the default, dxtrack installs a handler that raises ``SystemExit``
  (status 143) so the process unwinds through that same exit function and
  flushes; a second SIGTERM, or the bound passing, ends it at once. A handler
  the user installed is left alone.
- **a SIGTERM the main thread cannot act on**: Python runs a handler only when
  the main thread runs again, and a pool worker's main thread can sleep
  forever in a C call that missed the signal (the signal landed between
  ``SemLock``'s non-blocking try and its blocking wait). So with the handler
  dxtrack also points the signal module's wakeup file descriptor at a pipe
  read by a small thread of its own: on SIGTERM that thread flushes every
  pipeline itself, within the same bound, and ends the process when the bound
  passes if the main thread has not ended it first. When the program already
  uses the wakeup descriptor (asyncio's signal handling does), dxtrack keeps
  out of it and relies on the handler alone.
- **spawn and forkserver**: a child imports the program afresh, so the
  ready-made ``dxtrack`` client publishes its settings when it is configured
  (a private file named by the environment variable :data:`INHERIT_ENV`), and
  an unconfigured ``dxtrack`` in a child process configures itself from them
  on first use. Secrets are never written there.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional

import orjson

from .config import Config

__all__ = [
    "INHERIT_ENV", "block_signals_in_this_thread", "export_settings", "inherited_settings",
    "prepare_process",
    "reserve_settings_path", "withdraw_settings",
]

#: The environment variable through which child processes inherit settings.
INHERIT_ENV = "DXTRACK_INHERITED_SETTINGS"

#: Exit status of a child that dxtrack let unwind after a SIGTERM (as shells report it).
SIGTERM_STATUS = 128 + int(signal.SIGTERM)

_NOT_INHERITED = frozenset(
    {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "sink"}
)

_settings_path: Optional[str] = None   # the file this process publishes its settings in
_settings_owner: Optional[int] = None  # ... and the process it belongs to
_finalizer_pid: Optional[int] = None  # the process whose exit finalizer is registered
_handler_pid: Optional[int] = None    # the process whose SIGTERM handler was considered
_prepare_lock = threading.Lock()
_exiting = False
_wakeup_fd: Optional[int] = None      # the write end dxtrack gave signal.set_wakeup_fd


def _after_fork_in_child() -> None:
    global _prepare_lock
    _prepare_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def in_child_process() -> bool:
    """Whether this process was started by ``multiprocessing`` (any start method)."""
    mp = sys.modules.get("multiprocessing")
    return mp is not None and mp.parent_process() is not None


def prepare_process(close_all: Callable[[], None], grace: float) -> None:
    """Make sure a child process flushes when it ends; cheap after the first call.

    Called when a worker thread starts. ``close_all`` closes every live
    pipeline within its own bounds; ``grace`` bounds a terminated child's
    flush before it is ended hard. The main process needs nothing: atexit runs.
    """
    global _finalizer_pid, _handler_pid
    pid = os.getpid()
    on_main_thread = threading.current_thread() is threading.main_thread()
    if _finalizer_pid == pid and (_handler_pid == pid or not on_main_thread):
        return
    if not in_child_process():
        _finalizer_pid = _handler_pid = pid
        return
    with _prepare_lock:
        if _finalizer_pid != pid:
            _finalizer_pid = pid
            from multiprocessing import util

            def flush_at_child_exit() -> None:
                global _exiting
                _exiting = True
                close_all()
                _remove_settings_file(pid)  # published by a configure() in this child

            util.Finalize(None, flush_at_child_exit, exitpriority=100)
        if _handler_pid != pid and on_main_thread:
            _handler_pid = pid
            _install_sigterm_handler(grace, close_all)


#: Signals a program may handle; dxtrack's threads never take them (see below).
_ASYNC_SIGNALS = frozenset(
    getattr(signal, name) for name in (
        "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
        "SIGWINCH", "SIGPIPE",
    ) if hasattr(signal, name)
)


def block_signals_in_this_thread() -> None:
    """Keep signals away from a dxtrack thread, so the kernel delivers them to the main one.

    Python runs signal handlers in the main thread, but only once that thread
    runs again: a SIGTERM that lands on a background thread leaves a main
    thread blocked in a C call (a pool worker waiting on its task queue)
    asleep, and its handler never runs. Called first thing in the worker.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


def _install_sigterm_handler(grace: float, close_all: Callable[[], None]) -> None:
    """Only from the main thread, the one place Python lets a handler be set."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the user's (or a framework's) handler: leave it alone
    except ValueError:  # pragma: no cover - no SIGTERM on this platform
        return
    watched = _watch_for_sigterm(grace, close_all)

    def unwind_on_sigterm(signum: int, frame: Any) -> None:
        if _exiting:
            return  # already flushing at exit: let it finish within its bound
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        if not watched:  # the watcher enforces the bound when there is one
            watchdog = threading.Timer(grace, os._exit, args=(SIGTERM_STATUS,))
            watchdog.daemon = True
            watchdog.start()
        raise SystemExit(SIGTERM_STATUS)

    signal.signal(signal.SIGTERM, unwind_on_sigterm)


def _watch_for_sigterm(grace: float, close_all: Callable[[], None]) -> bool:
    """Start the thread that acts on SIGTERM even when the main thread cannot.

    Returns False, changing nothing, when the wakeup descriptor is someone
    else's or cannot be set.
    """
    global _wakeup_fd
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C signal handler must never block on it
    try:
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous is None or previous not in (-1, _wakeup_fd):
        if previous is not None:
            signal.set_wakeup_fd(previous)  # in use by the program: give it back
        os.close(read_end)
        os.close(write_end)
        return False
    _wakeup_fd = write_end  # (one inherited from a parent process is simply replaced)
    watcher = threading.Thread(
        target=_end_on_sigterm, args=(read_end, grace, close_all),
        name="dxtrack-sigterm", daemon=True,
    )
    watcher.start()
    return True


def _end_on_sigterm(read_end: int, grace: float, close_all: Callable[[], None]) -> None:
    block_signals_in_this_thread()
    while True:
        try:
            received = os.read(read_end, 512)
        except InterruptedError:  # pragma: no cover - its signals are blocked
            continue
        if not received:  # pragma: no cover - the write end is never closed
            return
        if signal.SIGTERM in received:
            break
    deadline = time.monotonic() + grace
    try:
        close_all()  # the same bounded close the exit path runs; whoever is second waits
    finally:
        time.sleep(max(0.0, deadline - time.monotonic()))  # the main thread's chance to end
        os._exit(SIGTERM_STATUS)


def reserve_settings_path() -> None:
    """Name the settings file now, so that children started before ``configure()`` find it.

    Called when the ready-made client is created, at import. A forkserver
    keeps the environment it was started with; with the name already there,
    its children read the settings as they are when they first record. A
    process that inherited a name from its parent keeps it until it publishes
    settings of its own.
    """
    if INHERIT_ENV not in os.environ:
        with _prepare_lock:
            _claim_settings_path()


def _claim_settings_path() -> str:
    global _settings_path, _settings_owner
    pid = os.getpid()
    if _settings_owner != pid or _settings_path is None:
        name = f"dxtrack-settings-{pid}-{secrets.token_hex(8)}.json"
        _settings_path = os.path.join(tempfile.gettempdir(), name)
        _settings_owner = pid
        atexit.register(_remove_settings_file, pid)
    os.environ[INHERIT_ENV] = _settings_path
    return _settings_path


def export_settings(config: Config) -> None:
    """Publish ``config``'s non-secret settings for child processes.

    They go to a file private to this process (mode 0600, an unguessable name),
    rewritten at each ``configure()``, whose path is in :data:`INHERIT_ENV`.
    """
    settings: Dict[str, Any] = {}
    for name in Config.__dataclass_fields__:
        if name not in _NOT_INHERITED:
            settings[name] = getattr(config, name)
    settings["output_dir"] = os.path.abspath(os.fspath(config.output_dir))
    settings["explicit_credentials"] = config.aws_access_key_id is not None
    data = orjson.dumps(settings, default=str, option=orjson.OPT_NON_STR_KEYS)
    with _prepare_lock:
        path = _claim_settings_path()
        staging = f"{path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(staging, path)  # readers see the old settings or the new, never half


def withdraw_settings() -> None:
    """Children started from now on find no settings (the file's name stays reserved)."""
    if _settings_owner == os.getpid() and _settings_path is not None:
        try:
            os.unlink(_settings_path)
        except OSError:
            pass


def _remove_settings_file(owner: int) -> None:
    if owner == os.getpid():
        withdraw_settings()


def inherited_settings() -> Optional[Dict[str, Any]]:
    """The settings a parent published, in a child process; None elsewhere."""
    path = os.environ.get(INHERIT_ENV)
    if not path or not in_child_process():
        return None
    try:
        with open(path, "rb") as published:
            settings = orjson.loads(published.read())
    except (OSError, orjson.JSONDecodeError):
        return None  # the parent closed its client, or has ended
    return settings if isinstance(settings, dict) else None
