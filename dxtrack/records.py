"""Building the JSON records: validation, metadata, timestamps, ids.

The caller's path serializes a record *without* its ``id``; the worker adds
the id later (:func:`finalize`), so the sha256 costs nothing on the caller's
thread. The id is the sha256 hex digest of the record's JSON without the
``id`` key, exactly as serialized: two records with identical content have
identical ids, which lets a reader drop duplicates.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import sys
import time
import traceback
from typing import Any, Dict, Mapping, Optional

import orjson

from .config import FIREHOSE_MAX_RECORD_BYTES, Config

__all__ = ["ERROR", "METRIC", "ID_OVERHEAD", "RecordBuilder", "finalize"]

METRIC = "metric"
ERROR = "error"

#: Bytes :func:`finalize` adds to a serialized body: ``,"id":"<64 hex>"`` and ``\n``.
ID_OVERHEAD = len(b',"id":""') + 64 + 1
#: Largest body (without id) that still fits one Firehose record once finalized.
MAX_BODY_BYTES = FIREHOSE_MAX_RECORD_BYTES - ID_OVERHEAD

_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_CUT_MARK = "\n[... {} characters cut by dxtrack to fit the Firehose record limit ...]\n"

_dumps = orjson.dumps
_time = time.time
_isfinite = math.isfinite
_sha256 = hashlib.sha256


def finalize(body: bytes) -> bytes:
    """Add the ``id`` key and the closing newline to a serialized record."""
    digest = _sha256(body).hexdigest().encode()
    return body[:-1] + b',"id":"' + digest + b'"}\n'


class RecordBuilder:
    """Turns calls into serialized record bodies for one configuration."""

    __slots__ = ("_context", "_stage", "_run_id", "_default", "_datetime_format")

    def __init__(self, config: Config) -> None:
        self._context = config.context
        self._stage = config.stage
        self._run_id = config.run_id
        self._default: Dict[str, Any] = dict(config.default_metadata)
        self._datetime_format = config.timestamp_format == "datetime"

    # -- metrics -----------------------------------------------------------
    def metric(
        self,
        name: str,
        value: Any,
        metadata: Optional[Mapping[str, Any]] = None,
        timestamp: Any = None,
    ) -> bytes:
        """Validate one metric and return its serialized body (no id yet)."""
        # The caller's hot path: the common cases are tested first and inline.
        if type(name) is not str or not name:
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric value must be a finite number, got {value!r}") from None
        if number - number != 0.0:  # NaN and the infinities
            raise ValueError(f"metric value must be a finite number, got {value!r}")
        record = {
            "context": self._context,
            "metric_name": name,
            "value": number,
            "stage": self._stage,
            "metadata": self._default if metadata is None else self._merge(metadata),
            "run_id": self._run_id,
            "timestamp": _time() if timestamp is None and not self._datetime_format
            else self._timestamp(timestamp),
        }
        try:
            body = _dumps(record)
        except TypeError:
            body = _serialize(record)
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(
                f"metric {name!r} serializes to {len(body) + ID_OVERHEAD:,} bytes, over the "
                f"Firehose record limit of {FIREHOSE_MAX_RECORD_BYTES:,} bytes: trim its metadata"
            )
        return body

    # -- errors ------------------------------------------------------------
    def error(self, exc: BaseException, metadata: Optional[Mapping[str, Any]] = None) -> bytes:
        """Serialize one error record; oversized text is cut (and marked) to fit."""
        record: Dict[str, Any] = {
            "context": self._context,
            "exception": {
                "type": exception_type_name(exc),
                "value": _safe_str(exc),
                "traceback": format_traceback(exc),
            },
            "stage": self._stage,
            "metadata": self._merge(metadata),
            "timestamp": self._timestamp(None),
            "run_id": self._run_id,
        }
        body = _serialize(record)
        if len(body) > MAX_BODY_BYTES:
            body = _shrink_error(record, len(body) - MAX_BODY_BYTES)
        return body

    # -- shared pieces -----------------------------------------------------
    def _merge(self, metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        if metadata is None:
            return self._default
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if not self._default:
            return metadata  # type: ignore[return-value]  # serialized right away, never kept
        merged = dict(self._default)
        merged.update(metadata)
        return merged

    def _timestamp(self, timestamp: Any) -> Any:
        if timestamp is None:
            seconds = _time()
        elif isinstance(timestamp, _dt.datetime):
            if timestamp.tzinfo is None:
                timestamp = timestamp.replace(tzinfo=_UTC)
            seconds = (timestamp - _EPOCH).total_seconds()
        elif isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool) and _isfinite(
            timestamp
        ):
            seconds = float(timestamp)
        else:
            raise ValueError(
                f"timestamp must be a datetime or unix seconds (int or float), got {timestamp!r}"
            )
        if self._datetime_format:
            return (_EPOCH + _dt.timedelta(seconds=seconds)).strftime(_DATETIME_FORMAT)
        return seconds


def exception_type_name(exc: BaseException) -> str:
    """``ValueError`` for built-ins, ``package.module.Class`` for everything else."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def format_traceback(exc: BaseException) -> str:
    """The printable traceback of ``exc``, chained causes and context included."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as failure:  # a broken __str__ must not cost the record
        return f"<traceback unavailable: {failure!r}>"


def current_exception() -> Optional[BaseException]:
    """The exception being handled right now, if any."""
    return sys.exc_info()[1]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _serialize(record: Dict[str, Any]) -> bytes:
    try:
        return _dumps(record)
    except TypeError:
        pass
    try:
        return _dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # Integers beyond 64 bits, recursion too deep, str() that fails: go value by value.
        return _dumps(_plain(record, 0))


def _plain(value: Any, depth: int) -> Any:
    """A copy of ``value`` that orjson can always serialize (strings where it cannot)."""
    if depth > 64:
        return _safe_repr(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, depth + 1) for item in value]
    try:
        _dumps(value)
        return value
    except TypeError:
        return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _shrink_error(record: Dict[str, Any], excess: int) -> bytes:
    """Cut traceback, then value, then metadata until the record fits one Firehose record."""
    exception = record["exception"]
    for key in ("traceback", "value"):
        text = exception[key]
        # Characters can take up to 6 bytes once JSON-escaped; cut generously, then check.
        if excess > 0 and text:
            exception[key] = _cut_middle(text, excess)
            body = _serialize(record)
            excess = len(body) - MAX_BODY_BYTES
            if excess <= 0:
                return body
    record["metadata"] = {"dxtrack": "metadata removed: the error record was over the size limit"}
    body = _serialize(record)
    while len(body) > MAX_BODY_BYTES:  # only pathological escapes get here
        exception["traceback"] = exception["traceback"][: len(exception["traceback"]) // 2]
        exception["value"] = exception["value"][: len(exception["value"]) // 2]
        body = _serialize(record)
    return body


def _cut_middle(text: str, excess_bytes: int) -> str:
    """Keep the head and the tail of ``text`` (where tracebacks say the most)."""
    encoded_excess = excess_bytes + len(_CUT_MARK) + 32
    drop = min(len(text), encoded_excess)
    while True:
        keep = len(text) - drop
        head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2):] if keep else ""
        candidate = head + _CUT_MARK.format(f"{drop:,}") + tail
        if len(_dumps(candidate)) <= len(_dumps(text)) - excess_bytes or drop >= len(text):
            return candidate
        drop = min(len(text), drop * 2)
