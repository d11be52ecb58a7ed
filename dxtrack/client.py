"""The public client: ``configure()``, ``metric()``, ``error()`` and friends."""

from __future__ import annotations

import itertools
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from . import forks, inherit
from ._logging import RateLimitedLog
from ._version import __version__
from .buffer import CLOSED, DROPPED
from .clock import Clock, SystemClock
from .config import Config, _snapshot, settings_from_kwargs
from .env import unknown_variables, variable_for
from .exceptions import ConfigurationError
from .hooks import UnhandledCapture
from .pipeline import Pipeline
from .records import ERROR, METRIC, RecordBuilder
from .signals import hold_signals, release_signals
from .sinks import sink_for
from .timer import Timer
from .worker import RetryPolicy

__all__ = ["DXTrack"]

_State = Tuple[RecordBuilder, Pipeline]


class DXTrack:
    """A dxtrack client; instances share no state. ``from dxtrack import dxtrack`` gives one.
    :meth:`record_error` and :attr:`log` are for the integrations, not for applications.

    :param clock: the source of time for intervals, deadlines and waits (tests: ManualClock).
    :param retry: how the worker backs off between attempts (tests make it quick).
    :param inherit: hand the non-secret settings to ``multiprocessing`` children, where an
        unconfigured client adopts them (:mod:`dxtrack.inherit`); on for the ready-made one.
    """

    __version__ = __version__

    def __init__(self, *, clock: Optional[Clock] = None, retry: Optional[RetryPolicy] = None,
                 inherit: bool = False) -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry = retry if retry is not None else RetryPolicy()
        self._inherit = inherit
        self._adopted = False  # looked for a parent's settings in this process
        self._lock = threading.RLock()
        # (builder, pipeline) swapped as one value, so a caller never sees half of a reconfigure.
        self._state: Optional[_State] = None
        self._config: Optional[Config] = None
        self._pipelines: List[Pipeline] = []
        self._retired: Dict[str, Any] = {"dropped": {}}  # counters of the finished pipelines
        self._closed = False
        #: The pipeline the last close() closed: later calls return its verdict.
        self._closed_pipeline: Optional[Pipeline] = None
        self._refused = _Tally()
        #: error()/errors() calls that could record nothing (``dropped["error_failed"]``).
        #: A plain int, counted without a call: it may be counted with no stack left.
        self._error_failures = 0
        self._log = RateLimitedLog()
        self._capture = UnhandledCapture(self)
        forks.register(self)

    def after_fork_in_child(self) -> None:
        """The parent's lock may have been held at fork time (see :mod:`dxtrack.forks`)."""
        self._lock = threading.RLock()
        self._adopted = False
        self._log.after_fork_in_child()

    def configure(  # every option of Config, in its order, by keyword; None: not given
        self, *, stage: Optional[str] = None, context: Optional[str] = None,
        run_id: Optional[str] = None, default_metadata: Optional[Mapping[str, Any]] = None,
        profile_name: Optional[str] = None, aws_access_key_id: Optional[str] = None,
        aws_secret_access_key: Optional[str] = None, aws_session_token: Optional[str] = None,
        region_name: Optional[str] = None, endpoint_url: Optional[str] = None,
        error_stream: Optional[str] = None, metric_stream: Optional[str] = None,
        pack_records: Optional[bool] = None, max_record_bytes: Optional[int] = None,
        compression: Optional[str] = None,
        buffer_metrics: Optional[bool] = None, use_async_requests: Optional[bool] = None,
        papertrail_hostport: Optional[str] = None, capture_unhandled: Optional[bool] = None,
        handle_sigterm: Optional[bool] = None, timestamp_format: Optional[str] = None,
        output_dir: Optional[Union[str, os.PathLike[str]]] = None,
        test_output: Optional[str] = None, max_buffer_records: Optional[int] = None,
        max_buffer_bytes: Optional[int] = None, on_full: Optional[str] = None,
        block_timeout: Optional[float] = None, flush_interval: Optional[float] = None,
        shutdown_timeout: Optional[float] = None, retry_deadline: Optional[float] = None,
        sync_timeout: Optional[float] = None,
        spool_dir: Optional[Union[str, os.PathLike[str]]] = None,
        spool_max_bytes: Optional[int] = None, sink: Any = None,
    ) -> Config:
        """Validate the options of :class:`Config` and start using them; returns the Config.

        ``stage``, ``context`` and ``run_id`` are required, here or as ``DXTRACK_<OPTION>``
        (docs/environment.md). Configuring again first sends what is pending under the old
        settings (bounded by the old ``shutdown_timeout``).
        """
        options = dict(locals())  # the keywords above, and only those
        del options["self"]
        config = settings_from_kwargs(options, os.environ)
        for variable in sorted(unknown_variables()):
            if variable.startswith("DXTRACK_AWS_") or variable == "DXTRACK_SINK":
                message = ("dxtrack: %s is ignored: credentials and sinks are never read from "
                           "DXTRACK_* variables (boto3 reads AWS_ACCESS_KEY_ID and friends)")
            else:
                message = "dxtrack: the environment variable %s names no dxtrack option; ignored"
            self._log.warning(f"unknown-variable:{variable}", message, variable)
        if config.sink is None and config.stage != "test" and not config.aws_access_key_id:
            _check_profile(config, from_environment=profile_name is None)
        return self._use(config, publish=self._inherit)

    def _use(self, config: Config, publish: bool) -> Config:
        sink = sink_for(config)
        # Records that fit the sink; refuses default_metadata keys written as one.
        builder = RecordBuilder(config, max_line_bytes=sink.max_line_bytes)
        pipeline = Pipeline(config, sink, self._clock, self._log, self._retry)
        with self._lock:
            old = self._state
            self._state = (builder, pipeline)
            self._config = config
            self._closed = False
            self._closed_pipeline = None
            self._pipelines = [p for p in self._pipelines if not self._retire(p)]
            self._pipelines.append(pipeline)
            if config.capture_unhandled:
                self._capture.install()
            else:
                self._capture.uninstall()
            try:
                if publish:
                    inherit.publish(config)
            except TypeError as exc:
                self._log.warning("publish-failed", "dxtrack could not hand its settings to "
                                  "child processes: %s; they record nothing", exc)
        if old is not None:
            old[1].close()
        return config

    @property
    def config(self) -> Optional[Config]:
        """The settings in use, or ``None`` before ``configure()``."""
        return self._config

    # 0.6 kept these four as attributes; here they read the settings in use.
    @property
    def context(self) -> Optional[str]:
        """The configured ``context``, or ``None`` before ``configure()``."""
        return self._config.context if self._config is not None else None

    @property
    def stage(self) -> Optional[str]:
        """The configured ``stage``, or ``None`` before ``configure()``."""
        return self._config.stage if self._config is not None else None

    @property
    def run_id(self) -> Optional[str]:
        """The configured ``run_id``, or ``None`` before ``configure()``."""
        return self._config.run_id if self._config is not None else None

    @property
    def default_metadata(self) -> Optional[Dict[str, Any]]:
        """A deep copy of the configured ``default_metadata`` (changing it changes nothing in
        the records), or ``None`` before ``configure()``."""
        config = self._config
        return _snapshot(config.default_metadata) if config is not None else None

    @property
    def log(self) -> RateLimitedLog:
        """The client's rate-limited log on the ``dxtrack`` logger (for the integrations)."""
        return self._log

    @property
    def sink(self) -> Any:
        """The sink records go to (for tests and introspection): the object given as
        ``sink=``, if any, else the stage's; ``None`` before ``configure()``."""
        state = self._state
        return getattr(state[1].sink, "wrapped", state[1].sink) if state is not None else None

    def metric(self, name: str, value: Any, metadata: Optional[Mapping[str, Any]] = None,
               timestamp: Any = None) -> None:
        """Record one metric.

        :param name: a non-empty string, dotted by convention (``scrape.products``).
        :param value: anything ``float()`` accepts that is finite; stored as a float.
        :param metadata: merged over ``default_metadata`` (this call's keys win).
        :param timestamp: a ``datetime`` (naive means UTC) or unix seconds, from 1970 to
            9999; now by default.
        :raises ValueError: for a bad name, value or timestamp, or two metadata keys written
            as one JSON key (``1`` and ``"1"``); TypeError for metadata that is not a dict.
        """
        state = self._state or self._unconfigured(METRIC)
        if state is None:
            return
        builder, pipeline = state
        body = builder.metric(name, value, metadata, timestamp)
        # _submit()'s put, inline: the common case (taken, nothing to wait for) costs no call.
        seq = pipeline.offer(body)
        if seq <= 0 or pipeline.metric_waits:
            self._submit(pipeline, METRIC, [body], seqs=[seq])

    def error(self, metadata: Optional[Mapping[str, Any]] = None,
              exception: Optional[BaseException] = None) -> None:
        """Record the exception being handled (or ``exception``), with its traceback.

        Never raises (in an ``except`` block it would hide the application's exception):
        problems are logged, and a record not made is counted in ``dropped["error_failed"]``.
        """
        try:
            self.record_error(exception, metadata, wait=True)
        except Exception:  # record_error() could not even start: no stack left for its frame
            self._error_failures += 1
        try:
            release_signals()  # normally done already; not when the stack was exhausted
        except Exception:  # noqa: BLE001 - nothing more can be done from this depth
            pass

    def record_error(self, exception: Optional[BaseException],
                     metadata: Optional[Mapping[str, Any]] = None, *, wait: bool) -> None:
        """``error()`` for the integrations; never raises. ``wait=False`` never waits for
        delivery: the logging handler's lock must not be held for ``sync_timeout``, and a
        traceback must not wait for the network before it is printed."""
        try:
            exc = exception if exception is not None else sys.exc_info()[1]
            if exc is None:
                self._log.warning("error-without-exception", "dxtrack.error() was called with "
                                  "no exception being handled; nothing recorded")
                return
            if not isinstance(exc, BaseException):
                self._log.warning("error-not-exception", "dxtrack.error(exception=...) needs an "
                                  "exception, got %s; nothing recorded", type(exc).__name__)
                return
            state = self._state or self._unconfigured(ERROR)
            if state is None:
                return
            builder, pipeline = state

            def build() -> List[bytes]:
                try:
                    return [builder.error(exc, metadata)]
                except Exception as bad_metadata:  # not a dict, or a mapping that fails to read
                    self._log.warning("error-metadata", "dxtrack.error(): %s; recorded without it",
                                      bad_metadata)
                    return [builder.error(exc, None)]

            self._submit(pipeline, ERROR, build, wait=wait)
        except Exception:
            # Maybe a few frames from the recursion limit, maybe a log handler that raises:
            # count first, without a call, then log if even that works.
            self._error_failures += 1
            try:
                self._log.error("error-failed", "dxtrack.error() could not record the error",
                                exc_info=True)
            except Exception:
                pass  # counted above; nothing else is left to try

    def errors(self, exceptions: Iterable[BaseException],
               metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Record several exceptions at once, each with its traceback when it has one. Raises
        only for its own bad arguments, before anything is recorded; else as error().

        :raises TypeError: for ``exceptions`` that cannot be iterated over or hold a
            non-exception, or ``metadata`` that is not a dict (or a mapping that fails to read).
        :raises ValueError: for two ``metadata`` keys written as one JSON key (``1``, ``"1"``).
        """
        lost = 1  # what a failure of this call costs, until the items are known
        try:
            try:
                items = list(exceptions)
            except (RecursionError, MemoryError):
                raise  # no room left: not the argument's fault (counted below)
            except Exception as exc:
                raise TypeError(f"errors() could not iterate over its argument: "
                                f"{type(exc).__name__}: {exc}") from exc
            for item in items:
                if not isinstance(item, BaseException):
                    raise TypeError(
                        f"errors() takes exceptions, got {type(item).__name__}: {item!r}")
            if metadata is not None and not isinstance(metadata, Mapping):
                raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
            lost = len(items)
            state = self._state or self._unconfigured(ERROR, len(items))
            if state is None:
                return
            builder, pipeline = state
            # Metadata is checked here too: a ValueError goes to the caller.
            self._submit(pipeline, ERROR, lambda: [builder.error(e, metadata) for e in items])
        except (TypeError, ValueError):
            raise  # a bad argument, found before anything was recorded
        except Exception:  # as in record_error(): count first, without a call, then log
            self._error_failures += lost
            try:
                self._log.error("error-failed", "dxtrack.errors() could not record the errors",
                                exc_info=True)
            except Exception:
                pass  # counted above

    def _submit(self, pipeline: Pipeline, stream: str,
                bodies: Union[List[bytes], Callable[[], List[bytes]]], *, wait: bool = True,
                seqs: Optional[List[int]] = None) -> None:
        """The one way records enter a pipeline: put ``bodies`` on ``stream``, deal with
        refusals (:meth:`_put`), then wait for the last one if ``wait`` and the mode say so.

        ``bodies`` may be a function building them (errors): it runs with SIGINT and SIGTERM
        held until the records are queued, never while waiting. ``seqs``: what ``put``
        returned already (metric()'s inline put).
        """
        held = callable(bodies)
        if held:
            hold_signals()
        try:
            built = bodies() if callable(bodies) else bodies
            pipeline, seqs = self._put(pipeline, stream, built, seqs)
        finally:
            if held:
                try:
                    release_signals()
                except RecursionError:
                    pass  # no stack left here: error() tries again on its way out
        last = max(seqs, default=0)
        if last > 0 and wait and (
            pipeline.metric_waits if stream == METRIC else pipeline.error_waits
        ):
            pipeline.wait_for(stream, last)

    def _put(self, pipeline: Pipeline, stream: str, bodies: List[bytes],
             seqs: Optional[List[int]], handed_over: bool = False) -> Tuple[Pipeline, List[int]]:
        """_submit()'s puts; returns the pipeline that took the records and what it returned.

        DROPPED: counted by the buffer, warned here. CLOSED (a concurrent ``configure()`` or
        ``close()``): handed once to the pipeline in use now, else counted."""
        if seqs is None:  # only the last one wakes the worker: they go out together
            urgent, final = stream == ERROR or pipeline.metric_urgent, len(bodies) - 1
            seqs = [pipeline.put(stream, body, urgent and i == final)
                    for i, body in enumerate(bodies)]
        if DROPPED in seqs:
            self._log.warning(f"buffer-full:{stream}", "dxtrack's %s buffer is full: records are "
                              "being dropped (see stats()['dropped'])", stream)
        closed = [body for body, seq in zip(bodies, seqs) if seq == CLOSED]
        state = self._state
        if closed and not handed_over and state is not None:
            return self._put(state[1], stream, closed, None, handed_over=True)
        for _ in closed:
            self._refuse(stream, closed=handed_over)
        return pipeline, seqs

    def _unconfigured(self, stream: str, count: int = 1) -> Optional[_State]:
        """The state to use when none is set: adopted from a parent process, or None."""
        if self._inherit and not self._closed and not self._adopted:
            with self._lock:
                if self._state is None and not self._adopted:
                    self._adopted = True
                    self._adopt_parent_settings()
            state = self._state
            if state is not None:
                return state
        for _ in range(count):
            self._refuse(stream)
        return None

    def _adopt_parent_settings(self) -> None:
        settings = inherit.inherited()
        if settings is None:
            return
        explicit = settings.pop("explicit_credentials", False)
        if explicit and settings.get("stage") != "test":
            self._log.warning("explicit-keys-not-inherited", "dxtrack: the parent process "
                              "configured explicit AWS keys, which are never passed to child "
                              "processes; call dxtrack.configure() in the worker (for example with "
                              "Pool(initializer=...)) or provide credentials through a profile, "
                              "the environment or a role")
            return
        try:
            # Not published again: this process's children inherit the same settings.
            self._use(settings_from_kwargs(settings), publish=False)
        except Exception as exc:
            self._log.warning("inherit-failed",
                              "dxtrack could not use the parent process's settings: %s", exc)

    def _refuse(self, stream: str, closed: bool = False) -> None:
        """Count and log a record nobody will send: ``closed`` when a closed pipeline refused
        it (after close(), or after the exit flush), else as the client's state says."""
        reason = "closed" if closed or self._closed else "not_configured"
        self._refused.add(reason)
        if reason == "closed":
            message = "dxtrack was closed: %s records are dropped until configure() is called again"
        else:
            message = "dxtrack is not configured: call dxtrack.configure() first; %s dropped"
        self._log.warning(reason, message, stream)

    def timer(self, name: str, metadata: Optional[Mapping[str, Any]] = None) -> Timer:
        """Time a block (``with``) or each call of a function (decorator) as metric ``name``:
        the monotonic seconds, recorded when the block ends, whether it returned or raised.

        :raises ValueError: for a bad name; TypeError for metadata not a dict (at this call).
        """
        return Timer(self, name, metadata, self._clock.monotonic)

    def flush_metrics_buffer(self, timeout: Optional[float] = None) -> bool:
        """Send everything recorded before this call, on both streams, and wait at most
        ``timeout`` seconds (``None``: until done). False when something is still pending at
        the timeout, or was dropped or failed; True when all of it was delivered."""
        state = self._state
        return state[1].flush(timeout) if state is not None else True

    flush = flush_metrics_buffer

    def close(self, timeout: Optional[float] = None) -> bool:
        """Flush (within ``timeout``, default ``shutdown_timeout``), then stop the worker.

        Idempotent: a later call returns the first call's verdict (waiting for it if need be).
        Records made after ``close()`` are dropped with a warning until ``configure()``.
        """
        with self._lock:
            state = self._state
            self._state = None
            self._closed = True
            if state is not None:
                self._closed_pipeline = state[1]
            pipeline = self._closed_pipeline
            self._capture.uninstall()
            if self._inherit:
                inherit.withdraw()
        # The pipeline keeps its first verdict; a client never configured has nothing to send.
        return pipeline.close(timeout) if pipeline is not None else True

    def stats(self) -> Dict[str, Any]:
        """Counters since this client was created, summed over its configurations: ``enqueued``,
        ``delivered``, ``pending``, ``failed``, ``retried``, ``batches``, ``dropped`` (a dict by
        reason) and whatever the sink adds."""
        with self._lock:
            pipelines = list(self._pipelines)
            total: Dict[str, Any] = {"dropped": self._refused.counts()}
            if self._error_failures:
                total["dropped"]["error_failed"] = self._error_failures
            _add(total, self._retired)
        for pipeline in pipelines:
            _add(total, pipeline.stats())
        for key in ("enqueued", "delivered", "pending", "failed", "retried", "batches",
                    "spooled", "replayed"):
            total.setdefault(key, 0)
        return total

    def _retire(self, pipeline: Pipeline) -> bool:
        """Fold a finished pipeline's counters into the totals, so it can be let go."""
        if not pipeline.finished():
            return False
        _add(self._retired, pipeline.stats())
        return True

    def __repr__(self) -> str:
        return f"DXTrack({self._config!r})" if self._config else "DXTrack(not configured)"


class _Tally:
    """Counts by key that a signal handler or ``__del__`` may add to while this thread is
    adding: ``next()`` on an ``itertools.count`` is one C call, so no increment is lost
    (``d[k] += 1`` can be interrupted between its read and its write)."""

    def __init__(self) -> None:
        self._counters: Dict[str, itertools.count[int]] = {}

    def add(self, key: str) -> None:
        next(self._counters.get(key) or self._counters.setdefault(key, itertools.count()))

    def counts(self) -> Dict[str, int]:
        # repr() of an itertools.count is "count(N)", N its next value: how many were added.
        return {key: int(repr(c)[6:-1]) for key, c in list(self._counters.items())}


def _check_profile(config: Config, from_environment: bool) -> None:
    """Refuse a ``profile_name`` the AWS config files do not define, naming the profiles they
    do: boto3 would say so only at the first send, and every record would then fail."""
    if config.profile_name is None:
        return
    import botocore.exceptions
    import botocore.session

    session = botocore.session.Session()
    files = ", ".join(os.path.expanduser(str(session.get_config_variable(name)))
                      for name in ("config_file", "credentials_file"))
    try:
        known = session.available_profiles
    except botocore.exceptions.BotoCoreError as exc:  # a file that does not parse
        problem = f"could not be looked up in the AWS config files ({files}): {exc}"
    else:
        if config.profile_name in known:
            return
        names = ", ".join(repr(name) for name in sorted(known)[:20]) or "none"
        problem = f"is not defined in the AWS config files ({files}); profiles there: {names}"
    message = f"profile_name {config.profile_name!r} {problem}"
    if from_environment:
        message = f"{variable_for('profile_name')} (from the environment): {message}"
    raise ConfigurationError(message, option="profile_name")


def _add(total: Dict[str, Any], counts: Dict[str, Any]) -> None:
    for key, value in counts.items():
        if key == "dropped":
            for reason, count in value.items():
                total["dropped"][reason] = total["dropped"].get(reason, 0) + count
        else:
            total[key] = total.get(key, 0) + value
