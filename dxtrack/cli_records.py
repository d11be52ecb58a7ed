"""The ``dxtrack`` commands that read a stage's records: ``query`` (SQL, by DuckDB or
Athena), ``show`` (one record by id) and ``report`` (a run's summary and completeness).
Where the records come from is :mod:`dxtrack.sources`; how rows are printed,
:mod:`dxtrack.results`; the report itself, :mod:`dxtrack.report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Sequence, Tuple

from .cli import (
    BUCKET_NAME,
    PROG,
    SETUP_FLAGS,
    UsageError,
    _add_settings,
    _config,
    _error,
    _from_environment,
    _given,
    _number,
    _Raw,
)
from .config import Config
from .results import FORMATS
from .sources import (
    Bucket,
    Files,
    SourceError,
    Window,
    default_cache_dir,
    local,
    parse_duration,
    parse_time,
)

__all__ = ["add_commands", "add_source", "query", "report", "show"]

#: The settings ``dxtrack report`` takes as flags besides where: which run.
REPORT_FLAGS = ("context", "run_id")

_QUERY_EXAMPLES = """\
examples:
  dxtrack query --stage test "SELECT metric_name, count(*), sum(value) FROM metric GROUP BY 1"
  dxtrack query --stage prod --since 24h --format csv \\
      "SELECT metadata->>'shop' AS shop, sum(value) FROM metric GROUP BY 1 ORDER BY 2 DESC"
  dxtrack query --stage prod --athena \\
      "SELECT count(*) FROM error WHERE dt >= '2026-12-01'"
"""


def add_commands(commands: Any) -> None:
    """Add ``query`` and ``show`` to the ``dxtrack`` parser's subcommands."""
    query = commands.add_parser(
        "query", formatter_class=_Raw, help="run SQL over a stage's records (views metric, error)",
        description="Run one SQL statement over the views metric and error of a stage's records\n"
                    "with DuckDB (pip install 'dxtrack[query]'): stage test reads the output\n"
                    "directory, dev and prod their bucket through a local cache. --athena runs it\n"
                    "in Athena instead. See docs/query.md.",
        epilog=_QUERY_EXAMPLES,
    )
    query.add_argument("sql", metavar="SQL", help="the query; '-' reads it from standard input")
    query.add_argument("--format", choices=FORMATS, default="table",
                       help="table (default), csv, or json: one JSON object a line")
    athena = query.add_argument_group("Athena")
    athena.add_argument("--athena", action="store_true",
                        help="run the SQL in Athena, in the Glue database dxtrack_STAGE")
    athena.add_argument("--athena-output", metavar="S3URL",
                        help="where Athena writes its results (default s3://BUCKET/athena-results/)")
    athena.add_argument("--workgroup", metavar="NAME", help="the Athena workgroup")
    athena.add_argument("--athena-timeout", metavar="SECONDS", type=_seconds, default=300.0,
                        help="stop the query if it has not finished by then (default 300)")
    add_source(query)

    show = commands.add_parser(
        "show", formatter_class=_Raw, help="print one record, found by its id or a prefix",
        description="Print the metric or error whose id is ID, or starts with ID (at least 8 hex\n"
                    "digits), an error with its full traceback. Exit 1 if no record or several\n"
                    "match (they are listed). Records come from where 'dxtrack query' reads them.",
    )
    show.add_argument("id", metavar="ID", help="a record id, or its first 8 or more hex digits")
    add_source(show)
    _add_report(commands)


def _add_report(commands: Any) -> None:
    from .report import DEFAULT_DROP, DEFAULT_RUNS

    report = commands.add_parser(
        "report", formatter_class=_Raw,
        help="summarise a run: its metrics, its errors in groups, what went missing",
        description="Summarise one run of a context (default: the latest): each metric's\n"
                    "count, sum, min, max and last value; errors grouped by fingerprint; and\n"
                    "the metric and metadata combinations of the previous run that are\n"
                    "missing now or whose sum dropped. Exit 0, or 1 when something is missing\n"
                    "or dropped (or there are no records), so a cron job can alert.\n"
                    "Records come from where 'dxtrack query' reads them. See docs/report.md.",
    )
    report.add_argument("--drop", metavar="PERCENT", type=_drop, default=DEFAULT_DROP,
                        help="a sum that fell by more than this since the previous run is "
                             "reported as dropped: 50%%, 50 or 0.5 (default 50%%)")
    report.add_argument("--by", metavar="KEY[,KEY...]", type=_keys,
                        help="compare every metric by these metadata keys (default: each "
                             "metric's text keys that are not per record; docs/report.md)")
    report.add_argument("--format", choices=("text", "json"), default="text",
                        help="the report on standard output as text (default) or JSON")
    report.add_argument("--html", metavar="FILE",
                        help="also write the report as one self-contained HTML page, with a "
                             "chart per metric (needs matplotlib: dxtrack[report])")
    report.add_argument("--runs", metavar="N", type=_positive, default=DEFAULT_RUNS,
                        help=f"the charts cover the last N runs (default {DEFAULT_RUNS})")
    add_source(report, REPORT_FLAGS,
               {"context": "the only context", "run_id": "the latest run"})


def add_source(parser: argparse.ArgumentParser, flags: Sequence[str] = (),
               fallbacks: Any = None) -> None:
    """The flags choosing the records ``query``, ``show`` and ``report`` read (and the
    settings ``flags`` besides)."""
    group = parser.add_argument_group(
        "records", "Stage test reads metric.jsonl and error.jsonl in the output directory;\n"
                   "dev and prod read the stage's bucket as setup lays it out, fetching each\n"
                   "object once into the cache directory.")
    group.add_argument("--since", metavar="DURATION", type=_duration,
                       help="only records from the last DURATION: 90m, 24h, 7d")
    group.add_argument("--from", dest="start", metavar="TIME", type=_time,
                       help="only records from TIME on: 2026-12-01 or 2026-12-01T06:00 (UTC)")
    group.add_argument("--to", dest="end", metavar="TIME", type=_time_to,
                       help="only records before TIME (a date: up to the end of that day)")
    group.add_argument("--output-dir", metavar="DIR",
                       help="stage test: the output directory [DXTRACK_OUTPUT_DIR, else "
                            "./.dxtrack_output]")
    group.add_argument("--bucket", metavar="NAME",
                       help="dev, prod: the bucket (default dxtrack-STAGE-ACCOUNT, as setup)")
    group.add_argument("--prefix", metavar="FOLDER", default="",
                       help="dev, prod: the folder holding metric/ and error/ (default: the root)")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="dev, prod: the local cache [$XDG_CACHE_HOME/dxtrack, else "
                            "~/.cache/dxtrack]")
    _add_settings(parser, ("stage",), fallbacks or {}, only=(*SETUP_FLAGS, *flags))


def _duration(text: str) -> datetime.timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time(text: str, end: bool = False) -> datetime.datetime:
    try:
        return parse_time(text, end=end)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_to(text: str) -> datetime.datetime:
    return _time(text, end=True)


def _seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _need_duckdb() -> Any:
    from .query import need_duckdb

    try:
        return need_duckdb()
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def _window(args: argparse.Namespace) -> Window:
    if args.since is not None and (args.start or args.end):
        raise UsageError("give --since, or --from and --to, not both")
    if args.since is not None:
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        try:
            return Window(start=now - args.since)
        except OverflowError:  # longer ago than year 1: everything
            return Window()
    if args.start and args.end and args.start >= args.end:
        raise UsageError("--from must be before --to")
    return Window(args.start, args.end)


def _source_config(args: argparse.Namespace) -> Config:
    """The settings of ``query`` and ``show``, and flags that do not fit the stage refused."""
    options = {"context": f"dxtrack-{args.command}", "run_id": "-", **_given(args)}
    if args.output_dir is not None:
        options["output_dir"] = args.output_dir
    config = _config(options)
    local, remote = config.stage == "test", ("--bucket", "--prefix", "--cache-dir")
    given = [flag for flag in remote if getattr(args, flag[2:].replace("-", "_"))]
    if local and given:
        raise UsageError(f"{', '.join(given)}: stage 'test' reads local files (--output-dir); "
                         "these are for stages dev and prod")
    if not local and args.output_dir is not None:
        raise UsageError("--output-dir is for stage 'test'; dev and prod read their bucket")
    if args.bucket is not None and not BUCKET_NAME.fullmatch(args.bucket):
        raise UsageError(f"--bucket: {args.bucket!r} is not an S3 bucket name")
    return config


def _records(args: argparse.Namespace, config: Config, window: Window) -> Tuple[Any, Files]:
    """A DuckDB connection with the views over the stage's records in ``window``, and the
    files they read; a :class:`SourceError` if they cannot be fetched."""
    from .query import connect, torn, within

    if config.stage == "test":
        if not os.path.isdir(config.output_dir):
            raise SourceError(f"{os.path.abspath(config.output_dir)} is not a directory: "
                              "stage test's records are where output_dir says (--output-dir, "
                              "DXTRACK_OUTPUT_DIR, else ./.dxtrack_output)")
        files = local(os.fspath(config.output_dir))
        if not files.metric and not files.error:
            print(f"{PROG}: note: no records in {files.where}", file=sys.stderr, flush=True)
    else:
        cache = args.cache_dir or default_cache_dir()
        files = Bucket(config, cache_dir=cache, bucket=args.bucket, prefix=args.prefix).files(
            window)
        print(f"{PROG}: {files.where}: {files.objects:,} objects, {files.fetched:,} fetched "
              f"({files.fetched_bytes / 1e6:,.1f} MB), the rest from the cache {cache}",
              file=sys.stderr, flush=True)
    for path in torn([*files.metric, *files.error]):
        print(f"{PROG}: note: {path} ends in a cut-off line (a writer stopped in the middle "
              "of it); that line is left out", file=sys.stderr, flush=True)
    con = connect(files.metric, files.error)
    within(con, window.start, window.end)
    return con, files


def query(args: argparse.Namespace) -> int:
    from .results import from_duckdb, write

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not sql.strip():
        raise UsageError("the SQL is empty")
    config = _source_config(args)
    window = _window(args)
    if args.athena:
        if config.stage == "test":
            raise UsageError("--athena: stage 'test' has no Athena tables; it reads local files")
        if window != Window():
            raise UsageError("--athena runs the SQL as it is: filter on dt and timestamp in it "
                             "instead of --since, --from and --to")
        from .athena import AthenaError, run

        try:
            result = run(config, sql, output=args.athena_output, bucket=args.bucket,
                         workgroup=args.workgroup, timeout=args.athena_timeout)
        except AthenaError as exc:
            return _error(str(exc), 2 if exc.usage else 1)
    else:
        duckdb = _need_duckdb()
        try:
            con, _ = _records(args, config, window)
            result = from_duckdb(con, sql)
        except SourceError as exc:
            return _error(str(exc), 1)
        except duckdb.IOException as exc:  # a file cannot be read: not the query's fault
            return _error(_first_line(exc), 1)
        except duckdb.Error as exc:
            return _error(f"the query failed: {_first_line(exc)}", 2)
    write(result, args.format, sys.stdout)
    return 0


def show(args: argparse.Namespace) -> int:
    from .show import LISTED, find, id_prefix, render, summary

    try:
        prefix = id_prefix(args.id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = _source_config(args)
    window = _window(args)
    duckdb = _need_duckdb()
    try:
        con, files = _records(args, config, window)
        found = find(con, prefix)
    except SourceError as exc:
        return _error(str(exc), 1)
    except duckdb.Error as exc:
        return _error(_first_line(exc), 1)
    if not found:
        within = " in that time" if window != Window() else ""
        return _error(f"no record has an id starting with {prefix} in {files.where}{within}", 1)
    if len(found) > 1:
        for record in found[:LISTED]:
            print(summary(record))
        more = "more than " if len(found) > LISTED else ""
        return _error(f"{more}{min(len(found), LISTED)} records have an id starting with "
                      f"{prefix} (listed above); give more of the id", 1)
    print(render(found[0]))
    return 0


def report(args: argparse.Namespace) -> int:
    from . import report as reports

    if args.html:
        from .report_html import need_matplotlib

        try:
            need_matplotlib()  # before any work: without it, one line saying how to install it
        except ImportError as exc:
            return _error(str(exc), 1)
    given = _given(args)
    from_environment = _from_environment(given)
    context = given.get("context", from_environment.get("context"))
    run_id = given.get("run_id", from_environment.get("run_id"))
    config = _source_config(args)
    window = _window(args)
    duckdb = _need_duckdb()
    try:
        con, _ = _records(args, config, window)
        result = reports.build(con, context=context, run_id=run_id, drop=args.drop,
                               by=args.by, runs=args.runs)
    except (SourceError, reports.NothingToReport) as exc:
        return _error(str(exc), 1)
    except duckdb.Error as exc:
        return _error(_first_line(exc), 1)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.html:
        from .report_html import write

        try:
            write(result, args.html)
        except OSError as exc:
            return _error(f"--html: cannot write {args.html}: {exc.strerror or exc}", 1)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.text(), end="")
    if args.html:
        print(f"{PROG} report: the HTML page is {os.path.abspath(args.html)}", file=sys.stderr)
    return 1 if result.failed else 0


def _drop(text: str) -> float:
    from .report import parse_drop

    try:
        return parse_drop(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _keys(text: str) -> Tuple[str, ...]:
    keys = tuple(key.strip() for key in text.split(","))
    if not all(keys):
        raise argparse.ArgumentTypeError(f"expected KEY[,KEY...], got {text!r}")
    return keys


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


