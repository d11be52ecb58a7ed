"""Building the JSON records: validation, metadata, timestamps, ids.

The caller's path serializes a record without its ``id`` and keeps it *open* (no
closing brace); the worker closes it (:func:`finalize`), so the sha256 of the id
(docs/firehose.md) costs the caller nothing. Why open: orjson's output sits in a buffer
of about 4 KiB whatever the record's length; slicing off the brace makes an exact-size
copy, so the buffer's byte bound is the memory it really takes.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import hashlib
import math
import time
import traceback
from collections.abc import Mapping as _Mapping
from typing import Any, Dict, Mapping, Optional

import orjson

from .config import Config
from .exceptions import ConfigurationError
from .sinks.base import Sink

__all__ = ["ERROR", "METRIC", "ID_OVERHEAD", "RecordBuilder", "finalize"]

METRIC = "metric"
ERROR = "error"

#: Bytes :func:`finalize` adds to an open body: ``,"id":"<64 hex>"}`` and ``\n``.
ID_OVERHEAD = len(b',"id":""}') + 64 + 1

_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
#: Timestamps are refused from this many unix seconds on: 10000-01-01T00:00:00Z.
_END_OF_9999 = 253_402_300_800.0
_CUT_MARK = "\n[... {} characters cut by dxtrack to fit the Firehose record limit ...]\n"

_dumps = orjson.dumps
_time = time.time
_isfinite = math.isfinite
_sha256 = hashlib.sha256
_hexlify = binascii.hexlify
_join = b"".join

#: Prefixes of metric records kept per builder, one per metric name (a bound on odd callers
#: that make a name per call).
_MAX_PREFIXES = 1024
#: Metadata JSON this long may nest 254 levels deep: orjson's limit (255) inside a record.
_DEEP_METADATA_BYTES = 2 * 254


def finalize(body: bytes) -> bytes:
    """Close an open body: add the ``id`` key, the brace and the newline."""
    digest = _sha256(body)
    digest.update(b"}")
    return b'%b,"id":"%b"}\n' % (body, _hexlify(digest.digest()))


class RecordBuilder:
    """Turns calls into serialized record bodies for one configuration; finalized, each
    fits in ``max_line_bytes``, the limit of the sink they go to."""

    __slots__ = ("_context", "_stage", "_run_id", "_default", "_datetime_format", "_max_body",
                 "_short", "_joined", "_prefixes", "_context_part", "_stage_part", "_run_id_part",
                 "_default_json")

    def __init__(self, config: Config, *, max_line_bytes: int = Sink.max_line_bytes) -> None:
        # The longest record JSON (with its brace, without the id) that fits once finalized.
        self._max_body = max_line_bytes - ID_OVERHEAD + 1
        #: A body shorter than this is within the limit and has no metadata long enough to
        #: nest as deep as orjson's limit: metric() checks nothing more.
        self._short = min(_DEEP_METADATA_BYTES, self._max_body)
        self._context, self._stage, self._run_id = config.context, config.stage, config.run_id
        self._default: Dict[str, Any] = dict(config.default_metadata)
        self._datetime_format = config.timestamp_format == "datetime"
        #: ``default_metadata`` as JSON, or None when orjson needs the lenient path for it.
        self._default_json: Optional[bytes] = None
        try:
            self._default_json = _dumps(self._default)
        except TypeError:  # keys that are not str: refuse two written as one, once, here
            try:
                _serialize_leniently(self._default, check_keys=self._default)
            except ValueError as exc:
                raise ConfigurationError(f"default_metadata: {exc}",
                                         option="default_metadata") from None
        # A metric record is written as the same bytes orjson gives for the whole dict, joined
        # from parts: what never changes is serialized here, once (see metric()).
        self._prefixes: Dict[str, bytes] = {}  # '{"context":…,"metric_name":…,"value":' by name
        try:
            self._context_part = b'{"context":%b,"metric_name":' % _dumps(self._context)
            self._stage_part = b',"stage":%b,"metadata":' % _dumps(self._stage)
            self._run_id_part = b',"run_id":%b,"timestamp":' % _dumps(self._run_id)
            self._joined = True
        except TypeError:  # text orjson refuses (lone surrogates): the whole dict, leniently
            self._context_part = self._stage_part = self._run_id_part = b""
            self._joined = False

    def metric(self, name: str, value: Any, metadata: Optional[Mapping[str, Any]] = None,
               timestamp: Any = None) -> bytes:
        """Validate one metric and return its open body (no id, no closing brace)."""
        # The caller's hot path: the common cases are tested first and inline.
        if type(name) is str and name:  # the exact type test is the fast one
            prefix = self._prefixes.get(name)
        elif not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {_shown(name)}")
        else:  # a str subclass: its __eq__ must not find another name's prefix
            prefix = None
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range
            raise ValueError(f"metric value must be a finite number, got {_shown(value)}") from None
        if number - number != 0.0:  # NaN and the infinities
            raise ValueError(f"metric value must be a finite number, got {_shown(value)}")
        if metadata is None:
            metadata = self._default
        elif type(metadata) is not dict or self._default:  # a plain dict alone needs no _merge call
            metadata = self._merge(metadata)
        stamp = _time() if timestamp is None and not self._datetime_format else self._timestamp(
            timestamp)
        # Only the parts that vary are serialized; joined, they are byte for byte what orjson
        # writes for the whole record dict (tests/test_record_bytes.py), without the brace.
        meta = None
        try:
            if prefix is None:
                prefix = self._prefix(name)
            meta = self._default_json if metadata is self._default else _dumps(metadata)
            if meta is None:
                raise TypeError  # default_metadata needs the lenient path
            body = _join((prefix, _dumps(number), self._stage_part, meta, self._run_id_part,
                          _dumps(stamp)))
        except TypeError:  # a key that is not a str, or a value orjson does not know
            meta = None
            body = self._record_bytes(name, number, metadata, stamp)
        size = len(body)
        if size < self._short:  # the common case: within the limit, metadata not that long
            return body
        if meta is not None and len(meta) >= _DEEP_METADATA_BYTES:
            body = self._record_bytes(name, number, metadata, stamp)  # see _record_bytes
            size = len(body)
        if size >= self._max_body:  # the body has no brace: one byte short of the record
            raise ValueError(
                f"metric {name!r} serializes to {len(body) + ID_OVERHEAD:,} bytes, over the "
                f"Firehose record limit of {self._max_body + ID_OVERHEAD - 1:,} bytes: trim its "
                "metadata")
        return body

    def _prefix(self, name: str) -> bytes:
        """The record's bytes up to its value, for ``name``; kept for the first names seen."""
        if not self._joined or type(name) is not str:  # a str subclass may compare equal to any
            raise TypeError
        prefix = b'%b%b,"value":' % (self._context_part, _dumps(name))
        if len(self._prefixes) < _MAX_PREFIXES:
            self._prefixes[name] = prefix
        return prefix

    def _record_bytes(self, name: str, number: float, metadata: Mapping[str, Any],
                      stamp: Any) -> bytes:
        """metric()'s bytes from the whole record dict, as orjson (or the lenient path) writes
        it; open. Metadata at least ``_DEEP_METADATA_BYTES`` long may be nested as deep as
        orjson's limit, which it reaches one level sooner inside the record than alone."""
        record = {
            "context": self._context, "metric_name": name, "value": number, "stage": self._stage,
            "metadata": metadata, "run_id": self._run_id, "timestamp": stamp,
        }
        try:
            body = _dumps(record)
        except TypeError:  # a key that is not a str, or a value orjson does not know
            body = _serialize_leniently(record, check_keys=metadata)  # plain just failed
        return body[:-1]

    def error(self, exc: BaseException, metadata: Optional[Mapping[str, Any]] = None) -> bytes:
        """Serialize one error record, open; oversized text is cut (and marked) to fit."""
        exception = {"type": exception_type_name(exc), "value": _safe_str(exc),
                     "traceback": format_traceback(exc)}
        record: Dict[str, Any] = {
            "context": self._context, "exception": exception, "stage": self._stage,
            "metadata": self._merge(metadata), "timestamp": self._timestamp(None),
            "run_id": self._run_id,
        }
        try:
            body = _dumps(record)
        except TypeError:
            body = _serialize_leniently(record, check_keys=record["metadata"])
        if len(body) > self._max_body:
            body = _shrink_error(record, len(body) - self._max_body, self._max_body)
        return body[:-1]

    def _merge(self, metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        if metadata is None:
            return self._default
        if type(metadata) is not dict and not isinstance(metadata, _Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if not self._default and type(metadata) is dict:
            return metadata  # serialized right away, never kept: orjson reads the dict itself
        try:
            # Other mappings become dicts, which orjson writes as objects (it would str() a
            # MappingProxyType or a custom Mapping).
            return {**self._default, **metadata}
        except (RecursionError, MemoryError):
            raise  # no room left: not the mapping's fault
        except Exception as exc:  # a lazy or remote mapping, a __getitem__ that raises
            raise TypeError(
                f"metadata could not be read: {type(metadata).__name__} raised "
                f"{type(exc).__name__}: {_safe_repr(exc)}"
            ) from exc

    def _timestamp(self, timestamp: Any) -> Any:
        if timestamp is None:
            seconds = _time()
        else:
            if isinstance(timestamp, _dt.datetime):
                utc = timestamp if timestamp.tzinfo is not None else timestamp.replace(tzinfo=_UTC)
                seconds = (utc - _EPOCH).total_seconds()
            elif isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
                try:
                    seconds = float(timestamp)
                except OverflowError:  # an int beyond float range
                    raise _outside_the_years(timestamp) from None
                if not _isfinite(seconds):
                    raise _bad_timestamp(timestamp)
            else:
                raise _bad_timestamp(timestamp)
            if not 0.0 <= seconds < _END_OF_9999:
                raise _outside_the_years(timestamp)
        if self._datetime_format:
            try:
                return (_EPOCH + _dt.timedelta(seconds=seconds)).strftime(_DATETIME_FORMAT)
            except OverflowError:  # beyond the years datetime can write
                raise _bad_timestamp(timestamp) from None
        return seconds


def _bad_timestamp(timestamp: Any) -> ValueError:
    return ValueError(
        f"timestamp must be a datetime or unix seconds (int or float), got {_shown(timestamp)}")


def _outside_the_years(timestamp: Any) -> ValueError:
    return ValueError(
        "timestamp must be from 1970 to 9999 (UTC): unix seconds from 0 up to 253402300800, "
        f"or a datetime in those years, got {_shown(timestamp)}")


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


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _serialize(record: Dict[str, Any]) -> bytes:
    """``record`` as JSON, its keys not checked again (see :func:`_serialize_leniently`)."""
    try:
        return _dumps(record)
    except TypeError:
        return _serialize_leniently(record)


def _serialize_leniently(record: Dict[str, Any], check_keys: Any = None) -> bytes:
    """What plain ``orjson.dumps`` refused: unknown values as ``str()``, then value by value.

    Keys that are not str are written as text, so two can come out as one (``1`` and
    ``"1"``): ValueError if so, looked for in ``check_keys`` (the caller's metadata,
    inside ``record``); the value-by-value path checks every mapping as it goes.
    """
    try:
        body = _dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # Integers beyond 64 bits, recursion too deep, str() that fails: go value by value.
        return _dumps(_plain(record, 0))
    if check_keys is not None:
        _refuse_keys_written_as_one(check_keys, 0)
    return body


def _refuse_keys_written_as_one(value: Any, depth: int) -> None:
    """Raise ValueError if two keys of a dict in ``value`` are written as the same text.

    Only a dict with a key that is not a str needs a look: each key is written by
    orjson exactly as the record's were, and read back.
    """
    if depth > 255:  # orjson writes no deeper
        return
    if isinstance(value, dict):
        if any(type(key) is not str for key in value) and len(orjson.loads(
                _dumps(dict.fromkeys(value), option=orjson.OPT_NON_STR_KEYS))) < len(value):
            seen = set()  # two keys are written as one: which?
            for key in value:
                text = next(iter(orjson.loads(_dumps({key: None}, option=orjson.OPT_NON_STR_KEYS))))
                if text in seen:
                    raise _repeated_key(text)
                seen.add(text)
        items: Any = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return
    for item in items:
        if isinstance(item, (dict, list, tuple)):  # scalars need no call
            _refuse_keys_written_as_one(item, depth + 1)


def _repeated_key(key: str) -> ValueError:
    return ValueError(
        f"metadata has two keys that are both written as {key!r}: a key that is not a str is "
        "written as its text (1 as '1'), and a reader would keep only one of them; rename or "
        "drop one")


def _plain(value: Any, depth: int) -> Any:
    """A copy of ``value`` that orjson can always serialize (strings where it cannot)."""
    if depth > 64:
        return _safe_repr(value)
    if isinstance(value, _Mapping):
        plain: Dict[str, Any] = {}
        for key, item in value.items():
            text = _safe_repr(key)
            if text in plain:  # a dict would keep one of the two silently
                raise _repeated_key(text)
            plain[text] = _plain(item, depth + 1)
        return plain
    if isinstance(value, (list, tuple)):
        return [_plain(item, depth + 1) for item in value]
    try:
        _dumps(value)
        return value
    except TypeError:
        return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    """``str(value)``, made encodable: lone surrogates (from ``surrogateescape``) are escaped."""
    try:
        text = str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message: never raises, never longer than ``limit``."""
    try:
        text = repr(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _shrink_error(record: Dict[str, Any], excess: int, max_body: int) -> bytes:
    """Make an oversized error record fit ``max_body`` bytes, marking every cut.

    The exception is what an error record is for, so large metadata goes first. Then the
    value and the traceback are cut in the middle (head and tail say the most), the value to
    at most half the room left when the traceback needs the rest: a huge message is repeated
    at the end of the traceback, and the frames above it must survive.
    """
    exception = record["exception"]
    if len(_serialize(record["metadata"])) > max_body // 2:
        record["metadata"] = dict(_METADATA_REMOVED)
        body = _serialize(record)
        excess = len(body) - max_body
        if excess <= 0:
            return body
    value_bytes = len(_serialize_text(exception["value"]))
    traceback_bytes = len(_serialize_text(exception["traceback"]))
    room = value_bytes + traceback_bytes - excess
    value_excess = value_bytes - max(room // 2, room - traceback_bytes)
    if value_excess > 0:
        exception["value"] = _cut_middle(exception["value"], value_excess)
    body = _serialize(record)
    excess = len(body) - max_body
    if excess > 0:
        exception["traceback"] = _cut_middle(exception["traceback"], excess)
        body = _serialize(record)
    if len(body) > max_body:
        record["metadata"] = dict(_METADATA_REMOVED)
        body = _serialize(record)
    while len(body) > max_body:  # only pathological escapes get here
        exception["traceback"] = exception["traceback"][: len(exception["traceback"]) // 2]
        exception["value"] = exception["value"][: len(exception["value"]) // 2]
        body = _serialize(record)
    return body


_METADATA_REMOVED = {"dxtrack": "metadata removed: the error record was over the size limit"}


def _serialize_text(text: str) -> bytes:
    return _dumps(_safe_repr(text))


def _cut_middle(text: str, excess_bytes: int) -> str:
    """Keep the head and the tail of ``text``, at least ``excess_bytes`` shorter once encoded."""
    encoded = len(_serialize_text(text))
    # Estimate the characters to drop from their average encoded size, then check and grow.
    drop = min(len(text), excess_bytes * len(text) // max(encoded, 1) + len(_CUT_MARK) + 32)
    while True:
        keep = len(text) - drop
        head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2):] if keep else ""
        candidate = head + _CUT_MARK.format(f"{drop:,}") + tail
        if len(_serialize_text(candidate)) <= encoded - excess_bytes or drop >= len(text):
            return candidate
        drop = min(len(text), drop * 2)
