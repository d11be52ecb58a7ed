"""The validated, immutable settings of a dxtrack client, each option defined once.

Each field of :class:`Config` is an option (type, default, :class:`Option`); the environment
variables, children's settings and command-line flags are derived from it. All validation
happens here, once, so that the hot path (``metric()``) trusts its settings.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, Union

from .exceptions import ConfigurationError
from .sinks.packing import MAX_RECORD_BYTES as FIREHOSE_MAX_RECORD_BYTES

__all__ = [
    "Config", "DEFAULT_BLOCK_TIMEOUT", "DEFAULT_FLUSH_INTERVAL", "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_BUFFER_RECORDS", "DEFAULT_MAX_RECORD_BYTES", "DEFAULT_REGION",
    "DEFAULT_RETRY_DEADLINE", "DEFAULT_SHUTDOWN_TIMEOUT", "DEFAULT_SYNC_TIMEOUT", "OPTIONS",
    "STAGES",
]

STAGES = ("test", "dev", "prod")

#: Region used when neither ``region_name`` nor the AWS session names one.
DEFAULT_REGION = "eu-west-1"
#: Records held per stream before ``on_full`` applies.
DEFAULT_MAX_BUFFER_RECORDS = 100_000
#: Serialized bytes held per stream before ``on_full`` applies.
DEFAULT_MAX_BUFFER_BYTES = 32 * 1024 * 1024
DEFAULT_SPOOL_MAX_BYTES = 1024 ** 3
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

#: What ``compression`` may be: the client sends plain lines, or gzip members.
COMPRESSIONS = ("none", "gzip")

#: Longest ``context`` or ``run_id``: they travel in every record.
MAX_LABEL_CHARS = 1024

#: ``check(name, value)`` raises ConfigurationError, or returns None (keep the value) or
#: the value to keep instead.
Check = Callable[[str, Any], Any]


class Flag(NamedTuple):
    """An option's flag on the ``dxtrack`` command (:mod:`dxtrack.cli`)."""

    name: str
    metavar: Optional[str]
    help: str
    #: Where the value comes from when neither the flag nor the variable gives it.
    fallback: str = ""
    choices: Tuple[str, ...] = ()


class Option(NamedTuple):
    """What an option is besides its type and default, which are its field's."""

    check: Check
    #: Never shown by ``repr``, never read from ``DXTRACK_*``, never passed to children.
    secret: bool
    #: ``DXTRACK_<OPTION>`` gives a default (:mod:`dxtrack.env`).
    env: bool
    #: A child process adopts it (:meth:`Config.for_children`).
    children: bool
    flag: Optional[Flag]


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


def _option(
    default: Any = MISSING, check: Check = _text, *, factory: Any = MISSING,
    secret: bool = False, env: bool = True, children: bool = True, flag: Optional[Flag] = None,
) -> Any:
    """A field of :class:`Config`. A secret is neither read from the environment nor passed to
    children; an option whose default is ``None`` may be left ``None`` (not checked)."""
    if secret:
        check = functools.partial(_text, secret=True)
    option = Option(check, secret, env and not secret, children and not secret, flag)
    return field(default=default, default_factory=factory, metadata={"option": option})


def _must(test: Callable[[Any], bool], what: str) -> Check:
    """A check refusing, as ``<name> must <what>, got <value>``, a value that fails ``test``."""

    def check(name: str, value: Any) -> None:
        if not test(value):
            raise ConfigurationError(f"{name} must {what}, got {value!r}", option=name)

    return check


def _choice(*allowed: str) -> Check:
    return _must(lambda value: value in allowed, f"be one of {', '.join(map(repr, allowed))}")


def _whole(minimum: int, maximum: Optional[int] = None) -> Check:
    bound = f"from {minimum:,} to {maximum:,}" if maximum else f"of at least {minimum:,}"
    return _must(lambda value: isinstance(value, int) and not isinstance(value, bool)
                 and minimum <= value <= (maximum or value), f"be a whole number {bound}")


_flag = _must(lambda value: isinstance(value, bool), "be True or False")
_seconds = _must(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value) and value >= 0, "be a number of seconds >= 0")
_path = _must(lambda value: isinstance(value, (str, os.PathLike)) and bool(os.fspath(value)),
              "be a non-empty path")


def _hostport(value: Any) -> bool:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _label(name: str, value: Any) -> None:
    _text(name, value)
    if len(value) > MAX_LABEL_CHARS:  # in every record: keep them small
        raise ConfigurationError(f"{name} must be at most {MAX_LABEL_CHARS:,} characters",
                                 option=name)


def _metadata(name: str, value: Any) -> Dict[str, Any]:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a dict or None, got {type(value).__name__}",
                                 option=name)
    # A private snapshot: later changes to the caller's dict change nothing.
    return _snapshot({} if value is None else value)


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


def _endpoint(name: str, value: Any) -> None:
    # botocore refuses a malformed URL only at the first call, as a plain ValueError, which a
    # background worker could only retry: refuse it here, where it was given.
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    _text(name, value)
    if not (is_valid_endpoint_url(value) or is_valid_ipv6_endpoint_url(value)):
        raise ConfigurationError(
            f"{name} must be a URL such as 'https://firehose.eu-west-1.amazonaws.com', "
            f"got {value!r}", option=name,
        )


def _region(name: str, value: Any) -> None:
    from botocore.utils import validate_region_name

    _text(name, value)
    try:
        validate_region_name(value)
    except ValueError:
        raise ConfigurationError(
            f"{name} must be an AWS region name such as 'eu-west-1', got {value!r}", option=name
        ) from None


def _sink(name: str, value: Any) -> None:
    if not callable(getattr(value, "send", None)):
        raise ConfigurationError(f"{name} must have a send(stream, lines) method", option=name)


@dataclass(frozen=True)
class Config:
    """Settings of one client, each field an option (:func:`_option`); built with keywords,
    it validates itself. The ``repr`` shows no secret (``'***'``) and only the last four
    characters of the access key id."""

    stage: str = _option(check=_choice(*STAGES), flag=Flag("--stage", None, "the stage",
                                                          choices=STAGES))
    context: str = _option(check=_label, flag=Flag("--context", "NAME",
                                                   "name of the job, in every record"))
    run_id: str = _option(check=_label, flag=Flag("--run-id", "ID",
                                                  "this run of the job, in every record"))
    default_metadata: Mapping[str, Any] = _option(check=_metadata, factory=dict)
    # Credentials and AWS endpoint.
    profile_name: Optional[str] = _option(None, flag=Flag("--profile", "NAME", "AWS profile",
                                                          "AWS_PROFILE"))
    aws_access_key_id: Optional[str] = _option(None, env=False, children=False)
    aws_secret_access_key: Optional[str] = _option(None, secret=True)
    aws_session_token: Optional[str] = _option(None, secret=True)
    region_name: Optional[str] = _option(None, _region, flag=Flag(
        "--region", "REGION", "AWS region", f"the AWS configuration's, else {DEFAULT_REGION}"))
    endpoint_url: Optional[str] = _option(None, _endpoint, flag=Flag(
        "--endpoint-url", "URL", "another Firehose endpoint: a VPC endpoint, LocalStack, moto"))
    error_stream: Optional[str] = _option(None)
    metric_stream: Optional[str] = _option(None)
    pack_records: bool = _option(True, _flag)
    max_record_bytes: int = _option(DEFAULT_MAX_RECORD_BYTES,
                                    _whole(1024, FIREHOSE_MAX_RECORD_BYTES))
    #: 'gzip': each Firehose record is one gzip member (docs/firehose.md#compression); the
    #: stream must then not compress again (``dxtrack setup --compression gzip``).
    compression: str = _option("none", _choice(*COMPRESSIONS), flag=Flag(
        "--compression", None, "'gzip' when the client compresses (setup then makes the "
        "streams store its gzip as it is)", "none", choices=COMPRESSIONS))
    # Delivery modes.
    buffer_metrics: bool = _option(False, _flag)
    use_async_requests: bool = _option(False, _flag)
    papertrail_hostport: Optional[str] = _option(None, _must(_hostport, "look like 'host:port'"))
    #: Record (and flush) exceptions nobody caught, in the main thread and in threads.
    capture_unhandled: bool = _option(False, _flag)
    #: In the main process, flush and exit with status 143 on a SIGTERM left at its default.
    handle_sigterm: bool = _option(True, _flag)
    # Record format and stage 'test' output.
    timestamp_format: str = _option("unix", _choice("unix", "datetime"))
    output_dir: Union[str, os.PathLike[str]] = _option("./.dxtrack_output", _path)
    test_output: str = _option("file", _choice("file", "print"))
    # The pipeline.
    max_buffer_records: int = _option(DEFAULT_MAX_BUFFER_RECORDS, _whole(1))
    max_buffer_bytes: int = _option(DEFAULT_MAX_BUFFER_BYTES, _whole(FIREHOSE_MAX_RECORD_BYTES))
    on_full: str = _option("drop_newest", _choice("drop_newest", "drop_oldest", "block",
                                                  "spool"))
    block_timeout: float = _option(DEFAULT_BLOCK_TIMEOUT, _seconds)
    flush_interval: float = _option(DEFAULT_FLUSH_INTERVAL, _seconds)
    shutdown_timeout: float = _option(DEFAULT_SHUTDOWN_TIMEOUT, _seconds)
    retry_deadline: float = _option(DEFAULT_RETRY_DEADLINE, _seconds)
    sync_timeout: float = _option(DEFAULT_SYNC_TIMEOUT, _seconds)
    # The disk spool (docs/spool.md): records not delivered in time wait here.
    spool_dir: Optional[Union[str, os.PathLike[str]]] = _option(None, _path)
    spool_max_bytes: int = _option(DEFAULT_SPOOL_MAX_BYTES, _whole(1024 * 1024))
    #: A sink object replacing the stage's own destination (tests, custom outputs).
    sink: Any = _option(None, _sink, env=False, children=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # an optional option left out
            checked = f.metadata["option"].check(f.name, value)
            if checked is not None:
                object.__setattr__(self, f.name, checked)
        if self.on_full == "spool" and self.spool_dir is None:
            raise ConfigurationError("on_full='spool' needs a spool_dir", option="on_full")
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ConfigurationError("aws_access_key_id and aws_secret_access_key must be given "
                                     "together", option="aws_secret_access_key")

    def stream_name(self, stream: str) -> str:
        """The Firehose delivery stream that receives ``stream`` ('metric' or 'error')."""
        override = self.metric_stream if stream == "metric" else self.error_stream
        return override or f"dxtrack-{stream}-input-{self.stage}"

    def for_children(self) -> Dict[str, Any]:
        """The settings a child process may adopt: no secret, no credentials, no sink;
        ``output_dir`` absolute (a child may start elsewhere), and ``explicit_credentials``
        saying whether keys (which a child does not get) were given."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)
                    if f.metadata["option"].children}
        settings["output_dir"] = os.path.abspath(os.fspath(self.output_dir))
        if self.spool_dir is not None:
            settings["spool_dir"] = os.path.abspath(os.fspath(self.spool_dir))
        settings["explicit_credentials"] = self.aws_access_key_id is not None
        return settings

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "default_metadata" and not value):
                continue
            if f.metadata["option"].secret:
                shown = "'***'"
            elif f.name == "aws_access_key_id":
                shown = repr("***" + value[-4:])
            else:
                shown = repr(value)
            parts.append(f"{f.name}={shown}")
        return f"Config({', '.join(parts)})"


#: Every option, by name, in the order of :class:`Config`'s fields.
OPTIONS: Dict[str, Option] = {f.name: f.metadata["option"] for f in fields(Config)}


def settings_from_kwargs(kwargs: Dict[str, Any],
                         environ: Optional[Mapping[str, str]] = None) -> Config:
    """Build a Config, turning an unknown keyword into a clear error. With ``environ``,
    ``DXTRACK_<OPTION>`` variables supply the options ``kwargs`` leaves out or sets to
    ``None``, and an error about a value taken from a variable names the variable."""
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise TypeError(f"configure() got unexpected keyword argument(s): {', '.join(unknown)}")
    sources: Dict[str, str] = {}
    if environ is not None:
        from .env import environment_defaults, variable_for

        from_env, sources = environment_defaults(kwargs, environ)
        kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **from_env}
        for option in ("stage", "context", "run_id"):
            if kwargs.get(option) is None:
                raise TypeError(f"configure() needs {option}: pass {option}=... "
                                f"or set {variable_for(option)}")
    try:
        return Config(**kwargs)
    except ConfigurationError as exc:
        if exc.option not in sources:
            raise
        variable = sources[exc.option]
        raise ConfigurationError(f"{variable} (from the environment): {exc}",
                                 option=exc.option) from None
