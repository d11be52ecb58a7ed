"""``DXTrackHandler``: a ``logging`` handler that turns logged exceptions into error records.

dxtrack's own log lines are filtered out before the handler's lock is taken, so the worker
logging a delivery problem never waits for a thread inside the handler. Users' guide:
docs/errors-and-integrations.md.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from .client import DXTrack

__all__ = ["DXTrackHandler"]

_OWN_LOGGER = "dxtrack"


class DXTrackHandler(logging.Handler):
    """Turns logged exceptions into dxtrack error records.

    :param client: the client to record with; the ready-made ``dxtrack`` by default.
    :param level: the lowest level reported (``logging.ERROR`` by default).
    """

    def __init__(self, client: Optional[DXTrack] = None, level: int = logging.ERROR) -> None:
        super().__init__(level)
        self._client = client
        self._inside = threading.local()
        self.addFilter(_reportable)  # filters run before Handler.handle takes the lock

    @property
    def client(self) -> DXTrack:
        if self._client is None:
            from . import dxtrack

            return dxtrack
        return self._client

    def emit(self, record: logging.LogRecord) -> None:
        if not _reportable(record):
            return  # (the filter says so too; this holds if someone replaces the filters)
        exc_info = record.exc_info
        if getattr(self._inside, "active", False):
            return  # a handler further down logged while we were recording
        self._inside.active = True
        try:
            metadata: Dict[str, Any] = {
                "logger": record.name, "level": record.levelname, "message": record.getMessage()
            }
            self.client.record_error(exc_info[1], metadata, wait=False)  # type: ignore[index]
        except Exception:
            self.handleError(record)
        finally:
            self._inside.active = False

    def __repr__(self) -> str:
        return f"<DXTrackHandler ({logging.getLevelName(self.level)})>"


def _reportable(record: logging.LogRecord) -> bool:
    """A record with an exception, from any logger but dxtrack's own (a loop, or a stall)."""
    name = record.name
    if name == _OWN_LOGGER or name.startswith(_OWN_LOGGER + "."):
        return False
    exc_info = record.exc_info
    return bool(exc_info) and exc_info[1] is not None  # type: ignore[index]
