"""``dxtrack query`` and ``dxtrack report`` over a million metric lines: time and peak
memory, cold and warm.

    python benchmarks/bench_query.py --lines 1000000      # standalone, prints a Markdown table
    python benchmarks/run.py query                         # in the suite (--quick: 100,000)

The corpus (benchmarks/_corpus.py) is written once as stage test's ``metric.jsonl`` and, cut
into 24 gzip objects, into a bucket on a moto server (its own process) in setup's layout. The
query is a GROUP BY over every line (metric name and shop: count, sum). Each measurement runs
in a child process of its own, so peak memory (``ru_maxrss``) is that measurement's alone:

- library: ``dxtrack.sources`` and ``dxtrack.query`` called in the child, timed from finding
  the files to the last row (imports excluded);
- process: ``python -m dxtrack query`` end to end (interpreter start and imports included),
  its peak from ``os.wait4``.

S3 cold: an empty cache directory, so every object is fetched, decompressed and written;
warm: the cache holds them, so only the listing is asked of S3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY = ("SELECT metric_name, metadata->>'shop' AS shop, count(*) AS n, sum(value) AS total "
         "FROM metric GROUP BY ALL")
OBJECTS = 24


def prepare(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Make the corpus: stage test's metric.jsonl, and gzip objects in the moto bucket."""
    import boto3
    from _corpus import corpus_lines, gzip_objects

    start = time.perf_counter()
    corpus = corpus_lines(spec["lines"])
    seconds = time.perf_counter() - start
    os.makedirs(spec["output_dir"])
    path = os.path.join(spec["output_dir"], "metric.jsonl")
    with open(path, "wb") as out:
        out.writelines(corpus)
    s3 = boto3.session.Session(region_name=c.REGION, **c.CREDENTIALS).client(
        "s3", endpoint_url=spec["url"])
    gzip_bytes = 0
    for n, (day, body) in enumerate(gzip_objects(corpus, OBJECTS)):
        s3.put_object(Bucket=c.BUCKET, Body=body,
                      Key=f"metric/dt={day:%Y-%m-%d}/dxtrack-metric-input-dev-1-{n:04d}.gz")
        gzip_bytes += len(body)
    # Read once, so that no cold measurement pays for moto's first read of an object.
    for item in s3.list_objects_v2(Bucket=c.BUCKET).get("Contents", []):
        s3.get_object(Bucket=c.BUCKET, Key=item["Key"])["Body"].read()
    return {"seconds": seconds, "plain_mb": os.path.getsize(path) / 1e6,
            "gzip_mb": gzip_bytes / 1e6}


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement, in this (child) process: find the files, run the query."""
    import resource

    from dxtrack.config import Config
    from dxtrack.query import connect
    from dxtrack.results import from_duckdb
    from dxtrack.sources import Bucket, local

    start = time.perf_counter()
    if spec["source"] == "local":
        files = local(spec["output_dir"])
    else:
        config = Config(stage="dev", context="bench", run_id="-", endpoint_url=spec["url"],
                        region_name=c.REGION, **c.CREDENTIALS)
        files = Bucket(config, cache_dir=spec["cache_dir"], bucket=c.BUCKET).files()
    result = from_duckdb(connect(files.metric, files.error), QUERY)
    seconds = time.perf_counter() - start
    lines = sum(row[2] for row in result.rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": seconds, "peak_kib": peak, "lines": lines, "fetched": files.fetched}


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["AWS_ACCESS_KEY_ID"] = c.CREDENTIALS["aws_access_key_id"]
    env["AWS_SECRET_ACCESS_KEY"] = c.CREDENTIALS["aws_secret_access_key"]
    return env


def _in_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure",
                           json.dumps(spec)], env=_child_env(), capture_output=True, text=True,
                          timeout=1800)
    if done.returncode:
        raise RuntimeError(f"measurement failed: {done.stderr.strip()[-2000:]}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _process(args: List[str], allowed: Tuple[int, ...] = (0,)) -> Tuple[float, int]:
    """``python -m dxtrack ARGS``: its wall time and peak RSS (KiB); an exit status not in
    ``allowed`` is a failure (``report`` exits 1 when it finds something missing)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "dxtrack", *args], env=_child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    problem = child.stderr.read().decode() if child.stderr else ""
    if child.returncode not in allowed:
        raise RuntimeError(f"dxtrack {args[0]} failed: {problem.strip()[-2000:]}")
    return seconds, usage.ru_maxrss


def run(quick: bool, lines: int = 0) -> c.Report:
    """The benchmark: one table of time and peak memory per variant."""
    lines = lines or (100_000 if quick else 1_000_000)
    report = c.Report("query")
    table = c.Table(f"dxtrack query (a GROUP BY) and dxtrack report over {lines:,} metric "
                    "lines",
                    ["variant", "seconds", "peak RSS (MiB)", "objects fetched"])
    work = tempfile.mkdtemp(prefix="dxtrack-bench-query-")
    moto = c.MotoServer()
    try:
        moto.reset()
        output_dir = os.path.join(work, "output")
        # Made in a child: a parent holding the corpus would pass its peak on to every child
        # (Linux keeps ru_maxrss across fork and exec).
        made = _in_child({"prepare": True, "lines": lines, "output_dir": output_dir,
                          "url": moto.url})
        table.notes.append(f"corpus: {lines:,} lines made in {made['seconds']:.1f} s; "
                           f"{made['plain_mb']:,.0f} MB as JSON lines, {made['gzip_mb']:,.0f} MB "
                           f"in {OBJECTS} gzip objects")

        def add(variant: str, seconds: float, peak_kib: int, fetched: Any = "-") -> None:
            table.add(variant, f"{seconds:.2f}", f"{peak_kib / 1024:,.0f}", fetched)

        local = _in_child({"source": "local", "output_dir": output_dir})
        assert local["lines"] == lines, local
        add("local (stage test), library", local["seconds"], local["peak_kib"])
        cache = os.path.join(work, "cache")
        for label in ("cold", "warm"):
            got = _in_child({"source": "s3", "url": moto.url, "cache_dir": cache})
            assert got["lines"] == lines, got
            add(f"S3 {label} cache, library", got["seconds"], got["peak_kib"], got["fetched"])
        flags = ["--stage", "dev", "--endpoint-url", moto.url, "--region", c.REGION,
                 "--bucket", c.BUCKET, "--format", "csv"]
        add("local, python -m dxtrack query", *_process(
            ["query", "--stage", "test", "--output-dir", output_dir, QUERY]))
        add("S3 warm cache, python -m dxtrack query", *_process(
            ["query", *flags, "--cache-dir", cache, QUERY]))
        add("S3 cold cache, python -m dxtrack query", *_process(
            ["query", *flags, "--cache-dir", os.path.join(work, "cache-2"), QUERY]), OBJECTS)
        # The report of one context's latest run (exit 1: the corpus's shops come and go).
        what = ["--context", "shop-scraper"]
        add("local, python -m dxtrack report", *_process(
            ["report", "--stage", "test", "--output-dir", output_dir, *what], (0, 1)))
        report_flags = [flag for flag in flags if flag not in ("--format", "csv")]
        add("S3 cold cache, python -m dxtrack report", *_process(
            ["report", *report_flags, "--cache-dir", os.path.join(work, "cache-3"), *what],
            (0, 1)), OBJECTS)
        add("S3 warm cache, python -m dxtrack report", *_process(
            ["report", *report_flags, "--cache-dir", cache, *what], (0, 1)))
        table.notes.append("each figure from one child process of its own; peak RSS is its "
                           "ru_maxrss")
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    report.tables.append(table)
    return report


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="metric lines (1,000,000)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(prepare(spec) if spec.get("prepare") else measure(spec)))
        return 0
    info = c.machine()
    print(f"dxtrack query benchmark: {info['cores']} cores ({info['cpu']}), "
          f"Python {info['python']}, load average {c.loadavg()}", flush=True)
    report = run(quick=False, lines=args.lines)
    for table in report.tables:
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
