"""``dxtrack query`` and ``dxtrack show`` over a stage's records: stage ``test``'s output
directory written by the library, and a bucket on the moto server in the layout ``setup`` makes
(plain, gzip and multi-member gzip objects, and real delivery through moto's Firehose), fetched
once into the cache; ``--athena`` against moto's Athena."""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
import os
import subprocess
import sys
import urllib.request
from typing import Any, Dict, Iterator, List, NamedTuple, Tuple

import boto3
import orjson
import pytest

from dxtrack import DXTrack
from dxtrack import athena as athena_module
from dxtrack.cli import main
from dxtrack.config import Config
from dxtrack.sources import Bucket, Window, default_cache_dir, parse_time

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
BUCKET = f"dxtrack-dev-{ACCOUNT}"  # what setup names stage dev's bucket
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


class Ran(NamedTuple):
    status: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one-line error, and no traceback."""
        assert "Traceback" not in self.err
        lines = [line for line in self.err.splitlines() if line.startswith("dxtrack: error: ")]
        assert len(lines) == 1, self.err
        return lines[0]

    def json(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines()]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*argv: str) -> Ran:
        status = main(list(argv))
        captured = capsys.readouterr()
        return Ran(status, captured.out, captured.err)
    return run


class Recorded(NamedTuple):
    directory: str
    metrics: List[Dict[str, Any]]
    errors: List[Dict[str, Any]]

    def flags(self) -> List[str]:
        return ["--stage", "test", "--output-dir", self.directory]


def _lines(path: str) -> List[Dict[str, Any]]:
    with open(path, "rb") as lines:
        return [orjson.loads(line) for line in lines]


class ParseError(Exception):
    pass


@pytest.fixture
def recorded(tmp_path: Any) -> Recorded:
    """Records written by the library in stage test: two jobs, one with unix timestamps, one
    with ``timestamp_format='datetime'``; metrics of two names over three shops, one old metric
    (three days ago), and two errors with their tracebacks."""
    directory = str(tmp_path / "output")
    for context, form in (("scraper", "unix"), ("exporter", "datetime")):
        client = DXTrack()
        client.configure(stage="test", output_dir=directory, context=context, run_id="run-7",
                         timestamp_format=form)
        for page in range(6):
            client.metric("scrape.products", page * 10, metadata={"shop": f"shop-{page % 3}",
                                                                   "page": page})
        client.metric("scrape.seconds", 1.5, metadata={"shop": "shop-0"})
        client.metric("scrape.old", 1, timestamp=NOW - 3 * DAY)
        try:
            raise ParseError(f"{context}: no price on page 4")
        except ParseError as exc:
            client.error(metadata={"shop": "shop-1"}, exception=exc)
        client.flush_metrics_buffer()
        client.close()
    return Recorded(directory, _lines(os.path.join(directory, "metric.jsonl")),
                    _lines(os.path.join(directory, "error.jsonl")))


class TestQueryLocal:
    """Stage test: the output directory's files, as the library wrote them."""

    def test_counts_sums_and_metadata_match_what_was_recorded(self, recorded: Recorded,
                                                              run: Any) -> None:
        ran = run("query", *recorded.flags(), "--format", "json",
                  "SELECT context, metadata->>'shop' AS shop, count(*) AS n, sum(value) AS total "
                  "FROM metric WHERE metric_name = 'scrape.products' GROUP BY ALL ORDER BY ALL")
        assert ran.status == 0, ran.err
        expected: Dict[Tuple[str, str], List[float]] = {}
        for record in recorded.metrics:
            if record["metric_name"] == "scrape.products":
                key = (record["context"], record["metadata"]["shop"])
                expected.setdefault(key, []).append(record["value"])
        assert {(row["context"], row["shop"]): (row["n"], row["total"]) for row in ran.json()} \
            == {key: (len(values), sum(values)) for key, values in expected.items()}
        assert len(ran.json()) == 6

    def test_timestamp_is_a_timestamp_in_both_formats(self, recorded: Recorded,
                                                      run: Any) -> None:
        ran = run("query", *recorded.flags(), "--format", "json",
                  "SELECT id, typeof(timestamp) AS type, epoch(timestamp) AS seconds FROM metric")
        rows = {row["id"]: row for row in ran.json()}
        assert {row["type"] for row in rows.values()} == {"TIMESTAMP"}
        formats = set()
        for record in recorded.metrics:
            when = record["timestamp"]
            if isinstance(when, str):
                formats.add("datetime")
                when = datetime.datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp()
            else:
                formats.add("unix")
            assert rows[record["id"]]["seconds"] == pytest.approx(when, abs=1e-6)
        assert formats == {"unix", "datetime"}

    def test_errors_keep_their_exception(self, recorded: Recorded, run: Any) -> None:
        ran = run("query", *recorded.flags(), "--format", "json",
                  "SELECT exception.type AS type, exception.traceback AS tb, metadata FROM error")
        rows = ran.json()
        assert [row["type"] for row in rows] == ["test_query.ParseError"] * 2
        assert all("raise ParseError" in row["tb"] for row in rows)
        assert rows[0]["metadata"] == {"shop": "shop-1"}  # JSON columns printed as objects

    def test_formats(self, recorded: Recorded, run: Any) -> None:
        sql = ("SELECT metric_name, count(*) AS n FROM metric GROUP BY 1 ORDER BY 1")
        table = run("query", *recorded.flags(), sql).out.splitlines()
        assert table[0].split() == ["metric_name", "n"]
        assert set(table[1]) == {"-", " "}
        assert table[2].split() == ["scrape.old", "2"] and table[-1] == "(3 rows)"
        assert len(table[2]) == len(table[3]) == len(table[0])  # numbers aligned right
        rows = list(csv.reader(io.StringIO(run("query", *recorded.flags(), "--format", "csv",
                                               sql).out)))
        assert rows == [["metric_name", "n"], ["scrape.old", "2"], ["scrape.products", "12"],
                        ["scrape.seconds", "2"]]

    def test_from_and_to_filter_on_the_records_time(self, recorded: Recorded,
                                                    run: Any) -> None:
        old = (NOW - 3 * DAY).date().isoformat()
        count = "SELECT count(*) AS n FROM metric"

        def n(*flags: str) -> int:
            ran = run("query", *recorded.flags(), "--format", "json", *flags, count)
            assert ran.status == 0, ran.err
            return int(ran.json()[0]["n"])

        assert n() == 16
        assert n("--since", "24h") == 14
        assert n("--from", old, "--to", old) == 2  # --to a date: the whole day
        assert n("--to", old) == 2
        assert n("--since", "90m", ) == 14

    def test_sql_from_standard_input(self, recorded: Recorded, run: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT count(*) AS n FROM error"))
        assert run("query", *recorded.flags(), "--format", "csv", "-").out == "n\n2\n"

    def test_bad_sql_is_one_line_and_exit_2(self, recorded: Recorded, run: Any) -> None:
        for sql in ("SELEC 1", "SELECT nope FROM metric", "SELECT * FROM nowhere"):
            ran = run("query", *recorded.flags(), sql)
            assert ran.status == 2
            assert ran.error_line().startswith("dxtrack: error: the query failed: ")

    def test_without_duckdb(self, recorded: Recorded, run: Any,
                            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
        ran = run("query", *recorded.flags(), "SELECT 1")
        assert ran.status == 2
        assert "pip install 'dxtrack[query]'" in ran.error_line()

    @pytest.mark.parametrize("flags", [
        ["--since", "3x"], ["--from", "yesterday"], ["--since", "1h", "--from", "2026-01-01"],
        ["--from", "2026-02-01", "--to", "2026-01-01"], ["--bucket", "b-1"],
        ["--athena"], ["--format", "xml"],
    ])
    def test_bad_usage(self, recorded: Recorded, run: Any, flags: List[str]) -> None:
        ran = run("query", *recorded.flags(), *flags, "SELECT 1")
        assert ran.status == 2
        ran.error_line()

    def test_an_empty_directory_gives_empty_views(self, tmp_path: Any, run: Any) -> None:
        ran = run("query", "--stage", "test", "--output-dir", str(tmp_path),
                  "--format", "csv", "SELECT count(*) AS n FROM metric")
        assert (ran.status, ran.out) == (0, "n\n0\n")
        assert "no records in" in ran.err
        # A directory that is not there is a mistyped --output-dir, not an empty stage.
        ran = run("query", "--stage", "test", "--output-dir", str(tmp_path / "none"),
                  "SELECT count(*) AS n FROM metric")
        assert ran.status == 1 and "is not a directory" in ran.error_line()

    def test_a_line_cut_off_by_a_crashed_writer_is_left_out(self, recorded: Recorded,
                                                            run: Any) -> None:
        path = os.path.join(recorded.directory, "metric.jsonl")
        with open(path, "ab") as out:
            out.write(b'{"context":"job","metric_name":"scrape.products","val')
        for command in (["query", *recorded.flags(), "--format", "csv",
                         "SELECT count(*) AS n FROM metric"],
                        ["report", *recorded.flags(), "--context", "scraper"]):
            ran = run(*command)
            assert ran.status in (0, 1) and "Traceback" not in ran.err, ran.err
            assert f"{path} ends in a cut-off line" in ran.err
        assert run("query", *recorded.flags(), "--format", "csv",
                   "SELECT count(*) AS n FROM metric").out == "n\n16\n"

    def test_times_beyond_the_calendar_are_not_tracebacks(self, recorded: Recorded,
                                                          run: Any) -> None:
        count = "SELECT count(*) AS n FROM metric"
        assert run("query", *recorded.flags(), "--to", "9999-12-31", count).status == 0
        assert run("query", *recorded.flags(), "--from", "0001-01-01", count).status == 0
        assert run("query", *recorded.flags(), "--since", "9999999w", count).status == 0
        ran = run("query", *recorded.flags(), "--since", "99999999999999999999d", count)
        assert ran.status == 2 and "longer than" in ran.error_line()

    def test_json_lines_are_json(self, recorded: Recorded, run: Any) -> None:
        ran = run("query", *recorded.flags(), "--format", "json",
                  "SELECT 1 AS a, 2 AS a, 'nan'::DOUBLE AS x, ['inf'::DOUBLE, 1.5] AS xs")
        assert ran.out.splitlines() == ['{"a": 1, "a_2": 2, "x": null, "xs": [null, 1.5]}']

    def test_a_reader_that_stops_early(self, recorded: Recorded) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DXTRACK_"))}
        done = subprocess.run(
            f"{sys.executable} -m dxtrack query {' '.join(recorded.flags())} --format csv "
            "'SELECT * FROM range(1000000)' | head -n 2", shell=True, env=env,
            capture_output=True, text=True, timeout=120)
        assert done.stdout == "range\n0\n" and "Traceback" not in done.stderr, done.stderr

    def test_as_a_process(self, recorded: Recorded, tmp_path: Any) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DXTRACK_"))}
        done = subprocess.run(
            [sys.executable, "-m", "dxtrack", "query", *recorded.flags(), "--format", "json",
             "SELECT metric_name, sum(value) AS total FROM metric GROUP BY 1 ORDER BY 1"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line) for line in done.stdout.splitlines()] == [
            {"metric_name": "scrape.old", "total": 2.0},
            {"metric_name": "scrape.products", "total": 300.0},
            {"metric_name": "scrape.seconds", "total": 3.0}]


class TestShow:
    """One record by id or prefix."""

    def test_an_error_with_its_full_traceback(self, recorded: Recorded, run: Any) -> None:
        error = recorded.errors[1]
        ran = run("show", *recorded.flags(), error["id"][:8])
        assert ran.status == 0, ran.err
        assert ran.out.splitlines()[0] == f"error {error['id']}"
        for field in ("ParseError", error["exception"]["value"], "exporter", "run-7", "test",
                      '{"shop": "shop-1"}', " UTC"):
            assert field in ran.out
        assert error["exception"]["traceback"].rstrip("\n") in ran.out

    def test_a_metric_by_its_full_id(self, recorded: Recorded, run: Any) -> None:
        metric = recorded.metrics[3]
        ran = run("show", *recorded.flags(), metric["id"].upper())
        assert ran.status == 0, ran.err
        lines = ran.out.splitlines()
        assert lines[0] == f"metric {metric['id']}"
        assert "  name      scrape.products" in lines and "  value     30" in lines
        assert '  metadata  {"shop": "shop-0", "page": 3}' in lines

    def test_none_and_several_and_short(self, tmp_path: Any, run: Any) -> None:
        base = {"context": "c", "stage": "test", "run_id": "r", "metric_name": "m",
                "metadata": {}, "timestamp": NOW.timestamp()}
        ids = ["deadbeef" + "0" * 56, "deadbeef" + "1" * 56, "cafe0000" + "2" * 56]
        directory = tmp_path / "output"
        directory.mkdir()
        with open(directory / "metric.jsonl", "wb") as out:
            for value, id_ in enumerate(ids + ids[2:]):  # the last one delivered twice
                out.write(orjson.dumps({**base, "value": value, "id": id_}) + b"\n")
        flags = ["--stage", "test", "--output-dir", str(directory)]
        several = run("show", *flags, "deadbeef")
        assert several.status == 1
        assert "2 records have an id starting with deadbeef" in several.error_line()
        assert [line.split()[1] for line in several.out.splitlines()] == ids[:2]
        assert run("show", *flags, "cafe0000").status == 0  # one record, twice delivered
        none = run("show", *flags, "0123456789")
        assert none.status == 1 and "no record has an id starting with" in none.error_line()
        for bad in ("deadbee", "not-hex!", "f" * 65):
            assert run("show", *flags, bad).status == 2


# -- a bucket on the moto server ------------------------------------------------------------
@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A clean moto server holding stage dev's bucket (empty), credentials in the environment
    for the command."""
    request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", region_name=REGION, endpoint_url=moto_url, **KEYS)
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    return client


def _line(name: str, value: float, when: datetime.datetime, shop: str, n: int) -> bytes:
    return orjson.dumps({"context": "job", "metric_name": name, "value": value, "stage": "dev",
                         "metadata": {"shop": shop}, "run_id": "r", "timestamp": when.timestamp(),
                         "id": f"{n:064x}"}) + b"\n"


def _key(kind: str, day: datetime.datetime, name: str) -> str:
    return f"{kind}/dt={day:%Y-%m-%d}/dxtrack-{kind}-input-dev-1-{name}"


class Calls:
    """The S3 calls a session's clients make, counted by botocore's event hooks."""

    def __init__(self) -> None:
        self.session = boto3.session.Session(region_name=REGION, **KEYS)
        self.made: List[str] = []
        self.session.events.register("before-call.s3", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.made.append(model.name)

    def take(self) -> List[str]:
        made, self.made = self.made, []
        return made


def _bucket(url: str, cache: str, calls: Calls) -> Bucket:
    config = Config(stage="dev", context="q", run_id="-", endpoint_url=url, region_name=REGION,
                    **KEYS)
    return Bucket(config, cache_dir=cache, session=calls.session)


class TestBucket:
    """Stages dev and prod: the bucket as setup lays it out, through the cache."""

    def test_plain_gzip_and_multi_member_gzip_objects(self, s3: Any, moto_url: str,
                                                      tmp_path: Any, run: Any) -> None:
        day = NOW - datetime.timedelta(hours=1)
        lines = [_line("m", i, day, f"shop-{i % 2}", i) for i in range(30)]
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "plain"), Body=b"".join(lines[:10]))
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "gzip.gz"),
                      Body=gzip.compress(b"".join(lines[10:20])))
        members = b"".join(gzip.compress(line) for line in lines[20:30])  # one member a record
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "members.gz"), Body=members)
        s3.put_object(Bucket=BUCKET, Key="failed/metric/x/dt=2026-01-01/f", Body=lines[0])
        s3.put_object(Bucket=BUCKET, Key="metric/notes.txt", Body=b"not a record")
        flags = ["--stage", "dev", "--endpoint-url", moto_url, "--region", REGION,
                 "--cache-dir", str(tmp_path / "cache")]
        ran = run("query", *flags, "--format", "json",
                  "SELECT metadata->>'shop' AS shop, count(*) AS n, sum(value) AS total "
                  "FROM metric GROUP BY 1 ORDER BY 1")
        assert ran.status == 0, ran.err
        assert ran.json() == [{"shop": "shop-0", "n": 15, "total": 210.0},
                              {"shop": "shop-1", "n": 15, "total": 225.0}]
        assert f"s3://{BUCKET}/: 3 objects, 3 fetched" in ran.err
        again = run("query", *flags, "--format", "json", "SELECT count(*) AS n FROM metric")
        assert again.json() == [{"n": 30}] and "3 objects, 0 fetched" in again.err

    def test_a_second_query_fetches_nothing_it_has(self, s3: Any, moto_url: str,
                                                   tmp_path: Any) -> None:
        day = NOW - datetime.timedelta(hours=1)
        for n in range(3):
            s3.put_object(Bucket=BUCKET, Key=_key("metric", day, f"o{n}.gz"),
                          Body=gzip.compress(_line("m", n, day, "s", n)))
        calls = Calls()
        bucket = _bucket(moto_url, str(tmp_path / "cache"), calls)
        first = bucket.files()
        assert calls.take().count("GetObject") == 3 and first.fetched == 3
        second = bucket.files()
        assert calls.take() == ["ListObjectsV2", "ListObjectsV2"]  # metric/ and error/
        assert second.metric == first.metric and second.fetched == 0
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "o3.gz"),
                      Body=gzip.compress(_line("m", 3, day, "s", 3)))
        assert bucket.files().fetched == 1 and calls.take().count("GetObject") == 1
        # A changed object (another ETag) is fetched again; a half-written file never counts.
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "o0.gz"), Body=b"")
        leftover = os.path.join(os.path.dirname(first.metric[0]), ".partial-crashed")
        with open(leftover, "wb") as out:
            out.write(b'{"half": ')
        third = bucket.files()
        assert third.fetched == 1 and len(third.metric) == 3  # the empty one has no lines
        assert leftover not in third.metric
        # The copy under the old ETag is gone; the other objects' copies stay.
        folder = sorted(os.listdir(os.path.dirname(first.metric[0])))
        keys = [name.rsplit(".", 2)[0] for name in folder if not name.startswith(".")]
        assert [key[-5:] for key in keys] == ["o0.gz", "o1.gz", "o2.gz", "o3.gz"]

    def test_an_object_of_gzip_members_and_plain_lines(self, s3: Any, moto_url: str,
                                                       tmp_path: Any, run: Any) -> None:
        """A producer left without compression='gzip' in a gzip stage: both kinds are read."""
        day = NOW - datetime.timedelta(hours=1)
        lines = [_line("m", n, day, "s", n) for n in range(4)]
        body = gzip.compress(lines[0]) + lines[1] + gzip.compress(lines[2]) + lines[3]
        s3.put_object(Bucket=BUCKET, Key=_key("metric", day, "mixed.gz"), Body=body)
        ran = run("query", "--stage", "dev", "--endpoint-url", moto_url, "--region", REGION,
                  "--cache-dir", str(tmp_path / "cache"), "--format", "csv",
                  "SELECT count(*) AS n, sum(value) AS total FROM metric")
        assert ran.out == "n,total\n4,6.0\n", ran.err

    def test_since_leaves_out_old_partitions(self, s3: Any, moto_url: str,
                                             tmp_path: Any, run: Any) -> None:
        recent, yesterday, old = (NOW - datetime.timedelta(minutes=5), NOW - DAY,
                                  NOW - 10 * DAY)
        s3.put_object(Bucket=BUCKET, Key=_key("metric", recent, "a"),
                      Body=_line("m", 1, recent, "s", 1))
        # Received yesterday: in the window's widened days, but its record is too old.
        s3.put_object(Bucket=BUCKET, Key=_key("metric", yesterday, "b"),
                      Body=_line("m", 2, yesterday - datetime.timedelta(hours=2), "s", 2))
        s3.put_object(Bucket=BUCKET, Key=_key("metric", old, "c"), Body=_line("m", 4, old, "s", 4))
        calls = Calls()
        bucket = _bucket(moto_url, str(tmp_path / "cache"), calls)
        listed = list(bucket.listing("metric", Window(start=(NOW - DAY).replace(tzinfo=None))))
        assert [key.rsplit("-", 1)[1] for key, _ in listed] == ["b", "a"]
        ran = run("query", "--stage", "dev", "--endpoint-url", moto_url, "--region", REGION,
                  "--cache-dir", str(tmp_path / "cache"), "--since", "24h", "--format", "csv",
                  "SELECT sum(value) AS total FROM metric")
        assert ran.out == "total\n1.0\n" and "2 objects, 2 fetched" in ran.err
        everything = run("query", "--stage", "dev", "--endpoint-url", moto_url, "--region",
                         REGION, "--cache-dir", str(tmp_path / "cache"), "--format", "csv",
                         "SELECT sum(value) AS total FROM metric")
        assert everything.out == "total\n7.0\n" and "3 objects, 1 fetched" in everything.err

    def test_a_broken_object_is_one_line_and_leaves_no_file(self, s3: Any, moto_url: str,
                                                            tmp_path: Any, run: Any) -> None:
        day = NOW - datetime.timedelta(hours=1)
        s3.put_object(Bucket=BUCKET, Key=_key("error", day, "cut.gz"),
                      Body=gzip.compress(b'{"id": "1"}\n' * 100)[:-30])
        ran = run("query", "--stage", "dev", "--endpoint-url", moto_url, "--region", REGION,
                  "--cache-dir", str(tmp_path / "cache"), "SELECT 1")
        assert ran.status == 1 and "cut.gz" in ran.error_line()
        assert not [name for _, _, names in os.walk(tmp_path / "cache") for name in names]

    def test_a_missing_bucket(self, s3: Any, moto_url: str, tmp_path: Any, run: Any) -> None:
        ran = run("query", "--stage", "prod", "--endpoint-url", moto_url, "--region", REGION,
                  "--cache-dir", str(tmp_path / "cache"), "SELECT 1")
        assert ran.status == 1
        assert "NoSuchBucket" in ran.error_line() and "--bucket" in ran.error_line()

    def test_records_delivered_through_firehose(self, landing: Any, tmp_path: Any, run: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """setup's layout, as moto's Firehose fills it from the real client."""
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        client = DXTrack()
        client.configure(context="delivered", run_id="run-1", **landing.client_options())
        for page in range(5):
            client.metric("scrape.products", page, metadata={"shop": "a"})
        try:
            raise KeyError("price")
        except KeyError:
            client.error()
        assert client.flush_metrics_buffer(timeout=20)
        client.close(timeout=10)
        flags = ["--stage", "dev", "--endpoint-url", landing.url, "--region", REGION,
                 "--bucket", "dxtrack-landing", "--cache-dir", str(tmp_path / "cache")]
        ran = run("query", *flags, "--since", "1h", "--format", "csv",
                  "SELECT count(*) AS n, sum(value) AS total FROM metric")
        assert ran.out == "n,total\n5,10.0\n", ran.err
        error = landing.records("error")[0]
        shown = run("show", *flags, error["id"][:10])
        assert shown.status == 0 and "KeyError" in shown.out
        assert 'raise KeyError("price")' in shown.out


def test_parsing_times_and_the_default_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_time("2026-12-01") == datetime.datetime(2026, 12, 1)
    assert parse_time("2026-12-01", end=True) == datetime.datetime(2026, 12, 2)
    assert parse_time("2026-12-01T06:00+02:00") == datetime.datetime(2026, 12, 1, 4)
    assert parse_time("2026-12-01T06:00Z") == datetime.datetime(2026, 12, 1, 6)
    window = Window(datetime.datetime(2026, 12, 1, 6), datetime.datetime(2026, 12, 3))
    assert window.days() == (datetime.date(2026, 11, 30), datetime.date(2026, 12, 3))
    assert default_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/dxtrack"
    assert default_cache_dir({"XDG_CACHE_HOME": "relative"}) == os.path.join(
        os.path.expanduser("~"), ".cache", "dxtrack")


# -- Athena on the moto server -------------------------------------------------------------
def _moto_api(url: str, path: str, body: Dict[str, Any]) -> None:
    request = urllib.request.Request(f"{url}/moto-api/{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def athena(s3: Any, moto_url: str) -> Iterator[Any]:
    """moto's Athena, answering the next query with two rows (after the header row)."""
    columns = [{"Name": "shop", "Type": "varchar"}, {"Name": "n", "Type": "bigint"},
               {"Name": "total", "Type": "double"}]
    rows = [["shop", "n", "total"], ["shop-0", "15", "210.0"], ["shop-1", "15", None]]
    _moto_api(moto_url, "static/athena/query-results", {
        "account_id": ACCOUNT, "region": REGION, "results": [{
            "rows": [{"Data": [{} if v is None else {"VarCharValue": v} for v in row]}
                     for row in rows],
            "column_info": columns}]})
    yield boto3.client("athena", region_name=REGION, endpoint_url=moto_url, **KEYS)
    _moto_api(moto_url, "state-manager/unset-transition", {"model_name": "athena::execution"})


class TestAthena:
    """``--athena``: the call flow and its parameters (moto runs no SQL)."""

    SQL = "SELECT json_extract_scalar(metadata, '$.shop') AS shop, count(*) AS n FROM metric"

    def test_the_query_its_database_and_result_location(self, athena: Any, moto_url: str,
                                                        run: Any) -> None:
        ran = run("query", "--stage", "dev", "--endpoint-url", moto_url, "--region", REGION,
                  "--athena", "--format", "json", self.SQL)
        assert ran.status == 0, ran.err
        assert ran.json() == [{"shop": "shop-0", "n": 15, "total": 210.0},
                              {"shop": "shop-1", "n": 15, "total": None}]
        [query_id] = athena.list_query_executions()["QueryExecutionIds"]
        execution = athena.get_query_execution(QueryExecutionId=query_id)["QueryExecution"]
        assert execution["Query"] == self.SQL
        assert execution["QueryExecutionContext"] == {"Database": "dxtrack_dev"}
        assert execution["ResultConfiguration"]["OutputLocation"].startswith(
            f"s3://{BUCKET}/athena-results/")

    def test_polls_until_done_with_a_bounded_wait(self, athena: Any, moto_url: str) -> None:
        _moto_api(moto_url, "state-manager/set-transition", {
            "model_name": "athena::execution",
            "transition": {"progression": "manual", "times": 3}})
        calls = Calls()
        calls.session.events.register("before-call.athena", calls._count)
        config = Config(stage="prod", context="q", run_id="-", endpoint_url=moto_url,
                        region_name=REGION, **KEYS)
        slept: List[float] = []
        result = athena_module.run(config, self.SQL, output="s3://elsewhere/results/",
                                   session=calls.session, sleep=slept.append)
        made = calls.take()
        assert made[0] == "StartQueryExecution" and made[-1] == "GetQueryResults"
        assert made.count("GetQueryExecution") >= 3 and slept
        assert result.columns == ["shop", "n", "total"] and len(result.rows) == 2
        execution = athena.get_query_execution(
            QueryExecutionId=athena.list_query_executions()["QueryExecutionIds"][0])
        assert execution["QueryExecution"]["QueryExecutionContext"] == {
            "Database": "dxtrack_prod"}
        assert execution["QueryExecution"]["ResultConfiguration"]["OutputLocation"].startswith(
            "s3://elsewhere/results/")

    def test_a_query_that_does_not_finish_is_stopped(self, athena: Any, moto_url: str) -> None:
        _moto_api(moto_url, "state-manager/set-transition", {
            "model_name": "athena::execution",
            "transition": {"progression": "manual", "times": 1000}})
        calls = Calls()
        calls.session.events.register("before-call.athena", calls._count)
        config = Config(stage="dev", context="q", run_id="-", endpoint_url=moto_url,
                        region_name=REGION, **KEYS)
        now = [0.0]

        def sleep(seconds: float) -> None:
            now[0] += seconds

        with pytest.raises(athena_module.AthenaError, match="did not finish within 5 s"):
            athena_module.run(config, self.SQL, timeout=5, poll=1, session=calls.session,
                              sleep=sleep, clock=lambda: now[0])
        made = calls.take()
        assert made[-1] == "StopQueryExecution" and made.count("GetQueryExecution") <= 6

    def test_usage(self, s3: Any, moto_url: str, run: Any) -> None:
        flags = ["--endpoint-url", moto_url, "--region", REGION, "--athena"]
        assert run("query", "--stage", "dev", *flags, "--since", "1d", self.SQL).status == 2
        assert run("query", "--stage", "test", "--athena", self.SQL).status == 2

