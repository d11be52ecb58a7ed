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
  dxtrack points the signal module's wakeup file descriptor at a pipe read by
  a small thread of its own. When a SIGTERM arrives while dxtrack's handler is
  still the one installed and the main thread has not run it within
  :data:`MAIN_THREAD_GRACE`, that thread flushes every pipeline itself (within
  ``shutdown_timeout``) and ends the process. It does nothing when the main
  thread acted, when the program has installed a handler of its own since, or
  when the program uses the wakeup descriptor itself (asyncio's signal
  handling does). The pipe is a Unix datagram socket whose reader learns the
  sending process from the kernel (``SO_PASSCRED``), so a signal to a forked
  child, which shares the socket until its fork hook runs, is never taken for
  one to this process; without ``SO_PASSCRED`` (outside Linux) there is no
  watcher and the handler works alone.
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
import socket
import struct
import sys
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Tuple

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
_wakeup: Optional[Tuple[socket.socket, socket.socket]] = None  # (reader, writer) of the watcher
_inherited_wakeup: Optional[int] = None  # a parent's writer's descriptor, aimed at /dev/null
_sigterm_seen = threading.Event()           # dxtrack's SIGTERM handler ran in this process

#: Seconds the main thread has to run dxtrack's SIGTERM handler before dxtrack's own
#: thread flushes and ends the process for it.
MAIN_THREAD_GRACE = 1.0


def _after_fork_in_child() -> None:
    global _prepare_lock, _sigterm_seen, _wakeup, _inherited_wakeup, _handler_across_fork
    _handler_across_fork = None  # the child keeps the default until it installs its own
    _prepare_lock = threading.Lock()
    _sigterm_seen = threading.Event()
    if _wakeup is not None:
        # The signal module still writes to the parent's socket: aim that descriptor at
        # /dev/null, so this process's signals stop reaching the parent. (No logging here.)
        reader, writer = _wakeup
        _wakeup = None
        try:
            reader.close()
            descriptor = writer.detach()  # the signal module still uses the number
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, descriptor)
            os.close(null)
            _inherited_wakeup = descriptor
        except OSError:  # pragma: no cover - nothing better to do in a fork hook
            pass


_handler_across_fork: Any = None  # dxtrack's handler, set aside while a fork happens


def _before_fork() -> None:
    """Fork with SIGTERM at its default, then put dxtrack's handler back in the parent.

    A signal that reaches a child between ``fork()`` and Python's own
    after-fork bookkeeping is caught by an inherited Python handler and then
    forgotten: a child terminated at once would sleep on. With the default
    disposition it simply ends, as it would without dxtrack; a child that
    records installs a handler of its own.
    """
    global _handler_across_fork
    _handler_across_fork = None
    try:
        current = signal.getsignal(signal.SIGTERM)
        if isinstance(current, _UnwindOnSigterm):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _handler_across_fork = current
    except ValueError:  # forking from a thread other than the main one: leave it
        pass


def _after_fork_in_parent() -> None:
    global _handler_across_fork
    if _handler_across_fork is not None:
        signal.signal(signal.SIGTERM, _handler_across_fork)
        _handler_across_fork = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


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


class _UnwindOnSigterm:
    """dxtrack's SIGTERM handler; a class, so a forked child knows an inherited one as ours."""

    def __init__(self, grace: float) -> None:
        self.grace = grace

    def __call__(self, signum: int, frame: Any) -> None:
        _sigterm_seen.set()
        if _exiting:
            return  # already flushing at exit: let it finish within its bound
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        watchdog = threading.Timer(self.grace, os._exit, args=(SIGTERM_STATUS,))
        watchdog.daemon = True
        watchdog.start()
        raise SystemExit(SIGTERM_STATUS)


def _install_sigterm_handler(grace: float, close_all: Callable[[], None]) -> None:
    """Only from the main thread, the one place Python lets a handler be set."""
    try:
        current = signal.getsignal(signal.SIGTERM)
    except ValueError:  # pragma: no cover - no SIGTERM on this platform
        return
    if current is not signal.SIG_DFL and not isinstance(current, _UnwindOnSigterm):
        return  # the user's (or a framework's) handler: leave it alone
    handler = _UnwindOnSigterm(grace)
    signal.signal(signal.SIGTERM, handler)
    _watch_for_sigterm(handler, close_all)


def _watch_for_sigterm(handler: _UnwindOnSigterm, close_all: Callable[[], None]) -> None:
    """Start the thread that acts on SIGTERM when the main thread cannot.

    Changes nothing when the wakeup descriptor is the program's, cannot be
    set, or the platform cannot tell who wrote to it.
    """
    global _wakeup, _inherited_wakeup
    if not hasattr(socket, "SO_PASSCRED"):
        return
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        writer.setblocking(False)  # the C signal handler must never block on it
        previous: Optional[int] = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous is None or previous not in (-1, _inherited_wakeup):
        if previous is not None:
            signal.set_wakeup_fd(previous)  # in use by the program: give it back
        reader.close()
        writer.close()
        return
    if previous == _inherited_wakeup and previous is not None:
        os.close(previous)
        _inherited_wakeup = None
    _wakeup = (reader, writer)
    watcher = threading.Thread(
        target=_watch, args=(reader, handler, close_all), name="dxtrack-sigterm", daemon=True
    )
    watcher.start()


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def _watch(
    reader: socket.socket, handler: _UnwindOnSigterm, close_all: Callable[[], None]
) -> None:
    block_signals_in_this_thread()
    me = os.getpid()
    while True:
        try:
            data, ancillary, _, _ = reader.recvmsg(64, socket.CMSG_SPACE(_UCRED.size))
        except InterruptedError:  # pragma: no cover - its signals are blocked
            continue
        except OSError:  # pragma: no cover - the socket is gone
            return
        sender = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = _UCRED.unpack(payload[: _UCRED.size])[0]
        if sender != me:  # a forked child's signal, before its fork hook took the socket away
            continue
        if signal.SIGTERM in data and _main_thread_missed(handler):
            try:
                close_all()  # bounded by shutdown_timeout, like the exit path
            finally:
                os._exit(SIGTERM_STATUS)


def _main_thread_missed(handler: _UnwindOnSigterm) -> bool:
    """dxtrack's handler is due, and the main thread has not run it within the grace period."""
    if signal.getsignal(signal.SIGTERM) is not handler:
        return False  # the program's own handler now, or ours ran already (SIG_DFL)
    if _sigterm_seen.wait(MAIN_THREAD_GRACE):
        return False  # the main thread is unwinding; the handler's watchdog bounds it
    return signal.getsignal(signal.SIGTERM) is handler and not _exiting


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
