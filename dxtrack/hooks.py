"""``capture_unhandled=True``: exceptions nobody caught become error records.

:class:`UnhandledCapture` puts a link in front of :data:`sys.excepthook` and
:func:`threading.excepthook`; a link queues the record, then calls the hook that was there
before. Uninstalling takes a link out only while it is the hook in place; otherwise it only
passes calls on. Users' guide: docs/errors-and-integrations.md.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from types import TracebackType

    from .client import DXTrack

__all__ = ["UnhandledCapture"]


class UnhandledCapture:
    """The excepthooks of one client; :meth:`install` and :meth:`uninstall` toggle them."""

    def __init__(self, client: DXTrack) -> None:
        self._client = client
        self.active = False
        self._sys_link: Optional[_SysLink] = None
        self._thread_link: Optional[_ThreadLink] = None
        self._handling = threading.local()  # the exception a link of ours is passing on

    def install(self) -> None:
        if self.active:
            return
        self.active = True
        if sys.excepthook is not self._sys_link:
            self._sys_link = _SysLink(self, sys.excepthook)
            sys.excepthook = self._sys_link
        if threading.excepthook is not self._thread_link:
            self._thread_link = _ThreadLink(self, threading.excepthook)
            threading.excepthook = self._thread_link

    def uninstall(self) -> None:
        if not self.active:
            return
        self.active = False
        if self._sys_link is not None and sys.excepthook is self._sys_link:
            sys.excepthook = self._sys_link.previous
            self._sys_link = None
        if self._thread_link is not None and threading.excepthook is self._thread_link:
            threading.excepthook = self._thread_link.previous
            self._thread_link = None

    def record(self, exc: BaseException, thread: str) -> bool:
        """Queue ``exc`` unless this capture is off or already passing it on; True if queued."""
        if not self.active or getattr(self._handling, "exception", None) is exc:
            return False
        # Never raises; it logs its own trouble.
        self._client.record_error(exc, {"unhandled": True, "thread": thread}, wait=False)
        return True

    def pass_on(self, exc: BaseException, call: Callable[[], Any]) -> None:
        """Run the previous hook, marking ``exc`` as handled for links further down."""
        outer = getattr(self._handling, "exception", None)
        self._handling.exception = exc
        try:
            call()
        finally:
            self._handling.exception = outer

    def flush(self) -> None:
        config = self._client.config
        try:
            self._client.flush_metrics_buffer(config.shutdown_timeout if config else 0.0)
        except Exception:  # pragma: no cover - flush does not raise; a dying thread must not
            pass


class _SysLink:
    """dxtrack's link in the ``sys.excepthook`` chain."""

    def __init__(self, capture: UnhandledCapture, previous: Any) -> None:
        self.capture = capture
        self.previous = previous

    def __call__(
        self, exc_type: type[BaseException], exc: BaseException, tb: Optional[TracebackType]
    ) -> None:
        try:
            if not issubclass(exc_type, KeyboardInterrupt):
                self.capture.record(exc, threading.current_thread().name)
        finally:
            # The exit flush follows at once, within shutdown_timeout: no flush of our own.
            previous = self.previous or sys.__excepthook__
            self.capture.pass_on(exc, lambda: previous(exc_type, exc, tb))


class _ThreadLink:
    """dxtrack's link in the ``threading.excepthook`` chain."""

    def __init__(self, capture: UnhandledCapture, previous: Any) -> None:
        self.capture = capture
        self.previous = previous

    def __call__(self, args: Any) -> None:
        recorded = False
        exc = args.exc_value
        try:
            if exc is not None and not issubclass(args.exc_type, (KeyboardInterrupt, SystemExit)):
                thread = args.thread
                name = thread.name if thread is not None else "unknown thread"
                recorded = self.capture.record(exc, name)
        finally:
            previous = self.previous or threading.__excepthook__
            try:
                self.capture.pass_on(exc, lambda: previous(args))
            finally:
                if recorded:
                    self.capture.flush()  # the thread ends next; the process may not
