"""``dxtrack.timer(name)``: the seconds a block or a function call took, as a metric.

Start times live in a context variable, so blocks that overlap in threads or asyncio tasks
each measure their own time, even through one timer object. Users' guide:
docs/errors-and-integrations.md.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, TypeVar, cast

if TYPE_CHECKING:
    from .client import DXTrack

__all__ = ["Timer"]

F = TypeVar("F", bound=Callable[..., Any])

#: Start times of the blocks open in this context, by timer (``id``), innermost last.
_starts: contextvars.ContextVar[Dict[int, Tuple[float, ...]]]
_starts = contextvars.ContextVar("dxtrack_timer_starts")


class Timer:
    """A context manager and decorator recording elapsed seconds as metric ``name``; it may
    time nested, repeated and concurrent blocks, and each call of a decorated function."""

    __slots__ = ("name", "metadata", "elapsed", "_client", "_clock")

    def __init__(self, client: DXTrack, name: str, metadata: Optional[Mapping[str, Any]],
                 clock: Callable[[], float]) -> None:
        # Bad arguments fail here, where they were given, not when the block ends.
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        self.name = name
        self.metadata = None if metadata is None else dict(metadata)  # as it is now
        self._client = client
        self._clock = clock
        #: Seconds the last timed block took (``None`` until one ended).
        self.elapsed: Optional[float] = None

    def __enter__(self) -> Timer:
        open_blocks = _starts.get({})
        key = id(self)
        _starts.set({**open_blocks, key: open_blocks.get(key, ()) + (self._clock(),)})
        return self

    def __exit__(self, *exc_info: Any) -> None:
        now = self._clock()
        open_blocks = dict(_starts.get({}))
        key = id(self)
        starts = open_blocks.pop(key, ())
        if not starts:  # the block ended in another context than it began (a thread pool, say)
            self._client.log.warning(f"timer-context:{self.name}", "dxtrack.timer(%r): the block "
                                     "ended in another context than it began in; nothing "
                                     "recorded", self.name)
            return
        if len(starts) > 1:
            open_blocks[key] = starts[:-1]
        _starts.set(open_blocks)
        self._record(now - starts[-1])

    def __call__(self, func: F) -> F:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"timer() cannot time the generator function {func.__qualname__}: calling it "
                "returns at once; time the loop that consumes it instead"
            )
        clock, record = self._clock, self._record
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
        try:
            self._client.metric(self.name, seconds, self.metadata)
        except (TypeError, ValueError) as exc:
            self._client.log.warning(f"timer:{self.name}", "dxtrack.timer(%r) could not record "
                                     "its metric: %s", self.name, exc)

    def __repr__(self) -> str:
        return f"Timer({self.name!r})"
