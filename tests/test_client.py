"""The DXTrack facade: public surface, calls, modes, reconfiguration, independence."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping

import orjson
import pytest

import dxtrack as package
from dxtrack import DXTrack, MemorySink

MakeClient = Callable[..., DXTrack]
ROOT = Path(__file__).resolve().parent.parent


def warnings_logged(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dxtrack" and r.levelno == logging.WARNING
    ]


def read_lines(path: Path) -> List[Dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def caplog_dxtrack(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="dxtrack")
    return caplog


@pytest.fixture
def memory(make_client: MakeClient) -> Iterator[Any]:
    """A client in the default (synchronous) mode writing to a MemorySink, and the sink."""
    sink = MemorySink()
    yield make_client(sink=sink), sink


class Unreadable(Mapping):  # type: ignore[type-arg]
    """Metadata whose every read raises ``failure``: a lazy mapping whose backend is gone."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    def __getitem__(self, key: Any) -> Any:
        raise self.failure

    def __iter__(self) -> Iterator[Any]:
        raise self.failure

    def __len__(self) -> int:
        return 1


def fail_in_fetch(shop: str) -> BaseException:
    def fetch(name: str) -> None:
        raise ConnectionError(f"{name} unreachable")

    try:
        fetch(shop)
    except ConnectionError as exc:
        return exc
    raise AssertionError("unreachable")


def error_in_except(client: DXTrack, metadata: Any) -> None:
    """client.error(metadata=...) while "app failure" is being handled, which it must not
    replace (checked here, inside the except block)."""
    try:
        raise ValueError("app failure")
    except ValueError:
        client.error(metadata=metadata)
        assert str(sys.exc_info()[1]) == "app failure"


class TestPublicSurface:
    """The package gives a ready-made client, the class, a version, and ships py.typed."""

    def test_ready_made_client(self) -> None:
        from dxtrack import dxtrack

        assert isinstance(dxtrack, DXTrack)
        assert package.dxtrack is dxtrack

    def test_version(self) -> None:
        from dxtrack import dxtrack
        from dxtrack._version import __version__

        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", package.__version__)
        assert package.__version__ == __version__ == dxtrack.__version__ == DXTrack.__version__

    def test_all_names_exist(self) -> None:
        assert {"dxtrack", "DXTrack", "__version__"} <= set(package.__all__)
        for name in package.__all__:
            assert getattr(package, name) is not None

    def test_py_typed_is_shipped(self) -> None:
        assert Path(package.__file__).with_name("py.typed").is_file()
        setup = (ROOT / "setup.py").read_text()
        assert re.search(
            r"package_data\s*=\s*\{\s*[\"']dxtrack[\"']\s*:\s*\[[^\]]*[\"']py\.typed[\"']", setup
        )

    def test_a_users_job_in_a_fresh_interpreter(self, tmp_path: Path) -> None:
        script = textwrap.dedent(
            f"""
            from dxtrack import dxtrack
            dxtrack.configure(stage="test", context="job", run_id="1", output_dir={str(tmp_path)!r},
                              default_metadata={{"host": "w3"}})
            dxtrack.metric("rows", "1.5", metadata={{"shop": "a"}})
            try:
                raise ValueError("boom")
            except ValueError:
                dxtrack.error(metadata={{"shop": "a"}})
            """
        )
        job = tmp_path / "job.py"
        job.write_text(script)
        # The same dxtrack these tests import, installed or not.
        source = str(Path(package.__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
        }
        done = subprocess.run(
            [sys.executable, str(job)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(tmp_path),
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        [metric] = read_lines(tmp_path / "metric.jsonl")
        [error] = read_lines(tmp_path / "error.jsonl")
        assert (metric["context"], metric["run_id"], metric["stage"]) == ("job", "1", "test")
        assert (metric["metric_name"], metric["value"], metric["metadata"]) == (
            "rows",
            1.5,
            {"host": "w3", "shop": "a"},
        )
        assert error["exception"]["type"] == "ValueError"
        assert 'raise ValueError("boom")' in error["exception"]["traceback"]


class TestSettingsReadLikeIn06:
    """context, stage, run_id and default_metadata are read-only properties, as 0.6 had them."""

    def test_none_before_configure(self) -> None:
        client = DXTrack()
        assert (client.context, client.stage, client.run_id, client.default_metadata) == (
            None, None, None, None,
        )

    def test_the_configured_values(self, make_client: MakeClient) -> None:
        client = make_client(context="shop-scraper", run_id="2026-11-27", stage="test",
                             default_metadata={"host": "w3"}, sink=MemorySink())
        assert (client.context, client.stage, client.run_id) == (
            "shop-scraper", "test", "2026-11-27",
        )
        assert client.default_metadata == {"host": "w3"}
        client.configure(stage="test", context="other", run_id="2", sink=MemorySink())
        assert (client.context, client.run_id, client.default_metadata) == ("other", "2", {})

    @pytest.mark.parametrize("name", ["context", "stage", "run_id", "default_metadata"])
    def test_read_only(self, make_client: MakeClient, name: str) -> None:
        client = make_client(sink=MemorySink())
        with pytest.raises(AttributeError):
            setattr(client, name, "changed")

    def test_changing_what_default_metadata_returns_changes_nothing(
        self, make_client: MakeClient
    ) -> None:
        sink = MemorySink()
        client = make_client(default_metadata={"host": "w3", "tags": ["a"]}, sink=sink)
        given = client.default_metadata
        assert given is not None
        given["host"] = "w4"
        given["tags"].append("b")
        client.metric("rows", 1)
        assert sink.records("metric")[0]["metadata"] == {"host": "w3", "tags": ["a"]}
        assert client.default_metadata == {"host": "w3", "tags": ["a"]}


class TestMetricCall:
    """metric() records one metric, or raises at the call for bad input and records nothing."""

    def test_recorded(self, memory: Any) -> None:
        client, sink = memory
        client.metric("scrape.products", "120", metadata={"shop": "a"}, timestamp=1700000000)
        [record] = sink.records("metric")
        assert (record["metric_name"], record["value"], record["timestamp"]) == (
            "scrape.products",
            120.0,
            1700000000.0,
        )
        assert client.stats()["delivered"] == 1

    @pytest.mark.parametrize(
        "call",
        [
            dict(name="", value=1),
            dict(name=None, value=1),
            dict(name=7, value=1),
            dict(name="rows", value=float("nan")),
            dict(name="rows", value=float("inf")),
            dict(name="rows", value=None),
            dict(name="rows", value="abc"),
            dict(name="rows", value=1, timestamp="yesterday"),
            dict(name="rows", value=1, timestamp=True),
        ],
        ids=repr,
    )
    def test_bad_input_raises_value_error_and_records_nothing(
        self, memory: Any, call: Dict[str, Any]
    ) -> None:
        client, sink = memory
        with pytest.raises(ValueError):
            client.metric(**call)
        assert client.stats()["enqueued"] == 0
        assert client.flush_metrics_buffer(timeout=5)
        assert sink.lines("metric") == []

    def test_metadata_not_a_dict_is_a_type_error(self, memory: Any) -> None:
        client, _ = memory
        with pytest.raises(TypeError, match="metadata must be a dict"):
            client.metric("rows", 1, metadata=["shop"])
        assert client.stats()["enqueued"] == 0

    def test_keys_written_as_one_are_a_value_error_naming_it(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, default_metadata={"2": "default"})
        for metadata, key in (({1: "a", "1": "b"}, "'1'"), ({2: "call"}, "'2'")):
            with pytest.raises(ValueError, match=f"two keys that are both written as {key}"):
                client.metric("rows", 1, metadata=metadata)
        client.metric("rows", 1, metadata={1: "a"})  # no collision: written as "1"
        assert [r["metadata"] for r in sink.records("metric")] == [{"2": "default", "1": "a"}]

    def test_a_mapping_that_fails_to_read_is_a_type_error(self, memory: Any) -> None:
        class Lazy(Mapping):  # type: ignore[type-arg]
            def __getitem__(self, key: Any) -> Any:
                raise ConnectionError("the remote side is gone")

            def __iter__(self) -> Iterator[Any]:
                return iter(["shop"])

            def __len__(self) -> int:
                return 1

        client, _ = memory
        with pytest.raises(TypeError, match="metadata could not be read: Lazy raised") as info:
            client.metric("rows", 1, metadata=Lazy())
        assert isinstance(info.value.__cause__, ConnectionError)
        assert client.stats()["enqueued"] == 0

    @pytest.mark.parametrize("timestamp", [1e300, -1, dt.datetime(1969, 7, 20)], ids=repr)
    def test_a_timestamp_outside_1970_to_9999_is_a_value_error(
        self, memory: Any, timestamp: Any
    ) -> None:
        client, _ = memory
        with pytest.raises(ValueError, match="timestamp must be from 1970 to 9999"):
            client.metric("rows", 1, timestamp=timestamp)
        assert client.stats()["enqueued"] == 0

    def test_too_large_is_a_value_error(self, memory: Any) -> None:
        client, _ = memory
        with pytest.raises(ValueError, match="Firehose record limit"):
            client.metric("rows", 1, metadata={"blob": "x" * 1_100_000})
        assert client.stats()["enqueued"] == 0


class TestErrorCall:
    """error() records the handled (or given) exception with its traceback, and never raises."""

    def test_records_the_exception_being_handled(self, memory: Any) -> None:
        client, sink = memory
        try:
            try:
                {}["sku"]
            except KeyError as low:
                raise RuntimeError("product skipped") from low
        except RuntimeError:
            client.error(metadata={"shop": "a"})
        [record] = sink.records("error")  # delivered before error() returned
        exception = record["exception"]
        assert (exception["type"], exception["value"]) == ("RuntimeError", "product skipped")
        assert "KeyError: 'sku'" in exception["traceback"]
        assert "The above exception was the direct cause" in exception["traceback"]
        assert '{}["sku"]' in exception["traceback"]
        assert record["metadata"] == {"shop": "a"}

    def test_exception_held_elsewhere(self, memory: Any) -> None:
        client, sink = memory
        exc = fail_in_fetch("shop-a")
        client.error(exception=exc, metadata={"shop": "a"})
        [record] = sink.records("error")
        assert record["exception"]["value"] == "shop-a unreachable"
        assert "in fetch" in record["exception"]["traceback"]

    def test_given_exception_wins_over_the_handled_one(self, memory: Any) -> None:
        client, sink = memory
        try:
            raise KeyError("handled")
        except KeyError:
            client.error(exception=fail_in_fetch("shop-b"))
        [record] = sink.records("error")
        assert record["exception"]["type"] == "ConnectionError"

    def test_outside_an_except_block_records_nothing_and_warns_once(
        self, memory: Any, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        client, sink = memory
        assert client.error(metadata={"shop": "a"}) is None
        [warning] = warnings_logged(caplog_dxtrack)
        assert "no exception being handled" in warning
        assert [r.levelno for r in caplog_dxtrack.records if r.name == "dxtrack"] == [
            logging.WARNING
        ]
        assert client.flush_metrics_buffer(timeout=5)
        assert sink.lines("error") == [] and client.stats()["enqueued"] == 0

    def test_not_an_exception_records_nothing_and_warns(
        self, memory: Any, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        client, sink = memory
        client.error(exception="boom")  # type: ignore[arg-type]
        assert len(warnings_logged(caplog_dxtrack)) == 1
        assert client.flush_metrics_buffer(timeout=5) and sink.lines("error") == []
        assert client.stats()["enqueued"] == 0

    @pytest.mark.parametrize("bad", ["shop=a", ["shop"], 3], ids=repr)
    def test_bad_metadata_still_records_and_never_masks_the_exception(
        self, memory: Any, caplog_dxtrack: pytest.LogCaptureFixture, bad: Any
    ) -> None:
        client, sink = memory
        with pytest.raises(KeyError, match="sku"):
            try:
                raise KeyError("sku")
            except KeyError:
                client.error(metadata=bad)
                raise
        [record] = sink.records("error")
        assert record["exception"]["type"] == "KeyError"
        assert record["metadata"] == {}
        assert any("metadata must be a dict" in w for w in warnings_logged(caplog_dxtrack))

    def test_a_mapping_that_explodes_does_not_raise(
        self, memory: Any, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        client, sink = memory
        error_in_except(client, Unreadable(RuntimeError("nope")))
        [record] = sink.records("error")
        assert (record["exception"]["value"], record["metadata"]) == ("app failure", {})
        assert any("recorded without it" in w for w in warnings_logged(caplog_dxtrack))

    def test_metadata_with_keys_written_as_one_is_left_out(
        self, memory: Any, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        client, sink = memory
        error_in_except(client, {1: "a", "1": "b"})
        [record] = sink.records("error")
        assert (record["exception"]["value"], record["metadata"]) == ("app failure", {})
        [warning] = warnings_logged(caplog_dxtrack)
        assert "both written as '1'" in warning and "recorded without it" in warning

    def test_unserializable_metadata_is_written_as_str(self, memory: Any) -> None:
        client, sink = memory
        try:
            raise ValueError("x")
        except ValueError:
            client.error(metadata={"lock": threading.Lock(), 2**70: {1, 2}})
        [record] = sink.records("error")
        assert record["metadata"]["lock"].startswith("<unlocked _thread.lock object")
        assert record["metadata"][str(2**70)] == "{1, 2}"


class TestErrorsCall:
    """errors() records one error per exception, with tracebacks, or raises before recording any."""

    def test_one_record_each_with_its_traceback(self, memory: Any) -> None:
        client, sink = memory
        caught = [fail_in_fetch(f"shop-{i}") for i in range(3)]
        client.errors(caught, metadata={"batch": 7})
        records = sink.records("error")  # all delivered before errors() returned
        assert [r["exception"]["value"] for r in records] == [
            f"shop-{i} unreachable" for i in range(3)
        ]
        for record in records:
            assert "in fetch" in record["exception"]["traceback"]
            assert record["exception"]["traceback"].startswith("Traceback (most recent call last):")
            assert record["metadata"] == {"batch": 7}
        assert len({r["id"] for r in records}) == 3

    def test_exceptions_never_raised_still_recorded(self, memory: Any) -> None:
        client, sink = memory
        client.errors(iter([ValueError("a"), KeyError("b")]))
        records = sink.records("error")
        assert [r["exception"]["traceback"] for r in records] == [
            "ValueError: a\n",
            "KeyError: 'b'\n",
        ]

    @pytest.mark.parametrize("bad", ["oops", None, ValueError], ids=repr)
    def test_non_exception_is_a_type_error_before_anything_is_recorded(
        self, memory: Any, bad: Any
    ) -> None:
        client, sink = memory
        with pytest.raises(TypeError, match="errors\\(\\) takes exceptions"):
            client.errors([ValueError("first"), bad, ValueError("third")])
        assert client.stats()["enqueued"] == 0
        assert client.flush_metrics_buffer(timeout=5)
        assert sink.lines("error") == []

    def test_metadata_not_a_dict_is_a_type_error(self, memory: Any) -> None:
        client, _ = memory
        with pytest.raises(TypeError, match="metadata"):
            client.errors([ValueError("x")], metadata="shop=a")  # type: ignore[arg-type]
        assert client.stats()["enqueued"] == 0

    def test_metadata_with_keys_written_as_one_is_a_value_error(self, memory: Any) -> None:
        client, sink = memory
        with pytest.raises(ValueError, match="both written as '1'"):
            client.errors([ValueError("a"), ValueError("b")], metadata={1: "a", "1": "b"})
        assert client.stats()["enqueued"] == 0

    def test_metadata_that_fails_to_read_is_a_type_error(self, memory: Any) -> None:
        client, _ = memory
        with pytest.raises(TypeError, match="metadata could not be read"):
            client.errors([ValueError("a")], metadata=Unreadable(ConnectionError("gone")))
        assert client.stats()["enqueued"] == 0

    def test_empty_records_nothing(self, memory: Any) -> None:
        client, sink = memory
        client.errors([])
        assert client.stats()["enqueued"] == 0 and sink.sends == 0


#: Run in a fresh interpreter by TestErrorNeverRaises: error() and errors() at every depth from
#: comfortable to the recursion limit. It prints one JSON object: the outcome at each depth,
#: the lines written and what stats() counted.
NEAR_THE_RECURSION_LIMIT = """
import json, sys
from dxtrack import DXTrack

SPAN = 160
client = DXTrack()
client.configure(stage="test", context="deep", run_id="1", output_dir=sys.argv[1],
                 use_async_requests=True, default_metadata={"host": "w3"})
APP_FAILURE = LookupError("the application's own failure")  # made here: no call at depth
ITEMS = [APP_FAILURE]
META = {"shop": "a"}

def at_depth(n, many):
    if n:
        return at_depth(n - 1, many)
    try:
        raise APP_FAILURE
    except LookupError:
        try:
            if many:
                client.errors(ITEMS, META)
            else:
                client.error(metadata=META)
        except BaseException as escaped:
            return escaped
    return None

outcomes = {"error": [], "errors": []}
start = len(__import__("inspect").stack())
sys.setrecursionlimit(start + SPAN)
for kind in outcomes:
    for n in range(SPAN + 5):
        try:
            escaped = at_depth(n, kind == "errors")
        except RecursionError:
            outcomes[kind].append("unreachable")  # at_depth itself ran out of stack
            continue
        if escaped is None:
            outcomes[kind].append("returned")
        elif escaped.__traceback__.tb_next is None:
            outcomes[kind].append("raised at the call")  # no frame of dxtrack's ever ran
        else:
            frames = []
            tb = escaped.__traceback__
            while tb is not None:
                frames.append(tb.tb_frame.f_code.co_name)
                tb = tb.tb_next
            outcomes[kind].append(f"{type(escaped).__name__} from {frames}")
sys.setrecursionlimit(1000)
flushed = client.flush(timeout=30)
with open(sys.argv[1] + "/error.jsonl") as f:
    lines = f.read().splitlines()
print(json.dumps({"outcomes": outcomes, "flushed": flushed, "lines": len(lines),
                  "dropped": client.stats()["dropped"]}))
"""


class TestErrorNeverRaises:
    """error() returns normally whatever the stack depth, the exception or the metadata.

    What it cannot record it counts in ``stats()["dropped"]["error_failed"]``;
    errors() raises only for its own bad arguments.
    """

    def test_at_every_depth_up_to_the_recursion_limit(self, tmp_path: Path) -> None:
        """error() and errors() at each depth from comfortable to the recursion limit.

        The script runs in its own interpreter, with the limit set just above
        its starting depth, so every run meets the same limit at the same
        frames. A RecursionError that Python raises *at the call itself*
        (the callee's frame never started) cannot be caught by dxtrack; on
        Python 3.11 it is told apart by its traceback, which then holds only
        the caller's frame (``tb_next is None``). Any other escape has a frame
        of dxtrack's in its traceback and fails the test. Every call that
        returned either wrote its line or was counted as ``error_failed``.
        """
        script = tmp_path / "deep.py"
        script.write_text(NEAR_THE_RECURSION_LIMIT)
        source = str(Path(package.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": source}
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = orjson.loads(done.stdout.splitlines()[-1])
        for kind, outcomes in report["outcomes"].items():
            escaped = [
                (depth, outcome) for depth, outcome in enumerate(outcomes)
                if outcome not in ("returned", "raised at the call", "unreachable")
            ]
            assert escaped == [], f"{kind}() raised from inside dxtrack"
            assert outcomes.count("returned") > 100, outcomes  # the test did reach deep
        returned = sum(o.count("returned") for o in report["outcomes"].values())
        failed = report["dropped"].get("error_failed", 0)
        assert failed > 0, report  # some depths left dxtrack no room to record
        assert report["flushed"] and report["lines"] + failed == returned, report

    def test_a_log_handler_that_raises_cannot_make_it_raise(self, memory: Any) -> None:
        """Even dxtrack's own fallback logging failing is swallowed, and counted."""

        class Broken(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                raise RuntimeError("this log handler is broken")

        client, sink = memory
        broken = Broken()
        logging.getLogger("dxtrack").addHandler(broken)
        try:
            try:
                raise KeyError("sku")
            except KeyError:
                client.error(metadata="not a dict")  # type: ignore[arg-type]  # logs a warning
                assert isinstance(sys.exc_info()[1], KeyError)
        finally:
            logging.getLogger("dxtrack").removeHandler(broken)
        assert client.stats()["dropped"] == {"error_failed": 1}
        assert sink.lines("error") == []

    def test_errors_refuses_an_iterable_that_fails_with_a_type_error(self, memory: Any) -> None:
        def failing() -> Iterator[BaseException]:
            yield ValueError("first")
            raise RuntimeError("the iterable broke")

        client, sink = memory
        broke = "errors\\(\\).*RuntimeError: the iterable broke"
        with pytest.raises(TypeError, match=broke) as info:
            client.errors(failing())
        assert isinstance(info.value.__cause__, RuntimeError)
        assert client.stats()["enqueued"] == 0


class TestNotConfigured:
    """Unconfigured or closed, calls drop the record: no raise, one warning, counted."""

    def test_metric_and_error_are_dropped_and_counted(
        self, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        client = DXTrack()
        client.metric("rows", 1)
        client.metric("rows", 2)
        try:
            raise ValueError("x")
        except ValueError:
            client.error()
        client.errors([ValueError("a"), ValueError("b")])
        assert client.stats()["dropped"] == {"not_configured": 5}
        [warning] = warnings_logged(caplog_dxtrack)
        assert "not configured" in warning and "configure()" in warning

    def test_errors_with_a_non_exception_still_raises(self) -> None:
        client = DXTrack()
        with pytest.raises(TypeError):
            client.errors(["not an exception"])  # type: ignore[list-item]
        assert client.stats()["dropped"] == {}

    def test_flush_and_close_are_harmless(self) -> None:
        client = DXTrack()
        assert client.flush_metrics_buffer() is True
        assert client.close() is True
        assert client.config is None and client.sink is None

    def test_after_close_records_are_dropped_as_closed(
        self, make_client: MakeClient, caplog_dxtrack: pytest.LogCaptureFixture
    ) -> None:
        sink = MemorySink()
        client = make_client(sink=sink)
        client.metric("rows", 1)
        assert client.close() is True
        assert sink.closed
        client.metric("rows", 2)
        assert client.stats()["dropped"] == {"closed": 1}
        assert any("closed" in w for w in warnings_logged(caplog_dxtrack))
        assert [r["value"] for r in sink.records("metric")] == [1.0]

    def test_configure_after_close_works_again(self, make_client: MakeClient) -> None:
        client = make_client(sink=MemorySink())
        client.close()
        fresh = MemorySink()
        client.configure(stage="test", context="tests", run_id="run-2", sink=fresh)
        client.metric("rows", 1)
        assert [r["run_id"] for r in fresh.records("metric")] == ["run-2"]


class TestReconfigure:
    """configure() again sends whatever is pending under the old settings first, then switches."""

    def test_pending_records_go_out_under_the_old_settings(self, make_client: MakeClient) -> None:
        old, new = MemorySink(), MemorySink()
        client = make_client(
            sink=old,
            context="old",
            buffer_metrics=True,
            use_async_requests=True,
            flush_interval=3600,
            default_metadata={"v": 1},
        )
        client.metric("rows", 1)
        client.metric("rows", 2)
        client.error(exception=ValueError("pending"))
        client.configure(
            stage="test", context="new", run_id="run-2", sink=new, default_metadata={"v": 2}
        )
        # Delivered, and closed, before configure() returned.
        assert old.closed
        assert [(r["context"], r["value"], r["metadata"]) for r in old.records("metric")] == [
            ("old", 1.0, {"v": 1}),
            ("old", 2.0, {"v": 1}),
        ]
        assert [r["context"] for r in old.records("error")] == ["old"]
        client.metric("rows", 3)
        assert [(r["context"], r["run_id"], r["metadata"]) for r in new.records("metric")] == [
            ("new", "run-2", {"v": 2})
        ]
        assert len(old.lines("metric")) == 2
        assert client.stats()["delivered"] == 4

    def test_a_rejected_reconfigure_keeps_the_old_settings_and_records(
        self, make_client: MakeClient
    ) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=3600)
        client.metric("rows", 1)
        with pytest.raises(ValueError, match="stage"):
            client.configure(stage="staging", context="tests", run_id="run-2")
        with pytest.raises(TypeError):
            client.configure(stage="test", context="tests", run_id="run-2", colour="blue")
        assert client.config is not None and client.config.run_id == "run-1"
        client.metric("rows", 2)
        assert client.flush_metrics_buffer(timeout=5)
        assert [r["value"] for r in sink.records("metric")] == [1.0, 2.0]


class TestMetadataSnapshot:
    """Metadata is taken as it is at the call: mutating it afterwards changes nothing."""

    def test_call_metadata_mutated_while_the_record_waits(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(
            sink=sink, buffer_metrics=True, use_async_requests=True, flush_interval=3600
        )
        metadata: Dict[str, Any] = {"shop": "a", "pages": [1]}
        client.metric("rows", 1, metadata=metadata)
        try:
            raise ValueError("x")
        except ValueError:
            client.error(metadata=metadata)
        metadata["shop"] = "b"
        metadata["pages"].append(2)
        metadata["new"] = True
        assert client.flush_metrics_buffer(timeout=5)
        assert sink.records("metric")[0]["metadata"] == {"shop": "a", "pages": [1]}
        assert sink.records("error")[0]["metadata"] == {"shop": "a", "pages": [1]}

    def test_default_metadata_mutated_after_configure(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        defaults: Dict[str, Any] = {"host": "w3", "tags": ["x"]}
        client = make_client(sink=sink, default_metadata=defaults)
        defaults["host"] = "w4"
        defaults["tags"].append("y")
        client.metric("rows", 1)
        client.metric("rows", 2, metadata={"shop": "a"})
        assert [r["metadata"] for r in sink.records("metric")] == [
            {"host": "w3", "tags": ["x"]},
            {"host": "w3", "tags": ["x"], "shop": "a"},
        ]


class Meanwhile(Mapping):  # type: ignore[type-arg]
    """Metadata whose first read runs ``action``: a configure() or close() in another thread,
    landing after the call took the client's pipeline and before it queued the record."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.action: Any = action

    def _read(self) -> None:
        action, self.action = self.action, None
        if action is not None:
            action()

    def __getitem__(self, key: Any) -> Any:
        self._read()
        return "a"

    def __iter__(self) -> Iterator[Any]:
        self._read()
        return iter(["shop"])

    def __len__(self) -> int:
        return 1


RECORD = {
    "metric": lambda client, metadata: client.metric("rows", 1, metadata=metadata),
    "error": lambda client, metadata: client.error(metadata, ValueError("x")),
    "errors": lambda client, metadata: client.errors([ValueError("a")], metadata),
}


class TestPipelineClosedMeanwhile:
    """A record refused by a pipeline closed during the call goes to the one in use now."""

    @pytest.mark.parametrize("call", list(RECORD))
    def test_handed_to_the_new_pipeline_and_waited_for(
        self, make_client: MakeClient, call: str
    ) -> None:
        old, new = MemorySink(), MemorySink()
        client = make_client(sink=old)
        reconfigure = functools.partial(client.configure, stage="test", context="new",
                                        run_id="2", sink=new)
        RECORD[call](client, Meanwhile(reconfigure))
        stream = "metric" if call == "metric" else "error"
        # Built under the settings it was called with; delivered before the call returned.
        assert [(r["context"], r["metadata"]) for r in new.records(stream)] == [
            ("tests", {"shop": "a"})
        ]
        assert old.lines(stream) == [] and client.stats()["dropped"] == {}

    @pytest.mark.parametrize("call", list(RECORD))
    def test_counted_as_closed_when_no_pipeline_is_left(
        self, make_client: MakeClient, call: str
    ) -> None:
        sink = MemorySink()
        client = make_client(sink=sink)
        RECORD[call](client, Meanwhile(client.close))
        assert client.stats()["dropped"] == {"closed": 1} and sink.lines("metric") == []


class TestIndependentInstances:
    """Two DXTrack() instances share no settings, buffer, worker, sink or counters."""

    def test_no_shared_state(self, make_client: MakeClient) -> None:
        sink_a, sink_b = MemorySink(), MemorySink()
        a = make_client(sink=sink_a, context="a", buffer_metrics=True, flush_interval=3600)
        b = make_client(sink=sink_b, context="b", default_metadata={"only": "b"})
        a.metric("rows", 1)
        b.metric("rows", 2)
        assert b.flush_metrics_buffer(timeout=5)
        assert sink_a.lines("metric") == []  # b's flush did not send a's buffer
        assert a.stats()["pending"] == 1 and b.stats()["pending"] == 0
        assert a.flush_metrics_buffer(timeout=5)
        assert [(r["context"], r["metadata"]) for r in sink_a.records("metric")] == [("a", {})]
        assert [(r["context"], r["metadata"]) for r in sink_b.records("metric")] == [
            ("b", {"only": "b"})
        ]
        assert a.config is not b.config and a.sink is sink_a and b.sink is sink_b

    def test_closing_one_leaves_the_other_working(self, make_client: MakeClient) -> None:
        sink_b = MemorySink()
        a = make_client(sink=MemorySink())
        b = make_client(sink=sink_b)
        a.close()
        b.metric("rows", 1)
        assert len(sink_b.lines("metric")) == 1
        assert b.stats()["dropped"] == {} and a.stats()["delivered"] == 0

    def test_an_unconfigured_instance_is_not_affected(self, make_client: MakeClient) -> None:
        make_client(sink=MemorySink())
        other = DXTrack()
        other.metric("rows", 1)
        assert other.config is None and other.stats()["dropped"] == {"not_configured": 1}


class TestDeliveryModes:
    """Default mode writes before the call returns; buffer_metrics holds metrics until a flush."""

    def test_default_mode_writes_before_returning(
        self, make_client: MakeClient, tmp_path: Path
    ) -> None:
        client = make_client(output_dir=str(tmp_path))
        for i in range(3):
            client.metric("rows", i)
            assert len(read_lines(tmp_path / "metric.jsonl")) == i + 1
        try:
            raise ValueError("x")
        except ValueError:
            client.error()
        assert len(read_lines(tmp_path / "error.jsonl")) == 1
        assert client.stats()["pending"] == 0

    def test_buffer_metrics_holds_metrics_until_flush(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=3600)
        for i in range(3):
            client.metric("rows", i)
        # An error goes out at once, and the worker's round trip leaves the metrics waiting.
        client.error(exception=ValueError("x"))
        assert len(sink.lines("error")) == 1
        assert sink.lines("metric") == []
        assert client.stats()["pending"] == 3
        assert client.flush_metrics_buffer(timeout=5) is True
        assert [r["value"] for r in sink.records("metric")] == [0.0, 1.0, 2.0]
        assert client.stats()["pending"] == 0

    def test_flush_is_an_alias(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=3600)
        client.metric("rows", 1)
        assert client.flush(timeout=5) is True
        assert len(sink.lines("metric")) == 1

    def test_async_requests_deliver_by_flush(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, use_async_requests=True)
        for i in range(50):
            client.metric("rows", i)
        assert client.flush_metrics_buffer(timeout=5)
        assert [r["value"] for r in sink.records("metric")] == [float(i) for i in range(50)]

    def test_empty_flush_does_nothing(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True)
        assert client.flush_metrics_buffer(timeout=5) is True
        assert client.flush_metrics_buffer() is True
        assert sink.sends == 0

    def test_concurrent_callers_lose_and_duplicate_nothing(
        self, make_client: MakeClient, tmp_path: Path
    ) -> None:
        client = make_client(output_dir=str(tmp_path))

        def job(worker: int) -> None:
            for i in range(100):
                client.metric("rows", worker * 1000 + i)

        threads = [threading.Thread(target=job, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        values = [r["value"] for r in read_lines(tmp_path / "metric.jsonl")]
        assert sorted(values) == sorted(float(w * 1000 + i) for w in range(4) for i in range(100))


class TestClose:
    """close() flushes what is pending, is idempotent, and keeps its first verdict."""

    def test_close_delivers_what_is_pending(self, make_client: MakeClient) -> None:
        sink = MemorySink()
        client = make_client(sink=sink, buffer_metrics=True, flush_interval=3600)
        client.metric("rows", 1)
        assert client.close() is True
        assert [r["value"] for r in sink.records("metric")] == [1.0] and sink.closed
        assert client.close() is True

    def test_a_failed_close_stays_failed_and_returns_at_once(self, make_client: MakeClient) -> None:
        gate = threading.Event()

        class GatedSink(MemorySink):
            def send(self, stream: str, lines: Any) -> Any:
                gate.wait(10)
                return super().send(stream, lines)

        client = make_client(sink=GatedSink(), use_async_requests=True)
        try:
            client.metric("rows", 1)
            assert client.close(timeout=0.1) is False
            started = time.monotonic()
            assert client.close(timeout=5) is False
            assert time.monotonic() - started < 1.0
        finally:
            gate.set()
