"""Signals: dxtrack's SIGTERM handler, and keeping signals where they belong.

- **SIGTERM** (``with Pool()``'s exit, ``docker stop``): where it is at its default,
  :mod:`dxtrack.exits` installs :class:`_UnwindOnSigterm`, which raises ``SystemExit(143)``
  and flushes from a non-daemon thread; interpreter exit and ``multiprocessing``'s child exit
  join it, so a SIGTERM that cuts the finalizers short does not cut the flush
  (test_sigterm: ``test_sigterm_while_multiprocessing_runs_its_finalizers``).
- **A main thread that missed it** (asleep in a lock wait, it never runs the handler): in a
  child, a thread reads the wakeup descriptor and, if the handler has not run within
  :data:`NUDGE_AFTER`, sends the main thread a SIGURG, handled by doing nothing, which ends
  the wait (test_processes: the pool tests under SIGTERM to the process group).
- **dxtrack's threads** block the signals a program handles, so the kernel delivers them to
  the main thread (:func:`block_signals_in_this_thread`).
- **error()** holds SIGINT and SIGTERM while it queues a record (:func:`hold_signals`;
  test_reentrancy).
- **fork()** (called by :mod:`dxtrack.forks`) blocks SIGTERM across the fork; the child sets
  it back to its default before unblocking it, so a child terminated at once ends at once
  (test_sigterm: forks from threads).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional, Tuple

__all__ = ["SIGTERM_STATUS", "block_signals_in_this_thread", "hold_signals", "in_child_process",
           "install_sigterm_handler", "mark_exiting", "release_signals", "release_sigterm"]

#: Exit status of a process that dxtrack ended after a SIGTERM (as shells report it).
SIGTERM_STATUS = 128 + int(signal.SIGTERM)
#: Seconds the main thread has to run dxtrack's SIGTERM handler before it is woken.
NUDGE_AFTER = 0.5
#: How many times it is woken at most, NUDGE_AFTER apart.
NUDGES = 3
#: The signal that wakes it: ignored by default, so a stray one changes nothing.
NUDGE_SIGNAL = getattr(signal, "SIGURG", None)

#: Signals a program may handle; dxtrack's threads never take them.
_ASYNC_SIGNALS = frozenset(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
    "SIGWINCH", "SIGPIPE") if hasattr(signal, name))
_HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_CAN_MASK = hasattr(signal, "pthread_sigmask")

# This process's state; after_fork_in_child() starts a child afresh.
_exiting = False                            # flushing at exit: a SIGTERM changes nothing
_held_mask: Any = None                      # the main thread's mask while hold_signals() holds
_wakeup: Optional[Tuple[int, int]] = None   # (read end, write end) given to set_wakeup_fd
_inherited_wakeup: Optional[int] = None     # a parent's write end, aimed at /dev/null
_sigterm_seen = threading.Event()           # dxtrack's SIGTERM handler ran in this process
_fork_masks = threading.local()             # each forking thread's signal mask before fork


def in_child_process() -> bool:
    """Whether this process was started by ``multiprocessing`` (any start method)."""
    mp = sys.modules.get("multiprocessing")
    return mp is not None and mp.parent_process() is not None


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def before_fork() -> None:
    """Keep a SIGTERM away from the child until it has set SIGTERM back to its default."""
    if _CAN_MASK and isinstance(signal.getsignal(signal.SIGTERM), _UnwindOnSigterm):
        _fork_masks.saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def after_fork_in_parent() -> None:
    saved = getattr(_fork_masks, "saved", None)
    if saved is not None:
        try:
            # A SIGTERM held back during the fork runs its handler in here, where an
            # exception would be swallowed: the handler sees `saved` and acts without one.
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        finally:
            _fork_masks.saved = None


def after_fork_in_child() -> None:
    global _sigterm_seen, _wakeup, _inherited_wakeup, _fork_masks, _exiting, _held_mask
    _exiting = False
    _held_mask = None  # the mask itself is inherited: the forking thread restores its own
    saved = getattr(_fork_masks, "saved", None)
    _fork_masks = threading.local()
    if saved is not None:
        # First, whatever a pending handler raises meanwhile: SIGTERM back to its default,
        # then unblocked (a SIGTERM that came during the fork ends the child now).
        try:
            for _ in range(3):  # signal.signal() runs pending handlers first, which may raise
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forking thread is main
                    break
                except BaseException:  # noqa: BLE001 - nothing may stop the unblocking below
                    continue
        finally:
            with contextlib.suppress(BaseException):
                signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    _sigterm_seen = threading.Event()
    if _wakeup is not None:
        # The signal module still writes to the parent's pipe: aim that descriptor at
        # /dev/null, so this process's signals stop reaching the parent's watcher.
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


def mark_exiting() -> None:
    """The process is on its way out and flushing: a SIGTERM now changes nothing."""
    global _exiting
    _exiting = True


def hold_signals() -> None:
    """Keep SIGINT and SIGTERM waiting until :func:`release_signals` (main thread only).

    ``error()`` formats tracebacks with the standard library, whose bare ``except:`` would
    swallow a handler's KeyboardInterrupt or SystemExit: held until the record is queued,
    the signal then acts as usual and the record is kept.
    """
    global _held_mask
    if _CAN_MASK and _held_mask is None and _on_main_thread():
        _held_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)


def release_signals() -> None:
    """Undo :func:`hold_signals`; a signal that came meanwhile is delivered now. If the
    call fails (no stack left), the signals stay held and a later call tries again."""
    global _held_mask
    held = _held_mask
    if held is not None and _on_main_thread():
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _held_mask = None


def block_signals_in_this_thread() -> None:
    """Keep signals away from a dxtrack thread, so the kernel delivers them to the main
    one (a SIGTERM taken by a background thread leaves a blocked main thread asleep)."""
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


def install_sigterm_handler(
    grace: Callable[[], float], close_all: Callable[[], None], unsent: Callable[[], str]
) -> None:
    """Install dxtrack's handler where SIGTERM is at its default (main thread only); a
    program's own is left alone. In a child, also start the watcher (see above)."""
    current = signal.getsignal(signal.SIGTERM)
    if current is not signal.SIG_DFL and not isinstance(current, _UnwindOnSigterm):
        return
    handler = _UnwindOnSigterm(grace, close_all, unsent)
    signal.signal(signal.SIGTERM, handler)
    if in_child_process():
        _start_watcher(handler)


def release_sigterm() -> bool:
    """Give SIGTERM back its default once no client is left to flush (main thread only).
    Returns whether SIGTERM is no longer dxtrack's."""
    ours = isinstance(signal.getsignal(signal.SIGTERM), _UnwindOnSigterm)
    if ours and _on_main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return True
    return not ours


class _UnwindOnSigterm:
    """dxtrack's SIGTERM handler; a class, so a forked child knows an inherited one as ours.

    It raises ``SystemExit(143)`` so the main thread unwinds (``finally`` blocks may still
    record; a ``with Pool()`` terminates its workers and waits while they flush); a thread
    waits for that, at most one grace, then closes every client; a watchdog ends the process
    after two graces. A child ignores later SIGTERMs (a SIGTERM to the process group reaches
    a pool worker twice); the main process ends at a second one.
    """

    def __init__(self, grace: Callable[[], float], close_all: Callable[[], None],
                 unsent: Callable[[], str]) -> None:
        self.grace, self.close_all, self.unsent = grace, close_all, unsent

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
        in_fork_hook = getattr(_fork_masks, "saved", None) is not None
        flusher = threading.Thread(target=self._flush_and_end, name="dxtrack-sigterm-exit",
                                   args=(0.0 if in_fork_hook else grace,))
        with contextlib.suppress(RuntimeError):  # no new threads at interpreter exit
            watchdog.start()
            flusher.start()
        if not in_fork_hook:
            raise SystemExit(SIGTERM_STATUS)

    def _give_up(self, after: float) -> None:
        """The watchdog: say what is left unsent, then end the process. Written straight to
        standard error: the logging module's locks may be held by the thread it cuts short."""
        try:
            os.write(2, (f"dxtrack: ended the process {after:g} s after SIGTERM; "
                         f"{self.unsent()}\n").encode())
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
    """dxtrack's SIGURG handler: doing nothing is the point (it ends an interrupted wait)."""


def _start_watcher(handler: _UnwindOnSigterm) -> None:
    """Start the thread that wakes a main thread which missed a SIGTERM; nothing when
    SIGURG or the wakeup descriptor is the program's."""
    global _wakeup, _inherited_wakeup
    if (NUDGE_SIGNAL is None or not hasattr(signal, "pthread_kill")
            or signal.getsignal(NUDGE_SIGNAL) not in (signal.SIG_DFL, _wake)):
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
    threading.Thread(target=_watch, args=(read_end, handler, NUDGE_SIGNAL),
                     name="dxtrack-sigterm", daemon=True).start()


def _watch(read_end: int, handler: _UnwindOnSigterm, nudge: int) -> None:
    block_signals_in_this_thread()
    main = threading.main_thread().ident
    while True:
        try:
            received = os.read(read_end, 512)
        except OSError:  # pragma: no cover - the pipe is gone
            return
        if not received:  # pragma: no cover - the write end is never closed
            return
        if signal.SIGTERM in received:
            _nudge(main, handler, nudge)


def _nudge(main: Optional[int], handler: _UnwindOnSigterm, nudge: int) -> None:
    for _ in range(NUDGES):
        if _sigterm_seen.wait(NUDGE_AFTER) or signal.getsignal(signal.SIGTERM) is not handler:
            return  # it ran (its watchdog bounds the exit), or the program took over
        if main is None or signal.getsignal(nudge) is not _wake:
            return
        signal.pthread_kill(main, nudge)  # wakes a blocked wait; it runs what is due
