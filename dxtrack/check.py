"""What ``dxtrack check`` checks: the output directory, or credentials and delivery streams
(ACTIVE, and delivering where and as ``dxtrack setup`` makes them).

Each check reports one line through a :class:`Report`; the command line
(:mod:`dxtrack.cli`) decides the exit status from its counts.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

from .config import Config
from .env import variable_for

__all__ = ["Report", "check_aws", "check_output", "check_spool", "checks"]

#: What ``check`` compares with ``setup``'s definition of a stream's destination: where the
#: objects land and how they are compressed (bucket, role and buffering are the user's call).
LAYOUT = ("Prefix", "ErrorOutputPrefix", "CompressionFormat", "FileExtension")


class Report:
    """The lines of ``dxtrack check``, one per check, on standard output."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def say(self, text: str) -> None:
        print(text, flush=True)

    def ok(self, label: str, detail: str) -> None:
        self.passed += 1
        self.say(f"{label}: ok ({detail})")

    def fail(self, label: str, reason: str) -> None:
        self.failed += 1
        self.say(f"{label}: FAILED: {reason}")

    def skip(self, label: str, why: str) -> None:
        self.say(f"{label}: skipped ({why})")


def checks(count: int) -> str:
    return f"{count} check" if count == 1 else f"{count} checks"


def check_output(config: Config, report: Report) -> None:
    if config.test_output == "print":
        report.ok("output", "records are printed on standard output")
        return
    directory = os.path.abspath(os.fspath(config.output_dir))
    label = f"output directory {directory}"
    advice = f"set {variable_for('output_dir')} to a directory you can write to"
    existing = directory  # created on the first record: look at what is there now
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        report.fail(label, f"{existing} is not a directory; {advice}")
        return
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        for stream in ("metric", "error"):
            path = os.path.join(directory, f"{stream}.jsonl")
            if os.path.exists(path):
                with open(path, "ab"):  # appending nothing changes nothing
                    pass
    except OSError as exc:
        report.fail(label, f"cannot write there: {exc}; {advice}")
        return
    if existing == directory:
        report.ok(label, "writable")
    else:
        report.ok(label, f"not there yet; it will be created in {existing}, which is writable")


def check_spool(config: Config, report: Report) -> None:
    """The spool: can it be written, and what does it hold (docs/spool.md)."""
    import time

    from .spool import Spool

    spool = Spool(config.spool_dir or ".", config.stage, config.spool_max_bytes)
    label = f"spool {spool.path}"
    try:
        spool.make_directory()
        with tempfile.TemporaryFile(dir=spool.path):
            pass
    except OSError as exc:
        report.fail(label, f"cannot write there: {exc}; set {variable_for('spool_dir')} to a "
                    "directory on a persistent volume you can write to")
        return
    segments, records, size, oldest = spool.contents()
    if not segments:
        report.ok(label, f"writable, empty; at most {config.spool_max_bytes:,} bytes")
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(oldest or 0))
    report.ok(label, f"holds {records:,} records in {segments:,} segment"
              f"{'' if segments == 1 else 's'} ({size:,} of at most "
              f"{config.spool_max_bytes:,} bytes), the oldest from {since}; a client with this "
              f"spool sends them once it delivers, or 'dxtrack replay --stage {config.stage}' "
              "now")


def check_aws(config: Config, report: Report) -> None:
    import botocore.exceptions

    from .sinks.firehose import connect

    streams = {kind: f"{kind} stream {config.stream_name(kind)!r}" for kind in ("metric", "error")}
    endpoint = f"endpoint {config.endpoint_url}" if config.endpoint_url else "AWS's endpoint"
    try:
        connection = connect(config)  # what the library sends with; it resolves credentials
    except botocore.exceptions.BotoCoreError as exc:  # a missing profile, a broken chain
        report.say(f"dxtrack check: stage {config.stage!r}, {endpoint}")
        report.fail("credentials", f"{type(exc).__name__}: {exc}; check --profile, "
                    "DXTRACK_PROFILE_NAME, AWS_PROFILE and the AWS config files")
        for label in streams.values():
            report.skip(label, "needs credentials")
        return
    where = f"in region {connection.region!r}"
    report.say(f"dxtrack check: stage {config.stage!r}, region {connection.region!r}, {endpoint}")
    credentials = connection.session.get_credentials()
    if credentials is None:
        report.fail("credentials", "none found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "or name a profile with --profile, DXTRACK_PROFILE_NAME or AWS_PROFILE, "
                    "or run where an instance or task role is available")
        for label in streams.values():
            report.skip(label, "needs credentials")
        return
    report.ok("credentials", f"found by boto3: {credentials.method}")
    for kind, label in streams.items():
        name = config.stream_name(kind)
        try:
            answer = connection.client.describe_delivery_stream(DeliveryStreamName=name)
        except botocore.exceptions.ClientError as exc:
            report.fail(label, _stream_problem(exc, kind, where, config.stage))
            continue
        except botocore.exceptions.BotoCoreError as exc:  # unreachable, timed out
            report.fail(label, f"cannot reach Firehose {where} at {endpoint} "
                        f"({type(exc).__name__}: {exc}); check the network, --region and "
                        "--endpoint-url")
            continue
        description = answer["DeliveryStreamDescription"]
        status = description.get("DeliveryStreamStatus")
        if status != "ACTIVE":
            report.fail(label, f"is {status} {where}, not ACTIVE: records are accepted only "
                        "by an ACTIVE stream; look at it in the Firehose console")
        elif description.get("DeliveryStreamType") == "KinesisStreamAsSource":
            report.fail(label, f"reads from a Kinesis data stream {where}; dxtrack puts records "
                        "itself and needs a Direct PUT stream")
        else:
            _compare_layout(config, kind, description, label, where, report)


def _compare_layout(config: Config, kind: str, description: Dict[str, Any], label: str,
                    where: str, report: Report) -> None:
    """Whether an ACTIVE stream delivers where, and as, ``dxtrack setup`` makes it."""
    from .landing import Landing, differences

    first = (description.get("Destinations") or [{}])[0]
    have = first.get("ExtendedS3DestinationDescription")
    if have is None:
        report.fail(label, f"ACTIVE {where}, but it does not deliver to S3 as 'dxtrack setup' "
                    "makes it: the dxtrack tables will not see its records")
        return
    want = Landing.of(config, "*", "*").destination(kind)
    problems = differences({key: want[key] for key in LAYOUT}, have)
    bucket = str(have.get("BucketARN", "")).rpartition(":")[2]
    compressed = have.get("CompressionFormat")
    if len(problems) == 1 and compressed != want["CompressionFormat"] and \
            compressed in ("GZIP", "UNCOMPRESSED"):  # the one difference: say what it does
        report.fail(label, _compression_mismatch(config, compressed, where))
    elif problems:
        report.fail(label, f"ACTIVE {where}, but {'; '.join(problems)}: the dxtrack tables "
                    f"look elsewhere; 'dxtrack setup --stage {config.stage} --update' fixes it")
    else:
        report.ok(label, f"ACTIVE {where}, delivering to s3://{bucket}/{have['Prefix']}")


def _compression_mismatch(config: Config, compressed: str, where: str) -> str:
    """The advice for a stream that compresses when the client does, or the other way."""
    variable = variable_for("compression")
    if config.compression == "gzip":
        return (f"ACTIVE {where}, but it gzips what the client has gzipped already "
                f"({variable}=gzip): its objects are compressed twice and the dxtrack tables "
                f"cannot read them; 'dxtrack setup --stage {config.stage} --compression gzip "
                f"--update' makes it store them as they are, or drop {variable}")
    return (f"ACTIVE {where}, made for clients that gzip ('dxtrack setup --compression gzip': "
            f"it stores records as they come, {compressed}), but this client sends plain lines, "
            f"which would land in its .jsonl.gz objects unreadable; set {variable}=gzip (or "
            "--compression gzip) for every job and command that sends to it. Only if none of "
            f"them gzips, 'dxtrack setup --stage {config.stage} --update' makes the stream "
            "compress instead")


def _stream_problem(exc: Any, kind: str, where: str, stage: str) -> str:
    from .sinks.firehose import ADVICE

    code = exc.response.get("Error", {}).get("Code", "")
    if code == "ResourceNotFoundException":
        return (f"does not exist {where} for these credentials' account; 'dxtrack setup "
                f"--stage {stage}' creates it, or name yours with "
                f"{variable_for(kind + '_stream')}, or check --region")
    if code == "AccessDeniedException":
        return (f"these credentials may not call firehose:DescribeDeliveryStream on it {where}; "
                "dxtrack itself needs only firehose:PutRecordBatch, which --send-test tries")
    advice = ADVICE.get(code, "")
    return f"DescribeDeliveryStream {where} failed: {exc}" + (f"; {advice}" if advice else "")
