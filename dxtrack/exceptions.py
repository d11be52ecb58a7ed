"""Exceptions raised by dxtrack.

dxtrack raises only at the call that received bad input; everything that goes
wrong on the background path (sending, retrying, writing files) is counted in
``stats()`` and logged, never raised into the application.

::

    DXTrackError
    └── ConfigurationError (also a ValueError)

Bad arguments to ``metric()``, ``errors()`` and friends raise plain
``ValueError`` / ``TypeError``, as any Python function would.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "DXTrackError"]


class DXTrackError(Exception):
    """Base class of the exceptions dxtrack defines."""


class ConfigurationError(DXTrackError, ValueError):
    """An option given to ``configure()`` is invalid; the message names it.

    :attr:`option` is the option's name when one option is at fault.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option
