"""Run dxtrack's benchmarks and print their tables, ratios and the issue-6 targets.

    .venv/bin/python benchmarks/run.py                 # everything (make bench), ~5 minutes
    .venv/bin/python benchmarks/run.py --quick         # a smoke run, under a minute
    .venv/bin/python benchmarks/run.py caller memory   # some of them
    .venv/bin/python benchmarks/run.py --markdown out.md   # also write the tables as Markdown

Benchmarks: caller, cpu, cost, throughput, memory, flush, integrations, query. Every figure is
compared with baselines measured in the same run; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
import traceback
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c  # noqa: E402

BENCHMARKS = ("caller", "cpu", "cost", "throughput", "memory", "flush", "integrations", "query")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer and shorter rounds: a smoke run"
    )
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the tables as Markdown to PATH"
    )
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )

    info = c.machine()
    started = datetime.datetime.now().astimezone()
    header = (
        f"dxtrack benchmarks{' (quick)' if args.quick else ''}, {started:%Y-%m-%d %H:%M %Z}: "
        f"{info['cores']} cores ({info['cpu']}), Python {info['python']}, {info['machine']}, "
        f"{info['system']}"
    )
    print(header)
    malloc = c.steady_malloc()
    header += f"; {malloc}"
    print(malloc)
    load_start = c.loadavg()
    print(f"load average at start: {load_start}", flush=True)

    reports = []
    failed: List[str] = []
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        t0 = time.monotonic()
        try:
            report = module.run(args.quick)
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            print(f"[{name}: FAILED after {time.monotonic() - t0:.0f} s]", flush=True)
            continue
        report.seconds = time.monotonic() - t0
        report.load = c.loadavg()
        reports.append(report)
        print()
        for table in report.tables:
            print(table.text())
            print()
        print(f"[{name}: {report.seconds:.0f} s, load average {c.loadavg()}]", flush=True)

    targets = [t for r in reports for t in r.targets]
    summary = c.targets_table(targets)
    if targets:
        print()
        print(summary.text())
    print(f"\nload average at end: {c.loadavg()}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")

    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(
                f"{header}\n\nload average (1, 5, 15 min) at start: {load_start}; "
                f"at end: {c.loadavg()}\n\n"
            )
            for report in reports:
                out.write(
                    f"### {report.name} ({report.seconds:.0f} s, load average after: "
                    f"{report.load})\n\n"
                )
                for table in report.tables:
                    out.write(table.markdown() + "\n\n")
            out.write(summary.markdown() + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
