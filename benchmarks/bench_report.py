"""Time and peak memory of ``dxtrack report`` over a large stage-``test`` output directory.

Standalone (not part of ``benchmarks/run.py``)::

    python benchmarks/bench_report.py --lines 1000000

It writes ``--lines`` metric lines (and ``--errors`` error lines) in the library's exact
record format with orjson: several contexts of ~20 runs each, five metric names, metadata
``shop`` and ``page``, a 64-hex ``id`` per record; the last run of each context lost a shop
and half of another's products, so the report has something to find. Then it runs
``dxtrack report`` for one context as text, as JSON and with ``--html``. Each case runs under
a fresh measuring child (this file with ``--measure``) that starts the command and reads
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, so one case's peak never mixes with
another's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = ("scrape.products", "scrape.promos", "scrape.pages", "scrape.seconds", "parse.rows")
START = 1_780_000_000.0  # a fixed origin: the corpus is the same on every run


def generate(out: str, lines: int, errors: int, contexts: int, runs: int, shops: int) -> None:
    """Write ``metric.jsonl`` and ``error.jsonl`` in ``out``, records in time order."""
    per_run = max(1, lines // (contexts * runs))
    pages = max(1, per_run // (len(NAMES) * shops))
    written = 0
    with open(os.path.join(out, "metric.jsonl"), "wb") as metric:
        for c in range(contexts):
            context = f"shop-scraper-{c}"
            for r in range(runs):
                run_id = f"2026-11-{r + 1:02d}T06:00:00"
                clock = START + r * 86_400 + c * 600
                last = r == runs - 1
                batch: List[bytes] = []
                for shop in range(shops):
                    if last and shop == 0:
                        continue  # the shop that stopped reporting
                    for page in range(1, pages + 1):
                        for name in NAMES:
                            if written >= lines:
                                break
                            value = float((shop * 7 + page) % 50 + 1)
                            if last and shop == 1 and name == "scrape.products":
                                value /= 3
                            clock += 0.001
                            record: Dict[str, Any] = {
                                "context": context, "metric_name": name, "value": value,
                                "stage": "test",
                                "metadata": {"shop": f"shop-{shop:03d}", "page": page},
                                "run_id": run_id, "timestamp": clock,
                            }
                            record["id"] = hashlib.sha256(orjson.dumps(record)).hexdigest()
                            batch.append(orjson.dumps(record))
                            written += 1
                metric.write(b"\n".join(batch) + b"\n" if batch else b"")
    with open(os.path.join(out, "error.jsonl"), "wb") as error:
        for i in range(errors):
            kind = ("ValueError", "KeyError", "TimeoutError")[i % 3]
            line = 10 + i % 40  # the same error from many lines and addresses
            traceback = (
                "Traceback (most recent call last):\n"
                f'  File "/srv/scraper/run.py", line {line}, in main\n    scrape(shop)\n'
                f'  File "/srv/scraper/shops.py", line {line * 3}, in scrape\n'
                f"    raise {kind}(message)\n"
                f"{kind}: no price in <Page object at 0x7f{i:010x}>\n")
            record = {
                "context": f"shop-scraper-{i % contexts}",
                "exception": {"type": kind, "value": f"no price in <Page at 0x7f{i:010x}>",
                              "traceback": traceback},
                "stage": "test", "metadata": {"shop": f"shop-{i % shops:03d}"},
                "timestamp": START + (runs - 1) * 86_400 + i * 0.01,
                "run_id": f"2026-11-{runs:02d}T06:00:00",
            }
            record["id"] = hashlib.sha256(orjson.dumps(record)).hexdigest()
            error.write(orjson.dumps(record) + b"\n")


def measure(command: List[str]) -> Dict[str, Any]:
    """Run ``command`` from a fresh measuring child: wall seconds, peak RSS, exit status."""
    done = subprocess.run([sys.executable, __file__, "--measure", "--", *command],
                          capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _measured(command: List[str]) -> None:
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024,
                      "status": done.returncode, "stderr": done.stderr[-500:]}))


def main() -> int:
    if sys.argv[1:2] == ["--measure"]:
        _measured(sys.argv[3:])  # after "--measure --": the command, as given
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="metric lines to write")
    parser.add_argument("--errors", type=int, default=20_000, help="error lines to write")
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20, help="runs per context")
    parser.add_argument("--shops", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each case: the median time and the highest peak shown")
    parser.add_argument("--dir", help="write (or reuse) the corpus here; default a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dxtrack-bench-report-") as scratch:
        out = args.dir or scratch
        os.makedirs(out, exist_ok=True)
        started = time.perf_counter()
        if not os.path.exists(os.path.join(out, "metric.jsonl")):
            generate(out, args.lines, args.errors, args.contexts, args.runs, args.shops)
        made = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(out, f)) for f in ("metric.jsonl",
                                                                   "error.jsonl"))
        print(f"corpus: {args.lines:,} metric and {args.errors:,} error lines, "
              f"{size / 2**20:,.0f} MiB, {args.contexts} contexts x {args.runs} runs "
              f"(written in {made:.1f} s) in {out}\n")
        env_path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        os.environ["PYTHONPATH"] = env_path
        base = [sys.executable, "-m", "dxtrack", "report", "--stage", "test",
                "--output-dir", out, "--context", "shop-scraper-0"]
        cases = {"text": base, "--format json": [*base, "--format", "json"],
                 "--html": [*base, "--html", os.path.join(out, "report.html")]}
        print(f"| dxtrack report | seconds (median of {args.repeat}) | peak RSS (MiB) "
              "| exit status |")
        print("| --- | ---: | ---: | ---: |")
        for label, command in cases.items():
            results = [measure(command) for _ in range(args.repeat)]
            for result in results:
                if result["status"] not in (0, 1):
                    print(result["stderr"], file=sys.stderr)
            seconds = statistics.median(r["seconds"] for r in results)
            peak = max(r["peak_mib"] for r in results)
            print(f"| {label} | {seconds:.2f} | {peak:.0f} | {results[-1]['status']} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
