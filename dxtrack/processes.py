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
- **SIGTERM**: ``with Pool() as pool:`` ends with ``terminate()``, a SIGTERM
  to each worker; ``docker stop``, Kubernetes and systemd send one to the main
  process. Where SIGTERM is still the default (and ``handle_sigterm`` is on),
  dxtrack installs a handler that starts a non-daemon thread, which flushes
  once the main thread has unwound, and raises ``SystemExit`` (status 143).
  Interpreter exit and ``multiprocessing``'s child exit both join non-daemon
  threads, so the flush happens even when the SIGTERM lands while
  ``multiprocessing`` runs its finalizers (where the ``SystemExit`` aborts
  those still to run, dxtrack's among them). A second SIGTERM ends the main
  process at once; a child ignores it while it flushes (a SIGTERM to the
  process group reaches a pool worker twice). Two graces end the process
  whatever happens. A handler the user installed is left alone; the default
  comes back when the last client closes.
- **a SIGTERM the main thread has not acted on**: Python runs a handler only
  when the main thread runs bytecode again, and a pool worker's main thread
  can sleep forever in a C call that missed the signal (it landed between
  ``SemLock``'s non-blocking try and its blocking wait, which then never
  returns). So with the handler dxtrack points the signal module's wakeup
  file descriptor at a pipe read by a small thread of its own. When a SIGTERM
  arrives while dxtrack's handler is installed and the main thread has not
  run it within :data:`NUDGE_AFTER`, that thread sends the main thread a
  SIGURG, for which dxtrack installed a handler that does nothing: the
  interrupted wait returns, Python runs the handlers that are due, and the
  worker unwinds as usual. A SIGURG only wakes the main thread; it never ends
  a process, so a SIGTERM the program ignored stays ignored. The watcher
  stands aside when the program uses the wakeup descriptor or SIGURG itself.
- **forks**: a process with dxtrack's SIGTERM handler blocks SIGTERM in the
  forking thread across ``fork()``. The child sets SIGTERM back to its
  default before unblocking it (a child that records installs its own
  handler), so a child terminated at once ends at once: with an inherited
  Python handler, a signal that arrives before Python's after-fork
  bookkeeping is forgotten and the child sleeps on. The parent's handler
  never changes; a SIGTERM to the parent meanwhile waits until the fork is
  done, and its handler, which then runs inside the after-fork hook (where a
  ``SystemExit`` would be swallowed), flushes from a thread and ends the
  process instead of unwinding it.
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
from typing import Any, Callable, Dict, Optional, Tuple

import orjson

from .config import Config

__all__ = [
    "INHERIT_ENV", "block_signals_in_this_thread", "export_settings", "inherited_settings",
    "hold_signals", "mark_exiting", "prepare_process", "release_signals", "release_sigterm",
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
_wakeup: Optional[Tuple[int, int]] = None  # (read end, write end) given to set_wakeup_fd
_inherited_wakeup: Optional[int] = None    # a parent's write end, aimed at /dev/null
_sigterm_seen = threading.Event()           # dxtrack's SIGTERM handler ran in this process
_fork_masks = threading.local()             # each forking thread's signal mask before fork

#: Seconds the main thread has to run dxtrack's SIGTERM handler before it is woken.
NUDGE_AFTER = 0.5
#: How many times it is woken at most, NUDGE_AFTER apart.
NUDGES = 3
#: The signal that wakes it: ignored by default, so a stray one changes nothing.
NUDGE_SIGNAL = getattr(signal, "SIGURG", None)


def _before_fork() -> None:
    # Keep a SIGTERM away from the child until it has set SIGTERM back to its default.
    if isinstance(_current_sigterm_handler(), _UnwindOnSigterm):
        _fork_masks.saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_in_parent() -> None:
    saved = getattr(_fork_masks, "saved", None)
    if saved is not None:
        try:
            # A SIGTERM held back during the fork runs its handler in here, where an
            # exception would be swallowed: the handler sees `saved` and acts without one.
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        finally:
            _fork_masks.saved = None


def _in_fork_hook() -> bool:
    return getattr(_fork_masks, "saved", None) is not None


def _after_fork_in_child() -> None:
    # No logging here: the logging lock may have been held by another thread at fork time.
    global _prepare_lock, _sigterm_seen, _wakeup, _inherited_wakeup, _fork_masks, _exiting
    global _held_mask
    _exiting = False
    _held_mask = None  # the mask itself is inherited: the forking thread restores its own
    saved = getattr(_fork_masks, "saved", None)
    _fork_masks = threading.local()
    if saved is not None:
        # First, and whatever a pending handler raises meanwhile: SIGTERM back to its
        # default, then unblocked (a SIGTERM that came during the fork ends the child now).
        try:
            for _ in range(3):  # signal.signal() runs pending handlers first, which may raise
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forking thread is main
                    break
                except BaseException:  # noqa: BLE001 - nothing may stop the unblocking below
                    continue
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, saved)
            except BaseException:  # noqa: BLE001
                pass
    _prepare_lock = threading.Lock()
    _sigterm_seen = threading.Event()
    if _wakeup is not None:
        # The signal module still writes to the parent's pipe: aim that descriptor at /dev/null,
        # so this process's signals stop reaching the parent's watcher.
        read_end, write_end = _wakeup
        _wakeup = None
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, write_end, inheritable=False)
            os.close(null)
            os.close(read_end)
            _inherited_wakeup = write_end
        except OSError:  # pragma: no cover - nothing better to do in a fork hook
            pass


def _current_sigterm_handler() -> Any:
    try:
        return signal.getsignal(signal.SIGTERM)
    except ValueError:  # pragma: no cover - no SIGTERM on this platform
        return None


if hasattr(os, "register_at_fork"):
    if hasattr(signal, "pthread_sigmask"):
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
    else:  # pragma: no cover - fork without thread signal masks
        os.register_at_fork(after_in_child=_after_fork_in_child)


def in_child_process() -> bool:
    """Whether this process was started by ``multiprocessing`` (any start method)."""
    mp = sys.modules.get("multiprocessing")
    return mp is not None and mp.parent_process() is not None


def _nothing_known() -> str:
    return "records still unsent are lost"


#: Says what the live clients have not delivered, without taking a lock (see pipeline).
_unsent: Callable[[], str] = _nothing_known


def prepare_process(
    close_all: Callable[[], None], grace: Callable[[], float], handle_sigterm: bool = True,
    unsent: Optional[Callable[[], str]] = None,
) -> None:
    """Make sure this process flushes when it ends; cheap after the first call.

    Called when a pipeline is created and when its worker starts.
    ``close_all`` closes every live pipeline within its own bounds;
    ``grace()``, asked when a SIGTERM comes, bounds the flush before the
    process is ended hard. In a child process, a ``multiprocessing``
    finalizer flushes on the normal way out (atexit does not run there). In
    any process, from its main thread and with ``handle_sigterm``, a SIGTERM
    left at its default gets dxtrack's handler (see :class:`_UnwindOnSigterm`).
    """
    global _finalizer_pid, _handler_pid, _unsent
    if unsent is not None:
        _unsent = unsent
    pid = os.getpid()
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not handle_sigterm and _handler_pid == pid:
        release_sigterm()  # a configure() that asks dxtrack to leave signals alone
    if _finalizer_pid == pid and (
        _handler_pid == pid or not on_main_thread or not handle_sigterm
    ):
        return
    child = in_child_process()
    with _prepare_lock:
        if _finalizer_pid != pid:
            _finalizer_pid = pid
            if child:
                from multiprocessing import util

                def flush_at_child_exit() -> None:
                    mark_exiting()
                    close_all()
                    _remove_settings_file(pid)  # published by a configure() in this child

                util.Finalize(None, flush_at_child_exit, exitpriority=100)
        if _handler_pid != pid and on_main_thread and handle_sigterm:
            _handler_pid = pid
            _install_sigterm_handler(grace, close_all, watch=child)


def mark_exiting() -> None:
    """The process is on its way out and flushing: a SIGTERM now changes nothing."""
    global _exiting
    _exiting = True


def release_sigterm() -> None:
    """Give SIGTERM back its default once no client is left to flush (main thread only)."""
    global _handler_pid
    if threading.current_thread() is not threading.main_thread():
        return
    if isinstance(_current_sigterm_handler(), _UnwindOnSigterm):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _handler_pid = None


#: Signals a program may handle; dxtrack's threads never take them (see below).
_ASYNC_SIGNALS = frozenset(
    getattr(signal, name) for name in (
        "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
        "SIGWINCH", "SIGPIPE",
    ) if hasattr(signal, name)
)


_HELD_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)
)
_held_mask: Any = None  # the main thread's mask before hold_signals(), while it holds them


def hold_signals() -> None:
    """Keep SIGINT and SIGTERM waiting while the main thread does something that must not
    be cut short, until :func:`release_signals` (a no-op off the main thread).

    ``error()`` formats tracebacks with the standard library, whose bare ``except:``
    clauses would swallow the KeyboardInterrupt or SystemExit of a handler run meanwhile,
    and queues the record: a signal held until then acts as usual, and the record is kept.
    """
    global _held_mask
    if _HELD_SIGNALS and _held_mask is None and hasattr(signal, "pthread_sigmask") and (
        threading.current_thread() is threading.main_thread()
    ):
        _held_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)


def release_signals() -> None:
    """Undo :func:`hold_signals`; a signal that came meanwhile is delivered now.

    If the call fails (no stack left: RecursionError), the signals stay held and
    a later call, from a shallower frame, tries again.
    """
    global _held_mask
    held = _held_mask
    if held is not None and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _held_mask = None


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
    """dxtrack's SIGTERM handler; a class, so a forked child knows an inherited one as ours.

    It starts a thread that flushes, then raises ``SystemExit(143)`` so the
    main thread unwinds (``finally`` blocks run and may still record; a
    ``with Pool()`` terminates its workers and waits while they flush). The
    thread waits for the main thread to finish unwinding, at most one grace,
    then closes every client. It is not a daemon: interpreter exit, and a
    ``multiprocessing`` child's exit, join it, so the flush does not depend on
    a finalizer chain that a signal can cut short (a SIGTERM that lands while
    ``multiprocessing`` runs its finalizers aborts the rest of them). A
    watchdog ends the process after two graces, whatever happens.

    After the first SIGTERM, a child process ignores further ones (its
    parent's ``Pool.terminate()`` sends one when the whole process group was
    signalled: it must not cut the flush short); the main process ends at a
    second one, as a user pressing twice expects.
    """

    def __init__(self, grace: Callable[[], float], close_all: Callable[[], None]) -> None:
        self.grace = grace
        self.close_all = close_all

    def __call__(self, signum: int, frame: Any) -> None:
        _sigterm_seen.set()
        if _exiting:
            return  # already flushing at exit: let it finish within its bound
        signal.signal(signal.SIGTERM, signal.SIG_IGN if in_child_process() else signal.SIG_DFL)
        grace = self.grace()
        watchdog = threading.Timer(2 * grace, self._give_up, args=(2 * grace,))
        watchdog.daemon = True
        # Held back during a fork, this runs inside the fork hook, which would swallow
        # SystemExit: then the thread flushes at once and ends the process itself.
        in_fork_hook = _in_fork_hook()
        flusher = threading.Thread(
            target=self._flush_and_end, args=(0.0 if in_fork_hook else grace,),
            name="dxtrack-sigterm-exit",
        )
        try:
            watchdog.start()
            flusher.start()
        except RuntimeError:  # pragma: no cover - no new threads at interpreter exit
            pass
        if not in_fork_hook:
            raise SystemExit(SIGTERM_STATUS)

    def _give_up(self, after: float) -> None:
        """The watchdog: say what is left unsent, then end the process. Written straight to
        standard error: the logging module's locks may be held by the thread it cuts short."""
        try:
            os.write(2, (f"dxtrack: ended the process {after:g} s after SIGTERM; "
                         f"{_unsent()}\n").encode())
        finally:
            os._exit(SIGTERM_STATUS)

    def _flush_and_end(self, unwind: float) -> None:
        main = threading.main_thread()
        if unwind:
            main.join(unwind)
        try:
            self.close_all()
        finally:
            if main.is_alive():  # the program kept going, or a fork hook: end it as SIGTERM would
                os._exit(SIGTERM_STATUS)


def _wake(signum: int, frame: Any) -> None:
    """dxtrack's SIGURG handler: doing nothing is the point (see the module docstring)."""


def _install_sigterm_handler(
    grace: Callable[[], float], close_all: Callable[[], None], watch: bool
) -> None:
    """Only from the main thread, the one place Python lets a handler be set.

    ``watch``: in a child process, also start the watcher that wakes a main
    thread which missed the signal (a pool worker asleep on its task queue).
    """
    current = _current_sigterm_handler()
    if current is not signal.SIG_DFL and not isinstance(current, _UnwindOnSigterm):
        return  # the user's (or a framework's) handler, or none to be had: leave it alone
    handler = _UnwindOnSigterm(grace, close_all)
    signal.signal(signal.SIGTERM, handler)
    if watch:
        _start_watcher(handler)


def _start_watcher(handler: _UnwindOnSigterm) -> None:
    """Start the thread that wakes a main thread which missed a SIGTERM.

    Changes nothing when SIGURG or the wakeup descriptor is the program's.
    """
    global _wakeup, _inherited_wakeup
    if NUDGE_SIGNAL is None or not hasattr(signal, "pthread_kill"):
        return
    if signal.getsignal(NUDGE_SIGNAL) not in (signal.SIG_DFL, _wake):
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C signal handler must never block on it
    try:
        previous: Optional[int] = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous is None or previous not in (-1, _inherited_wakeup):
        if previous is not None:
            signal.set_wakeup_fd(previous)  # in use by the program: give it back
        os.close(read_end)
        os.close(write_end)
        return
    if previous == _inherited_wakeup and previous is not None:
        os.close(previous)
        _inherited_wakeup = None
    signal.signal(NUDGE_SIGNAL, _wake)
    _wakeup = (read_end, write_end)
    watcher = threading.Thread(
        target=_watch, args=(read_end, handler, NUDGE_SIGNAL), name="dxtrack-sigterm",
        daemon=True,
    )
    watcher.start()


def _watch(read_end: int, handler: _UnwindOnSigterm, nudge: int) -> None:
    block_signals_in_this_thread()
    main = threading.main_thread().ident
    while True:
        try:
            received = os.read(read_end, 512)
        except InterruptedError:  # pragma: no cover - its signals are blocked
            continue
        except OSError:  # pragma: no cover - the pipe is gone
            return
        if not received:  # pragma: no cover - the write end is never closed
            return
        if signal.SIGTERM not in received:
            continue
        for _ in range(NUDGES):
            if _sigterm_seen.wait(NUDGE_AFTER) or signal.getsignal(signal.SIGTERM) is not handler:
                break  # it ran (its watchdog bounds the exit), or the program took over
            if main is None or signal.getsignal(nudge) is not _wake:
                break
            signal.pthread_kill(main, nudge)  # wakes a blocked wait; it runs what is due


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
