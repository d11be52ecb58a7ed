"""The bytes of a metric record do not change when its builder is made faster.

:class:`Frozen` is ``RecordBuilder.metric`` as it was before the caller's path was
optimised (issue 16), kept here unchanged; every case below must give the same open
body from both, or the same exception with the same message. Its lenient path (keys
that are not str, values orjson does not know) is the library's own
``_serialize_leniently``, which that work did not touch. A few cases are also pinned
as literal bytes, so the format cannot drift with both copies.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import fractions
import math
import types
from collections.abc import Mapping as _Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dxtrack import records
from dxtrack.config import Config
from dxtrack.records import ID_OVERHEAD, RecordBuilder, finalize

NOW = 1_733_184_000.123456  # time.time() during these tests
UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_9999 = 253_402_300_800.0
_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


class Frozen:
    """``RecordBuilder.metric`` before issue 16, verbatim but for names (do not edit)."""

    def __init__(self, config: Config, max_line_bytes: int) -> None:
        self._max_body = max_line_bytes - ID_OVERHEAD + 1
        self._context, self._stage, self._run_id = config.context, config.stage, config.run_id
        self._default: Dict[str, Any] = dict(config.default_metadata)
        self._datetime_format = config.timestamp_format == "datetime"

    def metric(self, name: Any, value: Any, metadata: Any = None, timestamp: Any = None) -> bytes:
        if type(name) is not str or not name:  # noqa: SIM102
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric name must be a non-empty string, got {_shown(name)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"metric value must be a finite number, got {_shown(value)}") from None
        if number - number != 0.0:
            raise ValueError(f"metric value must be a finite number, got {_shown(value)}")
        record = {
            "context": self._context, "metric_name": name, "value": number, "stage": self._stage,
            "metadata": self._default if metadata is None else self._merge(metadata),
            "run_id": self._run_id,
            "timestamp": NOW if timestamp is None and not self._datetime_format
            else self._timestamp(timestamp),
        }
        try:
            body = orjson.dumps(record)
        except TypeError:
            body = records._serialize_leniently(record, check_keys=record["metadata"])
        if len(body) > self._max_body:
            raise ValueError(
                f"metric {name!r} serializes to {len(body) + ID_OVERHEAD - 1:,} bytes, over the "
                f"Firehose record limit of {self._max_body + ID_OVERHEAD - 1:,} bytes: trim its "
                "metadata")
        return body[:-1]

    def _merge(self, metadata: Any) -> Dict[str, Any]:
        if metadata is None:
            return self._default
        if type(metadata) is not dict and not isinstance(metadata, _Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if not self._default and type(metadata) is dict:
            return metadata
        try:
            return {**self._default, **metadata}
        except (RecursionError, MemoryError):
            raise
        except Exception as exc:
            raise TypeError(
                f"metadata could not be read: {type(metadata).__name__} raised "
                f"{type(exc).__name__}: {records._safe_repr(exc)}"
            ) from exc

    def _timestamp(self, timestamp: Any) -> Any:
        if timestamp is None:
            seconds = NOW
        else:
            if isinstance(timestamp, dt.datetime):
                utc = timestamp if timestamp.tzinfo is not None else timestamp.replace(tzinfo=UTC)
                seconds = (utc - _EPOCH).total_seconds()
            elif isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
                try:
                    seconds = float(timestamp)
                except OverflowError:
                    raise _outside_the_years(timestamp) from None
                if not math.isfinite(seconds):
                    raise _bad_timestamp(timestamp)
            else:
                raise _bad_timestamp(timestamp)
            if not 0.0 <= seconds < _END_OF_9999:
                raise _outside_the_years(timestamp)
        if self._datetime_format:
            try:
                return (_EPOCH + dt.timedelta(seconds=seconds)).strftime(_DATETIME_FORMAT)
            except OverflowError:
                raise _bad_timestamp(timestamp) from None
        return seconds


def _bad_timestamp(timestamp: Any) -> ValueError:
    return ValueError(
        f"timestamp must be a datetime or unix seconds (int or float), got {_shown(timestamp)}")


def _outside_the_years(timestamp: Any) -> ValueError:
    return ValueError(
        "timestamp must be from 1970 to 9999 (UTC): unix seconds from 0 up to 253402300800, "
        f"or a datetime in those years, got {_shown(timestamp)}")


def _shown(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# -- the corpus -----------------------------------------------------------------------
class Floaty:
    """A numpy-like or Decimal-like object: only ``__float__``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Floaty({self.value!r})"


class BadFloat:
    def __float__(self) -> float:
        raise RuntimeError("no")


class Indexy:
    def __index__(self) -> int:
        return 7


class MyFloat(float):
    def __repr__(self) -> str:
        return "MyFloat!"


class MyInt(int):
    pass


class Lazy(_Mapping):  # type: ignore[type-arg]
    """A mapping that is not a dict (orjson would str() it)."""

    def __init__(self, data: Dict[Any, Any], fail: bool = False) -> None:
        self.data, self.fail = data, fail

    def __getitem__(self, key: Any) -> Any:
        if self.fail:
            raise KeyError(key)
        return self.data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


NAMES: List[Any] = [
    "rows", "scrape.products", "métrique.é", "名前", 'quote"back\\slash\nnew\ttab\x00\x1f',
    "emoji 🚀", "\u2028\u2029", "x" * 300, "lone \udc80 surrogate", "", None, 3, b"rows",
    type("S", (str,), {})("str-subclass"),
]
VALUES: List[Any] = [
    0, 1, -1, 3, 2**53 + 1, 2**63, 2**64 + 5, 10**308, 10**400, -(10**400), True, False,
    1.5, -0.0, 0.0, 5e-324, 1e-7, 1e16, 1e22, 123456789.123456789, 1.7976931348623157e308,
    float("nan"), float("inf"), -float("inf"), decimal.Decimal("1.1"), decimal.Decimal("NaN"),
    decimal.Decimal("1e400"), fractions.Fraction(1, 3), numpy.float32(1.1), numpy.float64(2.5),
    numpy.int64(7), numpy.float64("nan"), Floaty(0.1), Floaty(float("inf")), BadFloat(),
    Indexy(), MyFloat(2.25), MyInt(9), "1.5", " 2 ", "abc", "nan", None, [1], object(),
]
METADATA: List[Any] = [
    None, {}, {"shop": "example-shop", "page": 3, "category": "groceries"},
    {"nested": {"a": [1, 2.5, None, True, "x"], "b": {"c": {}}}},
    {"é": "名前", "esc": 'a"b\\c\n', "": ""}, {"page": 0},
    types.MappingProxyType({"mp": 1}), Lazy({"lazy": 2}), Lazy({"lazy": 2}, fail=True),
    collections.OrderedDict([("z", 1), ("a", 2)]), collections.Counter({"n": 2}),
    {1: "int key", (1, 2): "tuple key", None: "none key"}, {1: "a", "1": "b"},
    {"when": dt.datetime(2024, 1, 2, 3, 4, 5), "d": decimal.Decimal("1.10"), "s": {1}},
    {"huge": 2**70}, {"bytes": b"raw"}, {"lone": "\udc80"}, [("a", 1)], "text", 3,
]
TIMESTAMPS: List[Any] = [
    None, 0, 1, 1_700_000_000, 1.7e9, 1_700_000_000.5, 253_402_300_799.999,
    253_402_300_800, -1, -0.0, 2**70, float("nan"), float("inf"), True, "2024", 1.7e9j,
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456), dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
    dt.datetime(1970, 1, 1), dt.datetime(1969, 12, 31, 23, 59, 59),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999), dt.date(2024, 1, 1),
    numpy.float64(1.7e9), decimal.Decimal("1.7e9"),
]
CONFIGS: List[Dict[str, Any]] = [
    {}, {"timestamp_format": "datetime"}, {"default_metadata": {"team": "data", "page": 0}},
    {"default_metadata": {"team": "data"}, "timestamp_format": "datetime"},
    {"context": 'ctx "quoted" é', "run_id": "run\n7", "stage": "dev"},
]


def config(**options: Any) -> Config:
    options.setdefault("stage", "test")
    options.setdefault("context", "ctx")
    options.setdefault("run_id", "run-7")
    return Config(**options)


def outcome(call: Callable[[], bytes]) -> Tuple[str, Any]:
    try:
        return "bytes", call()
    except Exception as exc:  # the type and message must match too
        return type(exc).__name__, str(exc)


@pytest.fixture(autouse=True)
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_time", lambda: NOW)


def both(options: Dict[str, Any], max_line_bytes: int = records.Sink.max_line_bytes
         ) -> Tuple[Frozen, RecordBuilder]:
    c = config(**options)
    return Frozen(c, max_line_bytes), RecordBuilder(c, max_line_bytes=max_line_bytes)


def same(frozen: Frozen, builder: RecordBuilder, *args: Any) -> None:
    expected, got = outcome(lambda: frozen.metric(*args)), outcome(lambda: builder.metric(*args))
    assert got == expected, args


class TestSameBytesAsBefore:
    """Every call of the corpus gives what the frozen builder gives."""

    @pytest.mark.parametrize("options", CONFIGS, ids=repr)
    def test_names_values_and_metadata(self, options: Dict[str, Any]) -> None:
        frozen, builder = both(options)
        for name in NAMES:
            same(frozen, builder, name, 1.5)
        for value in VALUES:
            same(frozen, builder, "rows", value)
            same(frozen, builder, "rows", value, {"k": 1})
        for metadata in METADATA:
            same(frozen, builder, "rows", 3, metadata)
            same(frozen, builder, "rows", 2.5, metadata, 1.7e9)

    @pytest.mark.parametrize("options", CONFIGS, ids=repr)
    def test_timestamps(self, options: Dict[str, Any]) -> None:
        frozen, builder = both(options)
        for timestamp in TIMESTAMPS:
            same(frozen, builder, "rows", 3, None, timestamp)
            same(frozen, builder, "rows", 3, {"a": 1}, timestamp)

    def test_default_metadata_with_keys_that_are_not_str(self) -> None:
        frozen, builder = both({"default_metadata": {1: "one", "two": 2}})
        for metadata in METADATA:
            same(frozen, builder, "rows", 3, metadata)

    def test_the_size_limit_boundary(self) -> None:
        limit = 600
        frozen, builder = both({}, max_line_bytes=limit)
        base = len(finalize(frozen.metric("rows", 3, {"pad": ""}, 1.7e9)))
        fits = {"pad": "x" * (limit - base)}
        assert len(finalize(frozen.metric("rows", 3, fits, 1.7e9))) == limit
        same(frozen, builder, "rows", 3, fits, 1.7e9)
        assert len(finalize(builder.metric("rows", 3, fits, 1.7e9))) == limit
        over = {"pad": "x" * (limit - base + 1)}
        same(frozen, builder, "rows", 3, over, 1.7e9)
        with pytest.raises(ValueError, match="601 bytes, over the Firehose record limit of 600"):
            builder.metric("rows", 3, over, 1.7e9)

    def test_metadata_changed_after_the_call_is_not_in_the_record(self) -> None:
        builder = both({})[1]
        metadata = {"a": 1}
        body = builder.metric("rows", 3, metadata)
        metadata["a"] = 2
        assert b'"metadata":{"a":1}' in body

    @settings(max_examples=300, deadline=None)
    @given(
        name=st.text(min_size=0, max_size=20),
        value=st.one_of(st.integers(), st.floats(), st.booleans()),
        metadata=st.one_of(st.none(), st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers()),
            st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                         lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3)),
            max_size=4)),
        timestamp=st.one_of(st.none(), st.floats(), st.integers(),
                            st.datetimes(timezones=st.none() | st.just(UTC))),
        index=st.integers(0, len(CONFIGS) - 1),
    )
    def test_generated_calls(self, name: str, value: Any, metadata: Optional[Dict[Any, Any]],
                             timestamp: Any, index: int) -> None:
        frozen, builder = both(CONFIGS[index])
        same(frozen, builder, name, value, metadata, timestamp)


class TestPinnedBytes:
    """The format itself, as literal bytes."""

    def test_a_metric_with_metadata(self) -> None:
        builder = both({"default_metadata": {"team": "data", "page": 0}})[1]
        assert builder.metric("scrape.products", 3, {"page": 3, "é": 'a"b'}) == (
            b'{"context":"ctx","metric_name":"scrape.products","value":3.0,"stage":"test",'
            b'"metadata":{"team":"data","page":3,"\xc3\xa9":"a\\"b"},"run_id":"run-7",'
            b'"timestamp":1733184000.123456')

    def test_datetime_format_and_negative_zero(self) -> None:
        builder = both({"timestamp_format": "datetime"})[1]
        assert builder.metric("n", -0.0, None, dt.datetime(2024, 5, 6, 7, 8, 9, 5)) == (
            b'{"context":"ctx","metric_name":"n","value":-0.0,"stage":"test","metadata":{},'
            b'"run_id":"run-7","timestamp":"2024-05-06 07:08:09.000005"}'[:-1])

    def test_lenient_keys(self) -> None:
        builder = both({})[1]
        assert builder.metric("n", 2**64, {1: 2**70}, 0) == (
            b'{"context":"ctx","metric_name":"n","value":1.8446744073709552e+19,"stage":"test",'
            b'"metadata":{"1":"1180591620717411303424"},"run_id":"run-7","timestamp":0.0')


class TestJoinedParts:
    """The cases where joining pre-serialized parts could go wrong, and the fallbacks."""

    def test_a_str_subclass_equal_to_every_name_gets_its_own_bytes(self) -> None:
        class Sly(str):
            def __eq__(self, other: object) -> bool:
                return True

            __hash__ = str.__hash__

        frozen, builder = both({})
        builder.metric("rows", 1)
        sly = Sly("rows")  # same hash as the cached name, and equal to it
        same(frozen, builder, sly, 1)
        same(frozen, builder, Sly("other"), 1)

    def test_metadata_nested_to_the_depth_limit(self) -> None:
        frozen, builder = both({})
        for depth in (250, 252, 253, 254, 255):
            nested: Any = 1
            for _ in range(depth):
                nested = [nested]
            same(frozen, builder, "rows", 1, {"deep": nested})
            same(frozen, builder, "rows", 1, {"deep": nested, "pad": "x" * 600})

    def test_many_names(self) -> None:
        frozen, builder = both({})
        for i in range(records._MAX_PREFIXES + 50):
            same(frozen, builder, f"name.{i}", i)
        assert len(builder._prefixes) == records._MAX_PREFIXES
        same(frozen, builder, "name.3", 3)
        same(frozen, builder, f"name.{records._MAX_PREFIXES + 10}", 3)

    def test_configured_text_orjson_refuses(self) -> None:
        for options in ({"context": "ctx \udc80"}, {"run_id": "\ud800"}):
            try:
                frozen, builder = both(options)
            except Exception:  # noqa: BLE001 - the config may refuse it first: nothing to compare
                continue
            assert not builder._joined
            same(frozen, builder, "rows", 1, {"a": 1})
            same(frozen, builder, "rows", 1)

    def test_default_metadata_orjson_refuses(self) -> None:
        frozen, builder = both({"default_metadata": {"big": 2**70, "d": decimal.Decimal(1)}})
        same(frozen, builder, "rows", 1)
        same(frozen, builder, "rows", 1, {"a": 1})
