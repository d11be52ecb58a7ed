"""A ``logging`` handler that reports logged exceptions to dxtrack.

Code that already logs its failures needs no change beyond one line::

    logging.getLogger().addHandler(dxtrack.DXTrackHandler())

    try:
        parse(page)
    except ParseError:
        log.exception("page %s could not be parsed", url)   # -> an error record

Only records at the handler's level (ERROR by default) or above that carry
exception information become error records; the logger's name, the level and
the formatted message go into the record's metadata. Everything else passes
by untouched, and dxtrack's own log lines never loop back into it.
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

    @property
    def client(self) -> DXTrack:
        if self._client is None:
            from . import dxtrack

            return dxtrack
        return self._client

    def emit(self, record: logging.LogRecord) -> None:
        exc_info = record.exc_info
        if not exc_info or exc_info[1] is None:
            return
        name = record.name
        if name == _OWN_LOGGER or name.startswith(_OWN_LOGGER + "."):
            return  # dxtrack reporting on itself must not become a record, or a loop
        if getattr(self._inside, "active", False):
            return  # a handler further down logged while we were recording
        self._inside.active = True
        try:
            metadata: Dict[str, Any] = {
                "logger": name,
                "level": record.levelname,
                "message": record.getMessage(),
            }
            self.client.error(metadata=metadata, exception=exc_info[1])
        except Exception:
            self.handleError(record)
        finally:
            self._inside.active = False

    def __repr__(self) -> str:
        return f"<DXTrackHandler ({logging.getLevelName(self.level)})>"
