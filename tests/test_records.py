"""Record building: formats, metadata, timestamps, ids, validation, oversized errors.

These tests drive :class:`dxtrack.records.RecordBuilder` and :func:`finalize`
directly (no thread, no sink), so they check the bytes dxtrack writes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import math
import re
import time
import tracemalloc
import types
from collections.abc import Mapping
from typing import Any, Dict, Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dxtrack.config import Config
from dxtrack.records import RecordBuilder, finalize

#: Firehose's limit on one record, from the service documentation: the builder's default.
FIREHOSE_MAX_RECORD_BYTES = 1_024_000

METRIC_KEYS = ["context", "metric_name", "value", "stage", "metadata", "run_id", "timestamp", "id"]
ERROR_KEYS = ["context", "exception", "stage", "metadata", "timestamp", "run_id", "id"]
EXCEPTION_KEYS = ["type", "value", "traceback"]
CUT_MARK = "characters cut by dxtrack to fit the Firehose record limit"

UTC = dt.timezone.utc


def short(value: Any) -> str:
    """A test id that stays readable for huge values, and is the same in every process
    (no memory address: pytest-xdist's workers must collect the same ids)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))[:40]


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a local time zone 5 h 45 min east of UTC, so local-time mistakes show."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() is needed to change the local time zone")
    monkeypatch.setenv("TZ", "<+0545>-05:45")  # POSIX form: no tz database needed
    time.tzset()
    assert (time.localtime(0).tm_hour, time.localtime(0).tm_min) == (5, 45)
    yield
    monkeypatch.undo()
    time.tzset()


def builder(max_line_bytes: int = FIREHOSE_MAX_RECORD_BYTES, **options: Any) -> RecordBuilder:
    options.setdefault("stage", "test")
    options.setdefault("context", "ctx")
    options.setdefault("run_id", "run-7")
    return RecordBuilder(Config(**options), max_line_bytes=max_line_bytes)


def parse(body: bytes) -> Dict[str, Any]:
    """The record as a reader sees it: finalized (id added), one line, parsed."""
    line = finalize(body)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return orjson.loads(line)


def metric(metadata: Any = None, **options: Any) -> Dict[str, Any]:
    return parse(builder(**options).metric("rows", 3, metadata=metadata))


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as an ``except`` block would see it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


class Unprintable:
    """An object whose str() and repr() both fail."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


class TestMetricFormat:
    """A metric record has exactly the reference keys, in the reference order."""

    def test_keys_and_order(self) -> None:
        record = metric({"shop": "a"})
        assert list(record) == METRIC_KEYS

    def test_values(self) -> None:
        record = parse(
            builder(stage="dev").metric("scrape.products", 120, {"shop": "a"}, 1700000000)
        )
        assert record == {
            "context": "ctx",
            "metric_name": "scrape.products",
            "value": 120.0,
            "stage": "dev",
            "metadata": {"shop": "a"},
            "run_id": "run-7",
            "timestamp": 1700000000.0,
            "id": record["id"],
        }

    def test_body_is_open_compact_json_without_id_or_newline(self) -> None:
        body = builder().metric("rows", 1)
        assert body.startswith(b"{") and not body.endswith(b"}")
        assert b"\n" not in body and b'"id"' not in body
        assert orjson.loads(body + b"}")["metric_name"] == "rows"

    def test_bodies_take_only_their_own_size(self) -> None:
        """orjson's output sits in a ~4 KiB buffer; a buffered body must not keep it."""
        b = builder()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            bodies = [b.metric("rows", i) for i in range(1000)]
            per_body = (tracemalloc.get_traced_memory()[0] - before) / len(bodies)
        finally:
            tracemalloc.stop()
        assert per_body < 2 * len(bodies[0]) + 64


class TestErrorFormat:
    """An error record has exactly the reference keys, in the reference order."""

    def test_keys_and_order(self) -> None:
        record = parse(builder().error(raised(ValueError("boom")), {"shop": "a"}))
        assert list(record) == ERROR_KEYS
        assert list(record["exception"]) == EXCEPTION_KEYS

    def test_values(self) -> None:
        record = parse(builder(stage="prod").error(raised(KeyError("sku")), {"shop": "a"}))
        assert record["context"] == "ctx"
        assert record["stage"] == "prod"
        assert record["run_id"] == "run-7"
        assert record["metadata"] == {"shop": "a"}
        assert record["exception"]["type"] == "KeyError"
        assert record["exception"]["value"] == "'sku'"
        assert isinstance(record["timestamp"], float)

    def test_builtin_types_are_bare_and_others_qualified(self) -> None:
        class ScrapeFailed(Exception):
            pass

        record = parse(builder().error(raised(ScrapeFailed("x"))))
        assert record["exception"]["type"] == (
            f"{__name__}.TestErrorFormat.test_builtin_types_are_bare_and_others_qualified"
            ".<locals>.ScrapeFailed"
        )
        assert parse(builder().error(raised(OSError(2, "gone"))))["exception"]["type"] == (
            "FileNotFoundError"
        )

    def test_traceback_names_the_frames(self) -> None:
        def fetch_page() -> None:
            raise TimeoutError("slow shop")

        try:
            fetch_page()
        except TimeoutError as exc:
            record = parse(builder().error(exc))
        traceback = record["exception"]["traceback"]
        assert traceback.startswith("Traceback (most recent call last):")
        assert "in fetch_page" in traceback
        assert traceback.endswith("TimeoutError: slow shop\n")

    def test_traceback_includes_chained_causes_and_context(self) -> None:
        def parse_price() -> None:
            try:
                int("12,5")
            except ValueError as low:
                raise LookupError("price unreadable") from low

        try:
            try:
                parse_price()
            except LookupError:
                raise RuntimeError("product skipped")  # noqa: B904 (the implicit context is tested)
        except RuntimeError as exc:
            record = parse(builder().error(exc))
        traceback = record["exception"]["traceback"]
        assert "invalid literal for int() with base 10: '12,5'" in traceback
        assert "The above exception was the direct cause of the following exception" in traceback
        assert "During handling of the above exception, another exception occurred" in traceback
        assert (
            traceback.index("ValueError")
            < traceback.index("LookupError")
            < traceback.index("RuntimeError: product skipped")
        )
        assert record["exception"]["value"] == "product skipped"

    def test_exception_never_raised_has_a_trace_without_frames(self) -> None:
        record = parse(builder().error(ValueError("built, not raised")))
        assert record["exception"]["traceback"] == "ValueError: built, not raised\n"

    def test_unprintable_exception_still_makes_a_record(self) -> None:
        class Broken(Exception):
            def __str__(self) -> str:
                raise RuntimeError("broken __str__")

        record = parse(builder().error(raised(Broken())))
        assert record["exception"]["value"] == "<unprintable Broken>"
        assert list(record) == ERROR_KEYS


class TestMetadataMerge:
    """metadata is default_metadata updated with the call's (the call wins)."""

    def test_call_wins_and_both_kept(self) -> None:
        record = metric({"shop": "b", "page": 2}, default_metadata={"shop": "a", "host": "w3"})
        assert record["metadata"] == {"shop": "b", "host": "w3", "page": 2}

    def test_default_alone(self) -> None:
        assert metric(None, default_metadata={"host": "w3"})["metadata"] == {"host": "w3"}

    def test_neither_gives_an_empty_object(self) -> None:
        assert metric(None)["metadata"] == {}
        assert parse(builder().error(raised(ValueError())))["metadata"] == {}

    def test_errors_merge_the_same_way(self) -> None:
        b = builder(default_metadata={"shop": "a", "host": "w3"})
        record = parse(b.error(raised(ValueError()), {"shop": "b"}))
        assert record["metadata"] == {"shop": "b", "host": "w3"}

    def test_a_call_does_not_change_the_defaults(self) -> None:
        b = builder(default_metadata={"shop": "a"})
        b.metric("rows", 1, {"shop": "b", "extra": 1})
        assert parse(b.metric("rows", 1))["metadata"] == {"shop": "a"}

    @pytest.mark.parametrize("defaults", [{}, {"host": "w3"}])
    def test_any_mapping_is_written_as_an_object(self, defaults: Dict[str, Any]) -> None:
        proxy = types.MappingProxyType({"shop": "a"})
        assert metric(proxy, default_metadata=defaults)["metadata"] == {**defaults, "shop": "a"}

    @pytest.mark.parametrize("bad", ["shop=a", ["shop", "a"], 3])
    def test_metadata_that_is_not_a_mapping_is_a_type_error(self, bad: Any) -> None:
        with pytest.raises(TypeError, match="metadata must be a dict or None"):
            builder().metric("rows", 1, bad)

    @settings(max_examples=150, deadline=None)
    @given(
        defaults=st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=4),
        call=st.dictionaries(st.text(max_size=5), st.integers(10, 19), max_size=4),
    )
    def test_merge_property(self, defaults: Dict[str, int], call: Dict[str, int]) -> None:
        record = parse(builder(default_metadata=defaults).metric("rows", 1, call))
        assert record["metadata"] == {**defaults, **call}


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


class TestMetadataValues:
    """JSON-able metadata round-trips; anything else is written as its str()."""

    @settings(max_examples=100, deadline=None)
    @given(metadata=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6))
    def test_json_metadata_round_trips(self, metadata: Dict[str, Any]) -> None:
        assert metric(metadata)["metadata"] == metadata
        assert parse(builder().error(ValueError("x"), metadata))["metadata"] == metadata

    def test_unserializable_values_become_their_str(self) -> None:
        when = dt.date(2026, 11, 27)
        record = metric(
            {
                "price": decimal.Decimal("12.50"),
                "tags": {"b"},
                "obj": Unprintable(),
                "when": when,
                "kind": ValueError,
            }
        )
        assert record["metadata"] == {
            "price": "12.50",
            "tags": "{'b'}",
            "obj": "<unprintable Unprintable>",
            "when": "2026-11-27",
            "kind": "<class 'ValueError'>",
        }

    def test_non_str_keys_become_strings(self) -> None:
        record = metric({7: "seven", 2.5: "x", None: "n", dt.date(2026, 11, 27): "d"})
        assert record["metadata"] == {"7": "seven", "2.5": "x", "null": "n", "2026-11-27": "d"}
        assert metric({("a", 1): "tuple", 7: "seven"})["metadata"] == {
            "('a', 1)": "tuple",
            "7": "seven",
        }

    def test_integers_beyond_64_bits_become_strings(self) -> None:
        huge = 2**64 + 1
        record = metric({"huge": huge, "nested": [-(2**70)], "fine": 2**63 - 1})
        assert record["metadata"] == {
            "huge": str(huge),
            "nested": [str(-(2**70))],
            "fine": 2**63 - 1,
        }

    def test_lone_surrogates_are_escaped_not_fatal(self) -> None:
        name = b"caf\xe9.csv".decode("utf-8", "surrogateescape")
        record = metric({"file": name, name: 1})
        assert record["metadata"] == {"file": "caf\\udce9.csv", "caf\\udce9.csv": 1}

    def test_error_with_surrogates_in_its_message_is_recorded(self) -> None:
        name = b"caf\xe9.csv".decode("utf-8", "surrogateescape")
        record = parse(builder().error(raised(FileNotFoundError(f"missing {name}")), {"f": name}))
        assert record["exception"]["value"] == "missing caf\\udce9.csv"
        assert record["metadata"] == {"f": "caf\\udce9.csv"}

    def test_circular_metadata_does_not_lose_the_record(self) -> None:
        loop: Dict[str, Any] = {"a": 1}
        loop["self"] = loop
        record = metric({"loop": loop})
        assert list(record) == METRIC_KEYS
        assert "{...}" in orjson.dumps(record["metadata"]).decode()

    def test_nan_and_infinity_in_metadata_are_valid_json(self) -> None:
        line = finalize(builder().metric("rows", 1, {"nan": math.nan, "inf": math.inf}))
        assert b"NaN" not in line and b"Infinity" not in line
        assert orjson.loads(line)["metadata"] == {"nan": None, "inf": None}


class TestMetadataKeysThatCollide:
    """Two keys that would be written as one JSON key are a ValueError naming it.

    A key that is not a str is written as its text, so ``1`` and ``"1"``
    would both become ``"1"`` and a reader would see only one of them.
    """

    @pytest.mark.parametrize(
        ("metadata", "written_as"),
        [
            ({1: "a", "1": "b"}, "1"),
            ({"1": "b", 1: "a"}, "1"),
            ({None: 1, "null": 2}, "null"),
            ({2.5: 1, "2.5": 2}, "2.5"),
            ({dt.date(2026, 11, 27): 1, "2026-11-27": 2}, "2026-11-27"),
            ({"shop": {7: "x", "7": "y"}}, "7"),
            ({("a", 1): 1, "('a', 1)": 2}, "('a', 1)"),
        ],
        ids=short,
    )
    def test_refused_at_metric_and_error(self, metadata: Dict[Any, Any], written_as: str) -> None:
        for build in (
            lambda b: b.metric("rows", 1, metadata),
            lambda b: b.error(raised(ValueError("x")), metadata),
        ):
            with pytest.raises(ValueError, match="metadata") as info:
                build(builder())
            assert repr(written_as) in str(info.value)

    def test_a_call_key_colliding_with_a_default_key(self) -> None:
        with pytest.raises(ValueError, match="'1'"):
            builder(default_metadata={"1": "default"}).metric("rows", 1, {1: "call"})

    def test_keys_that_do_not_collide_are_kept(self) -> None:
        assert metric({1: "a", "2": "b"}, default_metadata={"3": "c"})["metadata"] == {
            "3": "c", "1": "a", "2": "b",
        }

    def test_str_keys_are_never_checked_twice(self) -> None:
        """The common case pays nothing: plain str keys go straight to orjson."""
        assert metric({"1": "a", "shop": "b"})["metadata"] == {"1": "a", "shop": "b"}


class BrokenMapping(Mapping):  # type: ignore[type-arg]
    """A mapping that fails when read, the way a lazy or remote mapping can."""

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in

    def __getitem__(self, key: Any) -> Any:
        if self.fail_in == "getitem":
            raise KeyError(key)  # iteration promised a key that is not there
        return 1

    def __iter__(self) -> Iterator[Any]:
        if self.fail_in == "iter":
            raise ConnectionError("the remote mapping is gone")
        return iter(["shop"])

    def __len__(self) -> int:
        return 1


class TestMetadataThatCannotBeRead:
    """A mapping that raises when read is a TypeError from the builder, chained to the cause."""

    @pytest.mark.parametrize("fail_in", ["getitem", "iter"])
    @pytest.mark.parametrize("defaults", [{}, {"host": "w3"}], ids=["alone", "merged"])
    def test_type_error_from_the_mapping_error(
        self, fail_in: str, defaults: Dict[str, Any]
    ) -> None:
        cause = KeyError if fail_in == "getitem" else ConnectionError
        for build in (
            lambda b: b.metric("rows", 1, BrokenMapping(fail_in)),
            lambda b: b.error(raised(ValueError("x")), BrokenMapping(fail_in)),
        ):
            with pytest.raises(TypeError, match="metadata could not be read") as info:
                build(builder(default_metadata=defaults))
            assert isinstance(info.value.__cause__, cause)
            assert "BrokenMapping" in str(info.value)


class TestMetricValue:
    """The value is anything float() accepts that is finite, stored as a float."""

    @pytest.mark.parametrize(
        ("given_value", "stored"),
        [
            ("1.5", 1.5),
            (" 2 ", 2.0),
            (True, 1.0),
            (False, 0.0),
            (3, 3.0),
            (-7, -7.0),
            (2.25, 2.25),
            (decimal.Decimal("0.1"), 0.1),
            (b"4", 4.0),
            (2**62, float(2**62)),
        ],
    )
    def test_coerced_to_float(self, given_value: Any, stored: float) -> None:
        record = parse(builder().metric("rows", given_value))
        assert record["value"] == stored
        assert type(record["value"]) is float

    def test_written_as_a_json_number(self) -> None:
        assert b'"value":1.5,' in builder().metric("rows", "1.5")
        assert b'"value":1.0,' in builder().metric("rows", True)

    @pytest.mark.parametrize(
        "bad",
        [
            math.nan,
            math.inf,
            -math.inf,
            "nan",
            "inf",
            "-Infinity",
            None,
            "abc",
            "",
            [1],
            {},
            object(),
            decimal.Decimal("NaN"),
            10**400,
            1j,
        ],
        ids=short,
    )
    def test_bad_values_are_a_value_error_naming_them(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="metric value must be a finite number") as info:
            builder().metric("rows", bad)
        assert repr(bad)[:50] in str(info.value)

    def test_a_huge_bad_value_is_named_briefly(self) -> None:
        with pytest.raises(ValueError) as info:
            builder().metric("rows", "x" * 100_000)
        assert "'xxxxx" in str(info.value) and len(str(info.value)) < 400

    @settings(max_examples=200, deadline=None)
    @given(st.floats(allow_nan=False, allow_infinity=False))
    def test_every_finite_float_round_trips(self, value: float) -> None:
        assert parse(builder().metric("rows", value))["value"] == value


class TestMetricName:
    """The name is a non-empty string; anything else is a ValueError naming it."""

    @pytest.mark.parametrize("bad", ["", None, 3, b"rows", ["rows"]], ids=short)
    def test_bad_names(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="metric name must be a non-empty string") as info:
            builder().metric(bad, 1)
        assert repr(bad) in str(info.value)

    def test_str_subclass_accepted(self) -> None:
        class Name(str):
            pass

        assert parse(builder().metric(Name("rows.x"), 1))["metric_name"] == "rows.x"


class TestTimestamps:
    """Unix seconds as a float by default; 0.6's UTC string with timestamp_format='datetime'."""

    def test_default_is_now_in_unix_seconds(self) -> None:
        before = time.time()
        record = metric()
        after = time.time()
        assert type(record["timestamp"]) is float
        assert before <= record["timestamp"] <= after

    def test_errors_are_stamped_now_too(self) -> None:
        before = time.time()
        record = parse(builder().error(raised(ValueError())))
        assert before <= record["timestamp"] <= time.time()

    @pytest.mark.parametrize(
        ("given_ts", "stored"),
        [(1700000000, 1700000000.0), (1.5, 1.5), (0, 0.0), (253402300799, 253402300799.0)],
    )
    def test_unix_seconds_given(self, given_ts: Any, stored: float) -> None:
        record = parse(builder().metric("rows", 1, timestamp=given_ts))
        assert record["timestamp"] == stored and type(record["timestamp"]) is float

    @pytest.mark.usefixtures("far_from_utc")
    def test_naive_datetime_means_utc(self) -> None:
        record = parse(builder().metric("rows", 1, timestamp=dt.datetime(1985, 11, 20)))
        assert (
            record["timestamp"] == dt.datetime(1985, 11, 20, tzinfo=UTC).timestamp() == 501292800.0
        )

    def test_aware_datetime_is_converted(self) -> None:
        brussels_winter = dt.timezone(dt.timedelta(hours=1))
        when = dt.datetime(1985, 11, 20, 1, 0, 0, 250000, tzinfo=brussels_winter)
        assert parse(builder().metric("rows", 1, timestamp=when))["timestamp"] == 501292800.25

    @pytest.mark.usefixtures("far_from_utc")
    def test_datetime_format_now(self) -> None:
        b = builder(timestamp_format="datetime")
        before = dt.datetime.now(UTC).replace(tzinfo=None)
        stamp = parse(b.metric("rows", 1))["timestamp"]
        after = dt.datetime.now(UTC).replace(tzinfo=None)
        assert before <= dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f") <= after
        error_stamp = parse(b.error(raised(ValueError())))["timestamp"]
        assert dt.datetime.strptime(error_stamp, "%Y-%m-%d %H:%M:%S.%f") >= before

    @pytest.mark.parametrize(
        "given_ts",
        [
            dt.datetime(1985, 11, 20, 0, 0, 0, 123456),
            dt.datetime(1985, 11, 20, 1, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            501292800.123456,
        ],
        ids=["naive", "aware", "unix"],
    )
    @pytest.mark.usefixtures("far_from_utc")
    def test_datetime_format_given(self, given_ts: Any) -> None:
        record = parse(builder(timestamp_format="datetime").metric("rows", 1, timestamp=given_ts))
        assert record["timestamp"] == "1985-11-20 00:00:00.123456"

    @pytest.mark.parametrize(
        "bad",
        [
            "2026-11-27",
            "1700000000",
            b"1",
            True,
            math.nan,
            math.inf,
            -math.inf,
            dt.date(2026, 11, 27),
            dt.time(12),
            decimal.Decimal(1),
            [1],
        ],
        ids=short,
    )
    def test_bad_timestamps_are_a_value_error_naming_them(self, bad: Any) -> None:
        with pytest.raises(
            ValueError, match="timestamp must be a datetime or unix seconds"
        ) as info:
            builder().metric("rows", 1, timestamp=bad)
        assert repr(bad)[:50] in str(info.value)

    def test_datetime_format_out_of_range_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="timestamp must be"):
            builder(timestamp_format="datetime").metric("rows", 1, timestamp=1e20)

    @pytest.mark.parametrize(
        "outside",
        [
            -1,
            -86400.0,
            1e300,
            253402300800,  # 10000-01-01T00:00:00Z
            2**63,
            10**400,  # beyond float range
            dt.datetime(1969, 12, 31, 23, 59, 59, 999999),
            dt.datetime(1970, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            dt.datetime(9999, 12, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-1))),
            dt.datetime.min,
        ],
        ids=short,
    )
    @pytest.mark.parametrize("timestamp_format", ["unix", "datetime"])
    def test_outside_the_years_1970_to_9999_is_a_value_error(
        self, outside: Any, timestamp_format: str
    ) -> None:
        with pytest.raises(ValueError, match="timestamp must be from 1970 to 9999") as info:
            builder(timestamp_format=timestamp_format).metric("rows", 1, timestamp=outside)
        assert repr(outside)[:40] in str(info.value)

    @pytest.mark.parametrize(
        ("edge", "unix", "text"),
        [
            (0, 0.0, "1970-01-01 00:00:00.000000"),
            (dt.datetime(1970, 1, 1), 0.0, "1970-01-01 00:00:00.000000"),
            (dt.datetime(9999, 12, 31, 23, 59, 59), 253402300799.0, "9999-12-31 23:59:59.000000"),
            (253402300799, 253402300799.0, "9999-12-31 23:59:59.000000"),
        ],
        ids=short,
    )
    def test_the_first_and_last_second_are_accepted(
        self, edge: Any, unix: float, text: str
    ) -> None:
        assert parse(builder().metric("rows", 1, timestamp=edge))["timestamp"] == unix
        b = builder(timestamp_format="datetime")
        assert parse(b.metric("rows", 1, timestamp=edge))["timestamp"] == text


class TestIds:
    """The id is the sha256 hex digest of the record's JSON without the id."""

    def test_id_is_sha256_of_the_line_without_it(self) -> None:
        body = builder().metric("rows", 3, {"shop": "a"})
        line = finalize(body)
        record = orjson.loads(line)
        closed = body + b"}"  # the builder keeps records open until the worker adds the id
        assert record.pop("id") == hashlib.sha256(closed).hexdigest()
        assert orjson.dumps(record) == closed
        assert line == body + b',"id":"' + hashlib.sha256(closed).hexdigest().encode() + b'"}\n'

    def test_identical_content_identical_id(self) -> None:
        b = builder()
        first = parse(b.metric("rows", 3, {"shop": "a"}, timestamp=1700000000))
        again = parse(builder().metric("rows", "3", {"shop": "a"}, timestamp=1700000000.0))
        assert first == again

    @pytest.mark.parametrize(
        "change",
        [
            dict(name="other"),
            dict(value=4),
            dict(metadata={"shop": "b"}),
            dict(timestamp=1700000001),
        ],
    )
    def test_any_change_changes_the_id(self, change: Dict[str, Any]) -> None:
        call: Dict[str, Any] = dict(
            name="rows", value=3, metadata={"shop": "a"}, timestamp=1700000000
        )
        first = parse(builder().metric(**call))
        second = parse(builder().metric(**{**call, **change}))
        assert first["id"] != second["id"]

    @pytest.mark.parametrize(
        "option", [dict(context="other"), dict(run_id="run-8"), dict(stage="dev")]
    )
    def test_settings_are_part_of_the_id(self, option: Dict[str, Any]) -> None:
        first = parse(builder().metric("rows", 3, timestamp=1700000000))
        second = parse(builder(**option).metric("rows", 3, timestamp=1700000000))
        assert first["id"] != second["id"]

    @settings(max_examples=150, deadline=None)
    @given(
        name=st.text(min_size=1, max_size=20),
        value=st.floats(allow_nan=False, allow_infinity=False),
        metadata=st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=4),
        timestamp=st.floats(min_value=0, max_value=4e9),
    )
    def test_ids_are_stable_and_verifiable(
        self, name: str, value: float, metadata: Dict[str, Any], timestamp: float
    ) -> None:
        first = finalize(builder().metric(name, value, metadata, timestamp))
        second = finalize(builder().metric(name, value, dict(metadata), timestamp))
        assert first == second
        record = orjson.loads(first)
        digest = record.pop("id")
        assert digest == hashlib.sha256(orjson.dumps(record)).hexdigest()


class TestRecordSizeLimit:
    """No record dxtrack builds exceeds one Firehose record (1,024,000 bytes)."""

    def test_metric_too_large_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="over the Firehose record limit of 1,024,000 bytes"):
            builder().metric("rows", 1, {"blob": "x" * FIREHOSE_MAX_RECORD_BYTES})

    def test_metric_too_large_through_defaults_is_a_value_error(self) -> None:
        b = builder(default_metadata={"blob": "x" * 600_000})
        with pytest.raises(ValueError, match="trim its metadata"):
            b.metric("rows", 1, {"more": "y" * 600_000})

    def test_metric_at_the_limit_is_accepted(self) -> None:
        b = builder()
        small = finalize(b.metric("rows", 1, {"blob": ""}, timestamp=1.0))
        room = FIREHOSE_MAX_RECORD_BYTES - len(small)
        line = finalize(b.metric("rows", 1, {"blob": "x" * room}, timestamp=1.0))
        assert len(line) == FIREHOSE_MAX_RECORD_BYTES
        with pytest.raises(ValueError):
            b.metric("rows", 1, {"blob": "x" * (room + 1)}, timestamp=1.0)

    @staticmethod
    def deep_failure(depth: int, message: str) -> BaseException:
        def down(n: int) -> None:
            if n == 0:
                raise ValueError(message)
            down(n - 1)

        try:
            down(depth)
        except ValueError as exc:
            return exc
        raise AssertionError("unreachable")

    def check(self, body: bytes) -> Dict[str, Any]:
        line = finalize(body)
        assert len(line) <= FIREHOSE_MAX_RECORD_BYTES
        record = orjson.loads(line)
        assert list(record) == ERROR_KEYS
        return record

    def test_huge_message_is_cut_with_a_marker_and_frames_survive(self) -> None:
        exc = self.deep_failure(3, "v" * 3_000_000)
        record = self.check(builder().error(exc, {"shop": "a"}))
        value, traceback = record["exception"]["value"], record["exception"]["traceback"]
        assert CUT_MARK in value and CUT_MARK in traceback
        assert value.startswith("vvv") and value.endswith("vvv") and len(value) > 200_000
        assert traceback.startswith("Traceback (most recent call last):")
        assert "in down" in traceback and "in deep_failure" in traceback
        assert traceback.endswith("vvv\n")
        assert record["metadata"] == {"shop": "a"}

    @pytest.mark.parametrize(
        "char", ["\x01", "\U0001f600", "\u00e9"], ids=["control", "emoji", "latin"]
    )
    def test_wide_characters_are_cut_no_more_than_needed(self, char: str) -> None:
        exc = ValueError(char * 1_000_000)
        record = self.check(builder().error(exc))
        value = record["exception"]["value"]
        assert CUT_MARK in value
        kept = value.count(char)
        # The cut keeps a fair share of the ~1 MB allowed, not a token few characters.
        assert kept * len(orjson.dumps(char)) > 200_000

    def test_huge_metadata_goes_first_and_the_exception_stays_whole(self) -> None:
        exc = raised(ValueError("price unreadable"))
        record = self.check(builder().error(exc, {"page": "<html>" * 400_000}))
        assert record["exception"]["value"] == "price unreadable"
        assert record["exception"]["traceback"].endswith("ValueError: price unreadable\n")
        assert CUT_MARK not in record["exception"]["traceback"]
        assert "metadata removed" in record["metadata"]["dxtrack"]

    def test_everything_huge_still_fits(self) -> None:
        exc = self.deep_failure(5, "\x00" * 2_000_000)
        b = builder(default_metadata={"a": "\x02" * 400_000})
        record = self.check(b.error(exc, {"b": "\x03" * 400_000}))
        assert CUT_MARK in record["exception"]["traceback"]

    def test_long_chains_are_cut(self) -> None:
        exc: BaseException = ValueError("root")
        for i in range(3000):
            try:
                raise KeyError("x" * 400 + str(i)) from exc
            except KeyError as err:
                exc = err
        record = self.check(builder().error(exc))
        assert CUT_MARK in record["exception"]["traceback"]
        assert record["exception"]["traceback"].endswith("2999'\n")

    def test_the_limit_is_the_sinks(self) -> None:
        """A sink that takes shorter lines gets records that fit them, with the same rules."""
        small = builder(max_line_bytes=4096)
        line = finalize(small.metric("rows", 1, {"blob": "x" * 3000}))
        assert len(line) <= 4096
        with pytest.raises(ValueError, match="record limit of 4,096 bytes: trim its metadata"):
            small.metric("rows", 1, {"blob": "x" * 4096})
        cut = finalize(small.error(self.deep_failure(3, "v" * 10_000), {"shop": "a"}))
        assert len(cut) <= 4096 and CUT_MARK in orjson.loads(cut)["exception"]["value"]

    def test_records_under_the_limit_are_not_touched(self) -> None:
        small = self.check(builder().error(ValueError("v" * 400_000)))
        assert small["exception"]["value"] == "v" * 400_000
        assert CUT_MARK not in small["exception"]["traceback"]
