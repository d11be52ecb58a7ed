"""The ``dxtrack`` command: ``metric`` from a shell job, ``setup`` and ``check`` of a stage,
``replay`` of its disk spool, ``query``, ``show`` and ``report`` of its records, ``demo``.

Settings come from flags and the ``DXTRACK_<OPTION>`` variables, as ``configure()`` reads them;
a problem is one line on standard error with exit status 1 or 2 (see docs/command-line.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

from ._version import __version__
from .check import Report, check_aws, check_output, check_spool, checks
from .config import DEFAULT_REGION, OPTIONS, Config, Flag, settings_from_kwargs
from .env import environment_defaults, variable_for
from .exceptions import ConfigurationError

__all__ = ["main"]

PROG = "dxtrack"
#: The metric ``dxtrack check --send-test`` records, and its context unless one is given.
CHECK_METRIC, CHECK_CONTEXT = "dxtrack.check", "dxtrack-check"
#: configure() options the subcommands take as flags (Config defines them), and their flags.
FLAGS: Dict[str, Flag] = {name: option.flag for name, option in OPTIONS.items() if option.flag}
#: The options each subcommand needs, as a flag or a variable.
REQUIRED = {"metric": ("stage", "context", "run_id"), "check": ("stage",), "setup": ("stage",),
            "replay": ("stage",), "query": ("stage",), "show": ("stage",), "report": ("stage",)}
#: The settings ``dxtrack setup`` takes as flags: where, and with which credentials.
SETUP_FLAGS = ("stage", "profile_name", "region_name", "endpoint_url")
#: The default delivery mode, whatever the environment says: each record is waited for.
SYNCHRONOUS = {"use_async_requests": False, "buffer_metrics": False}

#: What S3 accepts as a bucket name (leaving out the rarer rules S3 itself will report).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_Raw = argparse.RawDescriptionHelpFormatter

_META_HELP = """\
Each --meta value is typed:
  a JSON number, true, false or null keeps that type   pages=12 ratio=0.5 dry_run=true
  a JSON string in double quotes is the text inside    build='"42"' gives the text 42
  anything else is kept as text                        shop=example zip=007
A key given twice takes its last value.
"""

_METRIC_EXAMPLES = """\
examples:
  export DXTRACK_STAGE=prod DXTRACK_CONTEXT=nightly-export DXTRACK_RUN_ID="$(date -u +%FT%TZ)"
  dxtrack metric export.rows 120345 --meta table=orders --meta dry_run=false
  dxtrack metric backup.seconds "$SECONDS" --stage dev --context backup --run-id "$RUN_ID"
"""


class UsageError(Exception):
    """Bad usage or bad settings: one line on standard error, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, reporting bad usage in one line instead of the usage text and a line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``dxtrack`` and its subcommands."""
    parser = _Parser(
        prog=PROG, formatter_class=_Raw,
        description="Record metrics from shell jobs; set up and check a stage in AWS; report\n"
                    "on a job's runs.",
        epilog="Settings not given as flags come from the DXTRACK_<OPTION> variables that\n"
               "configure() reads; AWS credentials from boto3's usual chain.\n"
               "exit status: 0 ok, 1 a failed check or a metric not delivered, 2 bad usage",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    metric = commands.add_parser(
        "metric", formatter_class=_Raw, help="record one metric and wait until it is delivered",
        description="Record one metric in the default (synchronous) mode, wait until it is\n"
                    "delivered, then exit: 0 once it is, 1 if it is not. The wait is at most\n"
                    "sync_timeout + shutdown_timeout seconds (10 + 5 unless DXTRACK_SYNC_TIMEOUT\n"
                    "or DXTRACK_SHUTDOWN_TIMEOUT say otherwise).",
        epilog=_META_HELP + "\n" + _METRIC_EXAMPLES,
    )
    metric.add_argument("name", metavar="NAME", help="metric name, dotted by convention")
    metric.add_argument("value", metavar="VALUE", type=_number,
                        help="a finite number (use '--' before a value such as -1e3)")
    metric.add_argument("--meta", metavar="KEY=VALUE", action="append", type=_meta_item,
                        default=[], help="metadata of the record; repeatable (typed as below)")
    _add_settings(metric, REQUIRED["metric"], {})

    check = commands.add_parser(
        "check", formatter_class=_Raw,
        help="check credentials and delivery streams (stage test: the output directory)",
        description="Check that AWS credentials resolve and that both delivery streams exist\n"
                    "and are ACTIVE, with the client dxtrack itself sends with (stage test: that\n"
                    "the output directory is writable). One line per check; exit 1 if any failed.",
    )
    check.add_argument("--send-test", action="store_true",
                       help=f"also record one metric {CHECK_METRIC!r} and wait for its delivery")
    _add_settings(check, REQUIRED["check"],
                  {"context": CHECK_CONTEXT, "run_id": "the UTC time"})  # as in _check()

    setup = commands.add_parser(
        "setup", formatter_class=_Raw,
        help="create a stage's bucket, role, delivery streams and Athena tables",
        description="Create what a stage needs in the AWS account and region of boto3's chain:\n"
                    "an S3 bucket, the role Firehose writes with, both delivery streams and\n"
                    "the Glue tables Athena queries. A second run changes nothing; a resource\n"
                    "that differs is reported and left alone unless --update is given. Exit 1\n"
                    "if one differs or a step fails. See docs/landing-zone.md.",
    )
    setup.add_argument("--bucket", metavar="NAME",
                       help="the S3 bucket (default dxtrack-STAGE-ACCOUNT)")
    setup.add_argument("--update", action="store_true",
                       help="change resources that differ from what setup makes")
    setup.add_argument("--dry-run", action="store_true",
                       help="print what would be created or changed, and change nothing")
    setup.add_argument("--template", action="store_true",
                       help="print the same resources as a CloudFormation template, and exit")
    setup.add_argument("--print-policy", choices=("producer", "setup"),
                       help="print the IAM policy a producer, or setup itself, needs, and exit")
    _add_settings(setup, REQUIRED["setup"], {}, only=(*SETUP_FLAGS, "compression"))

    replay = commands.add_parser(
        "replay", formatter_class=_Raw, help="send what the disk spool holds, now",
        description="Send the records a stage's disk spool holds (records that could not be\n"
                    "delivered in time), oldest first, then exit: 0 once the spool is empty,\n"
                    "1 if records are left (not delivered, or held by a running job).\n"
                    "See docs/spool.md.",
    )
    replay.add_argument("--spool-dir", metavar="DIR",
                        help="the spool directory [DXTRACK_SPOOL_DIR]")
    _add_settings(replay, REQUIRED["replay"], {}, only=SETUP_FLAGS)

    from .cli_records import add_commands

    add_commands(commands)

    commands.add_parser("demo", add_help=False,  # every argument, --help included, goes to it
                        help="run the end-to-end demo (stage dev needs moto); "
                             "'dxtrack demo --help' for its options")
    return parser


def _add_settings(parser: argparse.ArgumentParser, required: Sequence[str],
                  fallbacks: Dict[str, str], only: Sequence[str] = ()) -> None:
    group = parser.add_argument_group(
        "settings",
        "A flag left out comes from its variable (in brackets), as every other option of\n"
        "configure() comes from DXTRACK_<OPTION>. AWS credentials come from boto3's chain:\n"
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, the AWS files or a role.",
    )
    for option, flag in FLAGS.items():
        if only and option not in only:
            continue
        fallback = fallbacks.get(option, flag.fallback)
        source = variable_for(option) + (f", else {fallback}" if fallback else "")
        needed = "; required" if option in required else ""
        group.add_argument(flag.name, dest=option, metavar=flag.metavar,
                           choices=flag.choices or None, help=f"{flag.help}{needed} [{source}]")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _meta_item(text: str) -> Tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, typed_value(value)


def typed_value(text: str) -> Any:
    """A ``--meta`` value, typed as docs/command-line.md says: JSON scalars that survive the
    trip are decoded, anything else is kept as text."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return text


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity stay text


def _given(args: argparse.Namespace) -> Dict[str, Any]:
    """The options given as flags; bad usage if a required one is set nowhere."""
    given = {o: value for o in FLAGS if (value := getattr(args, o, None)) is not None}
    missing = [o for o in REQUIRED[args.command]
               if o not in given and o not in _from_environment(given)]
    if missing:
        needs = ", ".join(f"{FLAGS[o].name} (or {variable_for(o)})" for o in missing)
        raise UsageError(f"{args.command} needs {needs}")
    return given


def _from_environment(options: Dict[str, Any]) -> Dict[str, Any]:
    """What the ``DXTRACK_*`` variables would add to ``options`` (configure()'s own rules)."""
    try:
        return environment_defaults(options)[0]
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def _config(options: Dict[str, Any]) -> Config:
    """The settings ``configure(**options)`` would use; bad ones are bad usage."""
    try:
        return settings_from_kwargs(dict(options), os.environ)
    except ConfigurationError as exc:
        raise _bad_setting(exc, options) from None


def _bad_setting(exc: ConfigurationError, options: Dict[str, Any]) -> UsageError:
    """Bad usage naming the flag that gave the setting, if a flag did."""
    flag = FLAGS.get(exc.option or "")
    return UsageError(f"{flag.name}: {exc}" if flag and exc.option in options else str(exc))


def _destination(config: Config, sink: Any) -> str:
    if config.stage == "test":
        if config.test_output == "print":
            return "standard output"
        return os.path.join(os.path.abspath(os.fspath(config.output_dir)), "metric.jsonl")
    region = getattr(sink, "region", None) or config.region_name or DEFAULT_REGION
    return f"delivery stream {config.stream_name('metric')!r} in region {region!r}"


def _send_one(options: Dict[str, Any], name: str, value: float,
              metadata: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """Record one metric through a client of its own and wait for it: returns where it went
    and, unless it was delivered, why not (one line)."""
    from .client import DXTrack

    client = DXTrack()
    try:
        config = client.configure(**options)
    except ConfigurationError as exc:  # what only configure() checks: a profile that is not there
        raise _bad_setting(exc, options) from None
    sink = client.sink
    try:
        client.metric(name, value, metadata=metadata)
    except (TypeError, ValueError) as exc:  # a name or metadata the record builder refuses
        client.close(timeout=0.0)
        raise UsageError(str(exc)) from None
    delivered = client.flush_metrics_buffer(timeout=config.shutdown_timeout)
    where = _destination(config, sink)  # after sending: the sink knows its region by now
    client.close(timeout=0.0)  # the flush has waited already
    if delivered:
        return where, None
    stats = client.stats()
    if stats["failed"]:
        what = "could not be delivered"
    elif stats["pending"]:
        waited = config.sync_timeout + config.shutdown_timeout
        what = f"was not delivered within {waited:g} s"
    else:
        what = "was not delivered"
    return where, f"metric {name!r} {what} to {where}; see dxtrack's messages above"


def _metric(args: argparse.Namespace) -> int:
    options = {**_given(args), **SYNCHRONOUS}
    _config(options)  # bad usage, found before anything starts
    _, problem = _send_one(options, args.name, args.value, dict(args.meta))
    return _error(problem, 1) if problem else 0


def _check(args: argparse.Namespace) -> int:
    options = {**_given(args), **SYNCHRONOUS}
    defaults = {"context": CHECK_CONTEXT,
                "run_id": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from_environment = _from_environment(options)  # defaults for the --send-test record only
    options = {**{o: d for o, d in defaults.items() if o not in from_environment}, **options}
    config = _config(options)
    report = Report()
    if config.stage == "test":
        report.say("dxtrack check: stage 'test' writes local files; nothing in AWS is involved")
        check_output(config, report)
    else:
        check_aws(config, report)
    if config.spool_dir is not None:
        check_spool(config, report)
    if args.send_test:
        if report.failed:
            report.skip("test record", "an earlier check failed")
        else:
            where, problem = _send_one(options, CHECK_METRIC, 1.0, {"source": "dxtrack check"})
            if problem:
                report.fail("test record", problem)
            else:
                report.ok("test record", f"metric {CHECK_METRIC!r} delivered to {where}")
    if report.failed:
        return _error(f"{report.failed} of {checks(report.passed + report.failed)} failed", 1)
    report.say(f"{checks(report.passed)} passed")
    return 0


def _setup(args: argparse.Namespace) -> int:
    from .landing import Landing, template
    from .provision import Setup, SetupError

    options = {"context": "dxtrack-setup", "run_id": "-", **_given(args)}
    config = _config(options)
    if config.stage == "test":
        raise UsageError("stage 'test' writes local files and needs nothing in AWS; "
                         "setup is for stages dev and prod")
    if args.bucket is not None and not BUCKET_NAME.fullmatch(args.bucket):
        raise UsageError(f"--bucket: {args.bucket!r} is not an S3 bucket name (3 to 63 "
                         "lowercase letters, digits, dots and hyphens)")
    if args.template:
        print(json.dumps(template(config, args.bucket), indent=2))
        return 0
    if args.print_policy:
        landing = Landing.of(config, *_account_and_region(config), bucket=args.bucket)
        policy = landing.producer_policy() if args.print_policy == "producer" else \
            landing.setup_policy()
        print(json.dumps(policy, indent=2))
        return 0
    try:
        setup = Setup(config, bucket=args.bucket, update=args.update, dry_run=args.dry_run)
        left = setup.run()
    except SetupError as exc:
        return _error(str(exc), 1)
    if not args.dry_run and not left:
        settings = setup.settings()
        arguments = ", ".join(f"{name}={value!r}" for name, value in settings.items())
        variables = " ".join(f"{variable_for(name)}={value}" for name, value in settings.items())
        print(f"Send to it with dxtrack.configure({arguments}, context=..., run_id=...)\n"
              f"or with the variables: {variables}")
    if left:
        what = "1 resource differs" if left == 1 else f"{left} resources differ"
        return _error(f"{what} from what setup makes (see above; --update changes them)", 1)
    return 0


def _account_and_region(config: Config) -> Tuple[str, str]:
    """The account (``*`` without credentials, with a note) and region a policy names: the
    ones setup would use."""
    from .provision import Setup, SetupError

    try:
        setup = Setup(config, say=lambda line: None)
        return setup.landing.account, setup.region
    except SetupError as exc:
        print(f"{PROG}: note: account left as '*' ({exc})", file=sys.stderr, flush=True)
        import boto3

        return "*", config.region_name or boto3.session.Session().region_name or DEFAULT_REGION


def _replay(args: argparse.Namespace) -> int:
    from .sinks import sink_for
    from .spool import Spool, replay_all

    options = {"context": "dxtrack-replay", "run_id": "-", **_given(args)}
    if args.spool_dir:
        options["spool_dir"] = args.spool_dir
    config = _config(options)
    if config.spool_dir is None:
        raise UsageError("replay needs --spool-dir (or DXTRACK_SPOOL_DIR)")
    spool = Spool(config.spool_dir, config.stage, config.spool_max_bytes)
    sink = sink_for(config)

    def send(stream: str, lines: List[bytes]) -> Tuple[List[bytes], int]:
        """One segment: retried, as the library does, until ``retry_deadline`` passes;
        returns the lines to keep, and how many can never be delivered."""
        pending: List[bytes] = lines
        lost = 0
        deadline = time.monotonic() + config.retry_deadline
        for attempt in itertools.count():
            result = sink.send(stream, pending)
            if result.error:
                print(f"  {result.error}", flush=True)
            lost += result.failed - len(result.refused)
            pending = [*result.retry, *result.refused]
            pause = min(8.0, 0.5 * 2 ** attempt)
            if not result.retry or time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
        return pending, lost

    try:
        for claim, delivered in replay_all(spool, send):
            print(f"{os.path.basename(claim.path)}: {delivered:,} of {len(claim.lines):,} "
                  "records delivered", flush=True)
    except OSError as exc:  # the spool cannot be read or changed
        return _error(f"the spool {spool.path}: {exc}", 1)
    finally:
        sink.close()
    segments, records, _, _ = spool.contents()
    if segments:
        return _error(f"{records:,} records in {segments:,} segments are still in the spool "
                      f"{spool.path} (not delivered, or held by a running job)", 1)
    print(f"the spool {spool.path} is empty ({spool.counts['replayed']:,} records delivered "
          "now)")
    return 0


def _demo(argv: List[str]) -> int:
    if not {"-h", "--help"} & set(argv) and _demo_stage(argv) != "test":
        try:
            importlib.import_module("moto.server")
        except ImportError:
            return _error("the demo needs moto: pip install 'dxtrack[demo]' (or run it with "
                          "--stage test, which writes local files)", 1)
    from . import demo

    return demo.main(argv, prog=f"{PROG} demo")


def _demo_stage(argv: List[str]) -> str:
    parser = _Parser(prog=f"{PROG} demo", add_help=False)
    parser.add_argument("--stage", default="dev")
    known, _ = parser.parse_known_args(argv)
    return str(known.stage)


def _error(message: str, status: int) -> int:
    """Report a problem in one line on standard error; returns the exit status."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``dxtrack`` command; returns its exit status."""
    # The command owns its process, so it may configure logging: dxtrack's warnings on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = build_parser().parse_known_args(arguments)
        if args.command == "demo":
            return _demo(rest)
        if args.command is None:
            raise UsageError("a command is required: metric, check, setup, replay, query, show, "
                             "report "
                             f"or demo (see '{PROG} --help')")
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)} "
                             f"(see '{PROG} {args.command} --help')")
        from .cli_records import query, report, show

        run = {"metric": _metric, "check": _check, "setup": _setup, "replay": _replay,
               "query": query, "show": show, "report": report}
        return run[args.command](args)
    except UsageError as exc:
        return _error(str(exc), 2)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except BrokenPipeError:  # `dxtrack query ... | head`: the reader has had enough
        # Python would also fail flushing stdout at exit: point it at /dev/null first.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
