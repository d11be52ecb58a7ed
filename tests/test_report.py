"""``dxtrack report`` (issue 15) over records the library itself wrote in stage ``test``.

Each test records runs of a job with a real ``DXTrack`` client into a temporary output
directory, then runs the command as a child process (exit status, standard output) or
calls :func:`dxtrack.report.build` on the DuckDB views of :mod:`dxtrack.query`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

from dxtrack import DXTrack, query, report
from dxtrack.cli import main
from dxtrack.fingerprint import fingerprint, frames

CONTEXT = "shop-scraper"
Metric = Tuple[str, float, Dict[str, Any]]


def record_run(out: Any, run_id: str, metrics: Iterable[Metric] = (),
               errors: Iterable[BaseException] = (), context: str = CONTEXT,
               at: Optional[dt.datetime] = None) -> None:
    """One run of a job: its metrics (at ``at``, if given) and errors, flushed to ``out``."""
    client = DXTrack()
    client.configure(stage="test", output_dir=str(out), context=context, run_id=run_id)
    for name, value, metadata in metrics:
        client.metric(name, value, metadata=metadata, **({"timestamp": at} if at else {}))
    for exc in errors:
        client.error(metadata={"shop": "a"}, exception=exc)
    assert client.flush_metrics_buffer()
    client.close()


def shops(values: Dict[str, float], name: str = "products") -> List[Metric]:
    """One metric per shop, with a per-record URL and a number that do not group."""
    return [(name, value, {"shop": shop, "url": f"https://{shop}.example/{next(_REQUESTS)}",
                           "seconds": value / 7}) for shop, value in values.items()]


_REQUESTS = itertools.count()


def raised(make: Any) -> BaseException:
    try:
        make()
    except Exception as exc:
        return exc
    raise AssertionError("nothing raised")


def generated_error(blank_lines: int, kind: str = "LookupError") -> BaseException:
    """An error raised by generated code whose raising line moved down ``blank_lines``
    lines, and whose message names an object's address, as a new release would."""
    source = "\n" * blank_lines + (
        "def fetch_price(shop, page):\n"
        f"    raise {kind}('no price for %s at %s' % (shop, hex(id(page))))\n")
    namespace: Dict[str, Any] = {}
    exec(compile(source, "scraper/generated.py", "exec"), namespace)
    # The page stays alive with the traceback, so each error names another address.
    return raised(lambda: namespace["fetch_price"]("shop-a", object()))


def dxtrack(out: Any, *args: str, env: Optional[Dict[str, str]] = None,
            ) -> subprocess.CompletedProcess[str]:
    """``dxtrack report --stage test --output-dir OUT ARGS``, by the command's own ``main()``
    in this process (a new interpreter per call would cost a second of imports each), with no
    ``DXTRACK_*`` variables but those of ``env``."""
    argv = ["report", "--stage", "test", "--output-dir", str(out), *args]
    saved = dict(os.environ)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        for name in [name for name in os.environ if name.startswith("DXTRACK_")]:
            del os.environ[name]
        os.environ.update(env or {})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(argv, status, stdout.getvalue(), stderr.getvalue())


def dxtrack_process(out: Any, *args: str, env: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The same in a new interpreter, for what only a new one can show."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("DXTRACK_")}
    child.update(env)
    return subprocess.run(
        [sys.executable, "-m", "dxtrack", "report", "--stage", "test", "--output-dir", str(out),
         *args], env=child, capture_output=True, text=True, timeout=120)


def build(out: Any, **options: Any) -> report.Report:
    con = query.connect(*query.local_files(str(out)))
    try:
        return report.build(con, **options)
    finally:
        con.close()


class TestCompleteness:
    """The previous run's metric and metadata combinations, missing or dropped now."""

    def test_a_shop_that_stopped_reporting_is_missing(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 10, "b": 20, "c": 30}))
        record_run(tmp_path, "run-2", shops({"a": 10, "b": 20}))
        assert build(tmp_path, runs=1).completeness.missing  # charts of one run, same check
        done = dxtrack(tmp_path)
        assert done.returncode == 1, done.stderr
        [line] = [line for line in done.stdout.splitlines() if line.strip().startswith("missing")]
        assert line.split() == ["missing", "products", "shop=c", "30", "-"]
        assert "products by shop\n" in done.stdout  # url and seconds vary per record
        assert "1 missing, 0 dropped by more than 50%" in done.stdout

    def test_most_shops_gone_are_each_missing(self, tmp_path: Any) -> None:
        """Shops that stopped reporting do not make ``shop`` look like a per-record key."""
        record_run(tmp_path, "run-1", shops({"a": 10, "b": 1, "c": 1, "d": 1, "e": 1}))
        record_run(tmp_path, "run-2", shops({"a": 10}))
        done = build(tmp_path).completeness
        assert done.by == {"products": ("shop",)}
        assert [gap.metadata for gap in done.missing] == [{"shop": s} for s in "bcde"]

    def test_a_key_with_letters_beyond_ascii(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1",
                   [("products", 1, {"shöp": "ä"}), ("products", 2, {"shöp": "b"})])
        record_run(tmp_path, "run-2", [("products", 1, {"shöp": "ä"})])
        for by in (None, ("shöp",)):
            [gap] = build(tmp_path, by=by).completeness.missing
            assert gap.metadata == {"shöp": "b"}

    def test_a_record_that_landed_twice_counts_once(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 100, "b": 100}))
        record_run(tmp_path, "run-2", shops({"a": 100, "b": 45}))
        path = tmp_path / "metric.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines + lines[-2:]))  # run-2 redelivered, as Firehose may
        result = build(tmp_path)
        assert [(g.metadata, g.now) for g in result.completeness.dropped] == [({"shop": "b"}, 45)]
        assert [(m.name, m.count, m.sum) for m in result.metrics] == [("products", 2, 145)]
        assert result.run.metrics == 2

    def test_a_drop_beyond_the_threshold_and_not_one_within_it(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 100, "b": 100, "c": 100}))
        record_run(tmp_path, "run-2", shops({"a": 100, "b": 40, "c": 60}))  # -60%, -40%
        gaps = build(tmp_path).completeness.gaps
        assert [(g.kind, g.metadata, g.now) for g in gaps] == [("dropped", {"shop": "b"}, 40)]
        assert gaps[0].change == pytest.approx(-0.6)
        assert dxtrack(tmp_path).returncode == 1
        for allowed in ("70%", "70", "0.7"):
            done = dxtrack(tmp_path, "--drop", allowed)
            assert done.returncode == 0, (allowed, done.stdout)
            assert "0 missing, 0 dropped by more than 70%" in done.stdout
        assert len(build(tmp_path, drop=0.3).completeness.dropped) == 2

    def test_a_whole_metric_gone_is_missing(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", [*shops({"a": 1}), ("pages", 5, {"page": 1})])
        record_run(tmp_path, "run-2", shops({"a": 1}))
        [gap] = build(tmp_path).completeness.gaps
        assert (gap.kind, gap.metric_name, gap.metadata) == ("missing", "pages", {})

    def test_by_names_the_keys_instead(self, tmp_path: Any) -> None:
        rows = [("products", 5, {"shop": "a", "page": page}) for page in (1, 2, 3)]
        record_run(tmp_path, "run-1", rows)
        record_run(tmp_path, "run-2", rows[:2])
        assert build(tmp_path).completeness.by == {"products": ("shop",)}  # numbers never
        assert build(tmp_path).completeness.gaps == ()  # shop a: 15 -> 10, not below half
        [gap] = build(tmp_path, by=["shop", "page"]).completeness.gaps
        assert (gap.kind, gap.metadata) == ("missing", {"shop": "a", "page": 3})
        done = dxtrack(tmp_path, "--by", "shop,page")
        assert done.returncode == 1 and "grouped by --by shop,page" in done.stdout

    def test_a_complete_run_exits_0(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 10, "b": 20}))
        record_run(tmp_path, "run-2", shops({"a": 11, "b": 19, "new": 1}))
        done = dxtrack(tmp_path)
        assert (done.returncode, done.stderr) == (0, "")
        assert "3 combinations compared, 0 missing, 0 dropped" not in done.stdout
        assert "2 combinations compared, 0 missing, 0 dropped" in done.stdout

    def test_no_previous_run_is_said_and_exits_0(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 10}))
        done = dxtrack(tmp_path)
        assert done.returncode == 0
        assert "no previous run of this context to compare with" in done.stdout


class TestMetrics:
    """Each metric name of the run: count, sum, min, max and the value recorded last."""

    def test_summary_of_the_run_only(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", [("rows", 1000, {})])
        record_run(tmp_path, "run-2", [("rows", v, {}) for v in (5, 1, 9, 3)])
        [rows] = build(tmp_path).metrics
        assert (rows.count, rows.sum, rows.min, rows.max, rows.last) == (4, 18, 1, 9, 3)
        table = dxtrack(tmp_path).stdout.split("Metrics (1 name)\n")[1].splitlines()
        assert table[0].split() == ["name", "count", "sum", "min", "max", "last"]
        assert table[1].split() == ["rows", "4", "18", "1", "9", "3"]


class TestErrors:
    """Errors grouped by type and innermost frames, whatever their line numbers or
    addresses."""

    def test_moved_lines_and_other_addresses_group_together(self, tmp_path: Any) -> None:
        first, moved = generated_error(0), generated_error(12)
        assert re.search(r"line 2,", first.__traceback__ and _tb(first) or "")
        assert "line 14," in _tb(moved) and str(first) != str(moved)
        other = generated_error(0, kind="KeyError")
        record_run(tmp_path, "run-1", errors=[first, moved, other, generated_error(3)])
        groups = build(tmp_path).errors
        assert [(g.type, g.count) for g in groups] == [("LookupError", 3), ("KeyError", 1)]
        lookup = groups[0]
        assert lookup.value == str(first) and re.fullmatch(r"[0-9a-f]{12}", lookup.fingerprint)
        assert lookup.fingerprint == fingerprint("LookupError", "", _tb(moved))
        assert "scraper/generated.py in fetch_price" in lookup.frames
        text = dxtrack(tmp_path).stdout
        assert "Errors (4 errors in 2 groups)" in text and lookup.fingerprint in text

    def test_frames_are_the_innermost_normalised(self) -> None:
        traceback = (
            "Traceback (most recent call last):\n"
            '  File "/srv/app/main.py", line 10, in <module>\n    run()\n'
            '  File "/home/u/.venv/lib/python3.11/site-packages/shop/api.py", line 88, in run\n'
            "    fetch(0x7f00deadbeef)\n    ^^^^^^^^^^^^^^^^^^^^^\n"
            '  File "/srv/app/fetch.py", line 3, in fetch\n'
            '  File "/srv/app/fetch.py", line 7, in parse\n    raise ValueError(x)\n'
            "ValueError: bad value at 0x7f00deadbeef\n    indented text of the message\n")
        assert frames(traceback) == [
            "shop/api.py in run: fetch(0x?)", "app/fetch.py in fetch",
            "app/fetch.py in parse: raise ValueError(x)"]
        # Another release directory is the same place; an exception group's members' frames
        # are frames too.
        moved = traceback.replace("/srv/app/", "/srv/releases/20261202/app/")
        assert frames(moved) == frames(traceback)
        grouped = ("  + Exception Group Traceback (most recent call last):\n"
                   '  |   File "/srv/app/main.py", line 5, in <module>\n  |     run()\n'
                   "  | ExceptionGroup: x (1 sub-exception)\n  +-+---------------- 1 ---\n"
                   "    | Traceback (most recent call last):\n"
                   '    |   File "/srv/app/fetch.py", line 9, in parse\n'
                   "    |     raise ValueError(x)\n    | ValueError: a\n")
        assert frames(grouped) == ["app/main.py in <module>: run()",
                                   "app/fetch.py in parse: raise ValueError(x)"]

    def test_errors_without_frames_group_by_normalised_value(self) -> None:
        a = fingerprint("TimeoutError", "shop 12 timed out after 30.5 s at 0x7f01", None)
        b = fingerprint("TimeoutError", "shop 7 timed out after 2 s at 0x7fab", "")
        c = fingerprint("TimeoutError", "shop 7 refused", "")
        assert a == b != c


class TestRunSelection:
    """Which context and run: the latest run by its last record, the only context."""

    def test_the_latest_run_is_the_one_with_the_latest_record(self, tmp_path: Any) -> None:
        record_run(tmp_path, "zzz-old", shops({"a": 1}), at=dt.datetime(2024, 1, 1))
        record_run(tmp_path, "aaa-new", shops({"a": 2}), at=dt.datetime(2024, 1, 2))
        record_run(tmp_path, "mmm-mid", shops({"a": 3}), at=dt.datetime(2024, 1, 1, 12))
        made = build(tmp_path)
        assert made.run.run_id == "aaa-new"
        assert made.completeness.previous and made.completeness.previous.run_id == "mmm-mid"
        assert [r.run_id for r in made.history] == ["zzz-old", "mmm-mid", "aaa-new"]
        assert made.sums == {"products": (1, 3, 2)}
        earlier = build(tmp_path, run_id="mmm-mid")
        assert earlier.completeness.previous and \
            earlier.completeness.previous.run_id == "zzz-old"
        assert "run 'mmm-mid'" in dxtrack(tmp_path, "--run-id", "mmm-mid").stdout

    def test_several_contexts_need_context(self, tmp_path: Any) -> None:
        record_run(tmp_path, "r1", shops({"a": 1}))
        record_run(tmp_path, "r1", shops({"a": 1}), context="nightly-export")
        done = dxtrack(tmp_path)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip() == (
            "dxtrack: error: there are records of 2 contexts; name one with --context: "
            "'nightly-export', 'shop-scraper'")
        assert dxtrack(tmp_path, "--context", "nightly-export").returncode == 0
        env = {"DXTRACK_CONTEXT": "nightly-export"}
        assert "context 'nightly-export'" in dxtrack(tmp_path, env=env).stdout
        unknown = dxtrack(tmp_path, "--context", "nope")
        assert unknown.returncode == 2 and "'nightly-export', 'shop-scraper'" in unknown.stderr
        no_run = dxtrack(tmp_path, "--context", "nightly-export", "--run-id", "r9")
        assert no_run.returncode == 2 and "no run 'r9'" in no_run.stderr

    def test_no_records_exits_1(self, tmp_path: Any) -> None:
        done = dxtrack(tmp_path)
        assert done.returncode == 1
        assert done.stderr.endswith("dxtrack: error: there are no records to report on\n")
        assert dxtrack(tmp_path, "--drop", "half").returncode == 2


class TestFromTheBucket:
    """Stages dev and prod: the report reads the bucket as ``query`` does."""

    def test_a_shop_that_stopped_reporting_through_firehose_and_s3(
        self, landing: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        for run_id, values in (("run-1", {"a": 10, "b": 20}), ("run-2", {"a": 11})):
            client = DXTrack()  # gzip members: the objects are multi-member gzip files
            client.configure(context=CONTEXT, run_id=run_id, compression="gzip",
                             **landing.client_options())
            for name, value, metadata in shops(values):
                client.metric(name, value, metadata=metadata)
            assert client.flush_metrics_buffer(timeout=20)
            client.close(timeout=10)
        assert all(body[:2] == b"\x1f\x8b" for body in landing.objects("metric"))
        status = main(["report", "--stage", "dev", "--endpoint-url", landing.url,
                       "--region", "eu-west-1", "--bucket", "dxtrack-landing", "--since", "1h",
                       "--cache-dir", str(tmp_path / "cache"), "--format", "json"])
        out = capsys.readouterr().out
        assert status == 1
        done = json.loads(out)
        assert done["run"]["run_id"] == "run-2"
        missing = done["completeness"]["missing"]
        assert [(gap["metric_name"], gap["metadata"]) for gap in missing] == \
            [("products", {"shop": "b"})]


class TestJson:
    """``--format json``: the same report, for machines."""

    def test_json_report(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 10, "b": 20}))
        record_run(tmp_path, "run-2", shops({"a": 10}), errors=[generated_error(1)])
        done = dxtrack(tmp_path, "--format", "json")
        assert done.returncode == 1
        data = json.loads(done.stdout)
        assert data["context"] == CONTEXT and data["run"]["run_id"] == "run-2"
        assert data["metrics"] == [{"name": "products", "count": 1, "sum": 10.0, "min": 10.0,
                                    "max": 10.0, "last": 10.0}]
        [error] = data["errors"]
        assert error["type"] == "LookupError" and error["count"] == 1
        assert error["first_seen"].endswith("Z") and "traceback" in error
        done_part = data["completeness"]
        assert done_part["previous_run"]["run_id"] == "run-1"
        assert done_part["missing"] == [{"metric_name": "products", "metadata": {"shop": "b"},
                                         "before": 20.0, "now": None, "change": None}]
        assert done_part["by"] == {"products": ["shop"]} and data["failed"] is True


class TestDrop:
    """``--drop`` takes a percentage or a fraction."""

    @pytest.mark.parametrize(("text", "value"), [("50%", 0.5), ("50", 0.5), ("0.5", 0.5),
                                                 ("12.5 %", 0.125), ("0", 0.0), ("1", 0.01),
                                                 ("100%", 1.0), ("0.99", 0.99)])
    def test_accepted(self, text: str, value: float) -> None:
        assert report.parse_drop(text) == pytest.approx(value)

    @pytest.mark.parametrize("text", ["half", "150%", "-5", ""])
    def test_refused(self, text: str) -> None:
        with pytest.raises(ValueError):
            report.parse_drop(text)


INJECTED = "<script>alert('x')</script>"


def html_runs(out: Any) -> None:
    """Two runs with markup in metadata, a metric name, an exception value and a run id."""
    record_run(out, "run-1", [*shops({"a": 10, INJECTED: 20}),
                              ("<b>bold</b>.rows", 3, {"note": "<img src=x onerror=alert(1)>"})])
    record_run(out, "r2--><i>x", [*shops({"a": 10}), ("<b>bold</b>.rows", 3, {})],
               errors=[raised(lambda: _raise(ValueError(f"{INJECTED} at 0x7f12")))])


def _raise(exc: BaseException) -> None:
    raise exc


class TestHtml:
    """``--html FILE``: one self-contained page, all record text escaped."""

    def test_a_page_that_cannot_be_written_leaves_nothing(self, tmp_path: Any) -> None:
        html_runs(tmp_path)
        target = tmp_path / "taken"
        target.mkdir()
        done = dxtrack(tmp_path, "--html", str(target))
        assert done.returncode == 1 and "--html: cannot write" in done.stderr
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["error.jsonl", "metric.jsonl",
                                                               "taken"]

    def test_self_contained_and_escaped(self, tmp_path: Any) -> None:
        html_runs(tmp_path)
        page = tmp_path / "report.html"
        done = dxtrack(tmp_path, "--html", str(page))
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"dxtrack report: the HTML page is {page}\n"
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
        assert "<script" not in text.lower() and "<link" not in text.lower()
        assert "<img" not in text and "<b>" not in text and "<i>" not in text
        assert "&lt;script&gt;alert(" in text and "&lt;b&gt;bold&lt;/b&gt;.rows" in text
        assert "Content-Security-Policy" in text and "default-src &#x27;none&#x27;" not in text
        assert text.count("<svg") == 2 and text.count("<details>") == 1

    def test_without_matplotlib_one_line_says_how_to_install(self, tmp_path: Any) -> None:
        record_run(tmp_path, "run-1", shops({"a": 1}))
        blocker = tmp_path / "blocker" / "matplotlib"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
        page = tmp_path / "report.html"
        done = dxtrack_process(tmp_path, "--html", str(page), env={
            "PYTHONPATH": os.pathsep.join([str(blocker.parent), *sys.path])})
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == ("dxtrack: error: report --html needs matplotlib: "
                               "pip install 'dxtrack[report]'\n")
        assert not page.exists()

    def test_rendered_by_a_headless_browser(self, tmp_path: Any) -> None:
        browser = _browser()
        if browser is None:
            pytest.skip("Chromium not installed: apt-get install chromium")
        html_runs(tmp_path)
        page = tmp_path / "report.html"
        assert dxtrack(tmp_path, "--html", str(page)).returncode == 1
        dom = subprocess.run(
            [browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
             f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
            capture_output=True, text=True, timeout=120).stdout
        assert len(re.findall(r"<svg\b", dom)) == 2  # a chart per metric
        assert len(re.findall(r'<g id="patch_', dom)) >= 2 * 3  # their bars and background
        assert len(re.findall(r"<table\b", dom)) == 4  # grouping, gaps, metrics, errors
        assert "<details>" in dom and "<script" not in dom and "<b>bold" not in dom
        assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom


def _browser() -> Optional[str]:
    candidates: Sequence[str] = ("chromium", "chromium-browser", "google-chrome")
    found = [shutil.which(name) for name in candidates]
    if os.path.exists("/usr/bin/chromium"):
        found.insert(0, "/usr/bin/chromium")
    return next((path for path in found if path), None)


def _tb(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
