"""``dxtrack.timer(name)``: the seconds a block or a function call took, as a metric.

::

    with dxtrack.timer("scrape.seconds", metadata={"shop": shop}):
        scrape(shop)

    @dxtrack.timer("export.seconds")
    def export(): ...

Time comes from the client's monotonic clock, so a change of the wall clock
never shows up as a negative or huge duration. The metric is recorded
whether the block returns or raises (the time was spent either way) and the
exception goes on unchanged.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, TypeVar, cast

if TYPE_CHECKING:
    from .client import DXTrack

__all__ = ["Timer"]

F = TypeVar("F", bound=Callable[..., Any])


class Timer:
    """A context manager and decorator recording elapsed seconds as metric ``name``.

    One object may time nested, repeated and concurrent blocks (each thread
    keeps its own start times); used as a decorator, each call is timed on
    its own.
    """

    def __init__(
        self,
        client: DXTrack,
        name: str,
        metadata: Optional[Mapping[str, Any]],
        clock: Callable[[], float],
    ) -> None:
        # Bad arguments fail here, where they were given, not when the block ends.
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        self.name = name
        self.metadata = metadata
        self._client = client
        self._clock = clock
        self._local = threading.local()
        #: Seconds the last timed block took (``None`` until one ended).
        self.elapsed: Optional[float] = None

    def __enter__(self) -> Timer:
        starts: Optional[List[float]] = getattr(self._local, "starts", None)
        if starts is None:
            starts = self._local.starts = []
        starts.append(self._clock())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._record(self._clock() - self._local.starts.pop())

    def __call__(self, func: F) -> F:
        clock = self._clock
        record = self._record
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
                started = clock()
                try:
                    return await func(*args, **kwargs)
                finally:
                    record(clock() - started)

            return cast(F, timed_coroutine)

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return func(*args, **kwargs)
            finally:
                record(clock() - started)

        return cast(F, timed)

    def _record(self, seconds: float) -> None:
        self.elapsed = seconds
        self._client.metric(self.name, seconds, self.metadata)

    def __repr__(self) -> str:
        return f"Timer({self.name!r})"
