"""The validated, immutable settings of a dxtrack client.

``configure()`` builds one :class:`Config` and every other part of the library
reads from it. All validation happens here, once, so that the hot path
(``metric()``) trusts what it is given.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from .exceptions import ConfigurationError
from .sinks.packing import MAX_RECORD_BYTES as FIREHOSE_MAX_RECORD_BYTES

__all__ = [
    "Config",
    "DEFAULT_BLOCK_TIMEOUT",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_BUFFER_RECORDS",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_REGION",
    "DEFAULT_RETRY_DEADLINE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_SYNC_TIMEOUT",
    "STAGES",
]

STAGES = ("test", "dev", "prod")
TIMESTAMP_FORMATS = ("unix", "datetime")
TEST_OUTPUTS = ("file", "print")
ON_FULL_POLICIES = ("drop_newest", "drop_oldest", "block")

#: Region used when neither ``region_name`` nor the AWS session names one.
DEFAULT_REGION = "eu-west-1"
#: Records held per stream before ``on_full`` applies.
DEFAULT_MAX_BUFFER_RECORDS = 100_000
#: Serialized bytes held per stream before ``on_full`` applies.
DEFAULT_MAX_BUFFER_BYTES = 32 * 1024 * 1024
#: Seconds the oldest pending record waits before the worker sends it anyway.
DEFAULT_FLUSH_INTERVAL = 5.0
#: Seconds ``on_full='block'`` waits for room before dropping the record.
DEFAULT_BLOCK_TIMEOUT = 1.0
#: Seconds the exit flush may take before the interpreter is let go.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
#: Seconds a batch is retried after its first failed attempt before it counts as failed.
DEFAULT_RETRY_DEADLINE = 60.0
#: Seconds a synchronous (default mode) call waits for its record to be settled.
DEFAULT_SYNC_TIMEOUT = 10.0
#: Largest Firehose record dxtrack builds when packing lines (the service allows 1,024,000).
DEFAULT_MAX_RECORD_BYTES = 1_000_000

#: Longest ``context`` or ``run_id``: they travel in every record.
MAX_LABEL_CHARS = 1024

_SECRET_FIELDS = frozenset({"aws_secret_access_key", "aws_session_token"})


@dataclass(frozen=True)
class Config:
    """Settings of one client. Build it with keywords; it validates itself.

    The ``repr`` never shows a secret: the secret key and session token are
    replaced by ``'***'`` and the access key id is cut to its last four
    characters.
    """

    stage: str
    context: str
    run_id: str
    default_metadata: Mapping[str, Any] = field(default_factory=dict)
    # Credentials and AWS endpoint.
    profile_name: Optional[str] = None
    aws_access_key_id: Optional[str] = None
    aws_secret_access_key: Optional[str] = None
    aws_session_token: Optional[str] = None
    region_name: Optional[str] = None
    endpoint_url: Optional[str] = None
    error_stream: Optional[str] = None
    metric_stream: Optional[str] = None
    pack_records: bool = True
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    # Delivery modes.
    buffer_metrics: bool = False
    use_async_requests: bool = False
    papertrail_hostport: Optional[str] = None
    #: Record (and flush) exceptions nobody caught, in the main thread and in threads.
    capture_unhandled: bool = False
    #: In the main process, flush and exit with status 143 on a SIGTERM left at its default.
    handle_sigterm: bool = True
    # Record format and stage 'test' output.
    timestamp_format: str = "unix"
    output_dir: str = "./.dxtrack_output"
    test_output: str = "file"
    # The pipeline.
    max_buffer_records: int = DEFAULT_MAX_BUFFER_RECORDS
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    on_full: str = "drop_newest"
    block_timeout: float = DEFAULT_BLOCK_TIMEOUT
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    retry_deadline: float = DEFAULT_RETRY_DEADLINE
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    #: A sink object replacing the stage's own destination (tests, custom outputs).
    sink: Any = None

    def __post_init__(self) -> None:
        _choice("stage", self.stage, STAGES)
        _text("context", self.context)
        _text("run_id", self.run_id)
        for name in ("context", "run_id"):  # in every record: keep them small
            if len(getattr(self, name)) > MAX_LABEL_CHARS:
                raise ConfigurationError(
                    f"{name} must be at most {MAX_LABEL_CHARS:,} characters", option=name
                )
        if self.default_metadata is None:
            object.__setattr__(self, "default_metadata", {})
        elif not isinstance(self.default_metadata, Mapping):
            raise ConfigurationError(
                "default_metadata must be a dict or None, got "
                f"{type(self.default_metadata).__name__}",
                option="default_metadata",
            )
        else:
            # A private snapshot: later changes to the caller's dict change nothing.
            object.__setattr__(self, "default_metadata", _snapshot(self.default_metadata))
        for name in (
            "profile_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
            "region_name", "endpoint_url", "error_stream", "metric_stream",
        ):
            value = getattr(self, name)
            if value is not None:
                _text(name, value, secret=name in _SECRET_FIELDS)
        if self.endpoint_url is not None:
            _endpoint("endpoint_url", self.endpoint_url)
        if self.region_name is not None:
            _region("region_name", self.region_name)
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ConfigurationError(
                "aws_access_key_id and aws_secret_access_key must be given together",
                option="aws_secret_access_key",
            )
        for name in ("pack_records", "buffer_metrics", "use_async_requests", "capture_unhandled",
                     "handle_sigterm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be True or False, got {getattr(self, name)!r}", option=name
                )
        if self.papertrail_hostport is not None:
            _hostport("papertrail_hostport", self.papertrail_hostport)
        _choice("timestamp_format", self.timestamp_format, TIMESTAMP_FORMATS)
        _choice("test_output", self.test_output, TEST_OUTPUTS)
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise ConfigurationError(
                f"output_dir must be a non-empty path, got {self.output_dir!r}",
                option="output_dir",
            )
        _choice("on_full", self.on_full, ON_FULL_POLICIES)
        _integer("max_buffer_records", self.max_buffer_records, minimum=1)
        _integer("max_buffer_bytes", self.max_buffer_bytes, minimum=FIREHOSE_MAX_RECORD_BYTES)
        _integer("max_record_bytes", self.max_record_bytes, minimum=1024,
                 maximum=FIREHOSE_MAX_RECORD_BYTES)
        for name in ("block_timeout", "flush_interval", "shutdown_timeout", "retry_deadline",
                     "sync_timeout"):
            _seconds(name, getattr(self, name))
        if self.sink is not None and not callable(getattr(self.sink, "send", None)):
            raise ConfigurationError("sink must have a send(stream, lines) method", option="sink")

    def stream_name(self, stream: str) -> str:
        """The Firehose delivery stream that receives ``stream`` ('metric' or 'error')."""
        override = self.metric_stream if stream == "metric" else self.error_stream
        return override or f"dxtrack-{stream}-input-{self.stage}"

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "default_metadata" and not value):
                continue
            if f.name in _SECRET_FIELDS:
                shown = "'***'"
            elif f.name == "aws_access_key_id":
                shown = repr("***" + value[-4:])
            else:
                shown = repr(value)
            parts.append(f"{f.name}={shown}")
        return f"Config({', '.join(parts)})"


def _choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise ConfigurationError(f"{name} must be one of {choices}, got {value!r}", option=name)


def _text(name: str, value: Any, *, secret: bool = False) -> None:
    if not isinstance(value, str) or not value.strip():
        # A secret given in the wrong form is still a secret: name its type, not its value.
        if not secret:
            shown = repr(value)
        elif isinstance(value, str):
            shown = "a blank string"
        else:
            shown = f"a value of type {type(value).__name__}"
        raise ConfigurationError(f"{name} must be a non-empty string, got {shown}", option=name)


def _snapshot(metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """A deep copy of ``metadata``; values that cannot be copied are shared, not refused."""
    try:
        return copy.deepcopy(dict(metadata))
    except Exception:  # a lock, a socket, a generator: written as str() like any odd value
        return {key: _copy_or_share(value) for key, value in metadata.items()}


def _copy_or_share(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


def _integer(name: str, value: Any, *, minimum: int, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
        maximum is not None and value > maximum
    ):
        if maximum is not None:
            bound = f"from {minimum:,} to {maximum:,}"
        else:
            bound = f"of at least {minimum:,}"
        raise ConfigurationError(
            f"{name} must be a whole number {bound}, got {value!r}", option=name
        )


def _seconds(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(
            f"{name} must be a number of seconds >= 0, got {value!r}", option=name
        )


def _endpoint(name: str, value: str) -> None:
    # botocore refuses a malformed URL only at the first call, as a plain ValueError, which a
    # background worker could only retry: refuse it here, where it was given.
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    if not (is_valid_endpoint_url(value) or is_valid_ipv6_endpoint_url(value)):
        raise ConfigurationError(
            f"{name} must be a URL such as 'https://firehose.eu-west-1.amazonaws.com', "
            f"got {value!r}", option=name,
        )


def _region(name: str, value: str) -> None:
    from botocore.utils import validate_region_name

    try:
        validate_region_name(value)
    except ValueError:
        raise ConfigurationError(
            f"{name} must be an AWS region name such as 'eu-west-1', got {value!r}", option=name
        ) from None


def _hostport(name: str, value: Any) -> None:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{name} must look like 'host:port', got {value!r}", option=name)


def settings_from_kwargs(
    kwargs: Dict[str, Any], environ: Optional[Mapping[str, str]] = None
) -> Config:
    """Build a Config, turning an unknown keyword into a clear error.

    With ``environ`` (``os.environ`` for ``configure()``), ``DXTRACK_<OPTION>``
    variables supply the options ``kwargs`` leaves out or sets to ``None``;
    an error about a value taken from a variable names the variable.
    """
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"configure() got unexpected keyword argument(s): {', '.join(unknown)}")
    sources: Dict[str, str] = {}
    if environ is not None:
        from .env import environment_defaults, variable_for

        from_env, sources = environment_defaults(kwargs, environ)
        kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **from_env}
        for option in ("stage", "context", "run_id"):
            if kwargs.get(option) is None:
                raise TypeError(
                    f"configure() needs {option}: pass {option}=... or set {variable_for(option)}"
                )
    try:
        return Config(**kwargs)
    except ConfigurationError as exc:
        if exc.option not in sources:
            raise
        variable = sources[exc.option]
        raise ConfigurationError(
            f"{variable} (from the environment): {exc}", option=exc.option
        ) from None
