"""``capture_unhandled=True``: exceptions nobody caught become error records.

:class:`UnhandledCapture` chains :data:`sys.excepthook` (the main thread) and
:func:`threading.excepthook` (other threads). For each uncaught exception it
records an error with the traceback, lets the hook that was there before run
(so what the program prints is unchanged), then flushes within the client's
``shutdown_timeout``, since the process or thread is about to end.

``KeyboardInterrupt`` is not recorded (a person stopped the job), nor is
``SystemExit`` in a thread (Python ignores it there too).

Uninstalling puts the previous hooks back when ours are still the ones in
place. When something chained itself on top of ours meanwhile, ours stay in
its chain but only pass the call through: taking them out would break the
other hook's chain.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from types import TracebackType

    from .client import DXTrack

__all__ = ["UnhandledCapture"]

_SysHook = Callable[["type[BaseException]", BaseException, "Optional[TracebackType]"], Any]
_ThreadHook = Callable[[Any], Any]


class UnhandledCapture:
    """The excepthooks of one client; :meth:`install` and :meth:`uninstall` toggle them."""

    def __init__(self, client: DXTrack) -> None:
        self._client = client
        self.active = False
        self._previous_sys: Optional[_SysHook] = None
        self._previous_thread: Optional[_ThreadHook] = None

    def install(self) -> None:
        if self.active:
            return
        self.active = True
        # Already in a chain from an earlier install (someone chained on top): just reactivate.
        if self._previous_sys is None:
            self._previous_sys = sys.excepthook
            sys.excepthook = self._sys_hook
        if self._previous_thread is None:
            self._previous_thread = threading.excepthook
            threading.excepthook = self._thread_hook

    def uninstall(self) -> None:
        if not self.active:
            return
        self.active = False
        if sys.excepthook == self._sys_hook:
            sys.excepthook = self._previous_sys  # type: ignore[assignment]
            self._previous_sys = None
        if threading.excepthook == self._thread_hook:
            threading.excepthook = self._previous_thread  # type: ignore[assignment]
            self._previous_thread = None

    # -- the hooks ---------------------------------------------------------------
    def _sys_hook(
        self,
        exc_type: type[BaseException],
        exc: BaseException,
        tb: Optional[TracebackType],
    ) -> None:
        recorded = False
        try:
            if self.active and not issubclass(exc_type, KeyboardInterrupt):
                recorded = self._record(exc, threading.current_thread().name)
        finally:
            previous = self._previous_sys or sys.__excepthook__
            try:
                previous(exc_type, exc, tb)
            finally:
                if recorded:
                    self._flush()

    def _thread_hook(self, args: Any) -> None:
        recorded = False
        try:
            if (
                self.active
                and args.exc_value is not None
                and not issubclass(args.exc_type, (KeyboardInterrupt, SystemExit))
            ):
                thread = args.thread
                name = thread.name if thread is not None else "unknown thread"
                recorded = self._record(args.exc_value, name)
        finally:
            previous = self._previous_thread or threading.__excepthook__
            try:
                previous(args)
            finally:
                if recorded:
                    self._flush()

    def _record(self, exc: BaseException, thread: str) -> bool:
        # error() never raises; it logs its own trouble.
        self._client.error(metadata={"unhandled": True, "thread": thread}, exception=exc)
        return True

    def _flush(self) -> None:
        client = self._client
        config = client.config
        try:
            client.flush_metrics_buffer(timeout=config.shutdown_timeout if config else 0.0)
        except Exception:  # pragma: no cover - flush does not raise; the dying path must not
            pass
