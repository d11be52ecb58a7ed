"""The ``dxtrack`` command (issue 7), run as a real process.

Every test starts the command as a child process, ``python -m dxtrack`` or the
installed console script, with an environment built here: the conftest's
autouse fixture has cleared ``AWS_*`` and ``DXTRACK_*`` from this process, and
the child gets only what a test gives it (empty AWS config files, no instance
metadata), so nothing real is ever read or reached. AWS stages talk to the
moto server of ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, List, NamedTuple

import orjson
import pytest

from dxtrack import __version__
from dxtrack.cli import typed_value
from dxtrack.landing import DAY

REGION = "eu-west-1"
BUCKET = "dxtrack-landing"  # as conftest creates it
#: The console script ``pip install`` puts next to the interpreter.
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "dxtrack")
#: Flags that satisfy ``metric``'s required settings for stage dev.
DEV = ["--stage", "dev", "--context", "cli-tests", "--run-id", "run-1"]


class Result(NamedTuple):
    status: int
    out: str
    err: str

    def error_line(self) -> str:
        """The command's own one-line error: exactly one, and no traceback anywhere."""
        assert "Traceback" not in self.err + self.out
        lines = [line for line in self.err.splitlines() if line.startswith("dxtrack: error: ")]
        assert len(lines) == 1, self.err
        return lines[0]


def dxtrack(*args: str, env: Dict[str, str], cwd: Any, script: bool = False) -> Result:
    command = [CONSOLE_SCRIPT] if script else [sys.executable, "-m", "dxtrack"]
    done = subprocess.run(
        command + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def env(tmp_path: Any) -> Dict[str, str]:
    """A child environment with no AWS credentials, settings or configuration at all."""
    (tmp_path / "aws-config").write_text("")
    (tmp_path / "aws-credentials").write_text("")
    child = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DXTRACK_"))}
    child.update(
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION=REGION,
    )
    return child


@pytest.fixture
def aws_env(env: Dict[str, str], landing: Any) -> Dict[str, str]:
    """``env`` plus credentials and the moto server's URL, as a job would set them."""
    return dict(
        env, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        DXTRACK_ENDPOINT_URL=landing.url,
    )


class TestMetric:
    """``dxtrack metric`` records one metric, waits for it, and says if it was not delivered."""

    def test_lands_once_with_typed_metadata(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        child = dict(aws_env, DXTRACK_RUN_ID="run-from-env",
                     DXTRACK_DEFAULT_METADATA='{"host": "ci-7"}',
                     # The command waits in the default mode whatever these say; with no
                     # time left for a final flush, returning early would show as exit 1.
                     DXTRACK_USE_ASYNC_REQUESTS="true", DXTRACK_SHUTDOWN_TIMEOUT="0")
        result = dxtrack(
            "metric", "deploy.seconds", "12.5", "--stage", "dev", "--context", "deploy",
            "--meta", "pages=12", "--meta", "ratio=0.5", "--meta", "dry_run=true",
            "--meta", "owner=null", "--meta", "zip=007", "--meta", 'build="42"',
            "--meta", "shop=first", "--meta", "shop=second", "--meta", "query=a=b",
            "--meta", "note=",
            env=child, cwd=tmp_path,
        )
        assert (result.status, result.out, result.err) == (0, "", "")
        [record] = landing.records("metric")
        assert record["metric_name"] == "deploy.seconds"
        assert record["value"] == 12.5
        assert (record["stage"], record["context"], record["run_id"]) == (
            "dev", "deploy", "run-from-env"
        )
        assert record["metadata"] == {
            "host": "ci-7", "pages": 12, "ratio": 0.5, "dry_run": True, "owner": None,
            "zip": "007", "build": "42", "shop": "second", "query": "a=b", "note": "",
        }
        assert landing.lines("error") == []

    def test_a_stream_that_does_not_exist_fails_with_one_line(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        result = dxtrack("metric", "rows", "3", "--stage", "prod", "--context", "c",
                         "--run-id", "r", env=aws_env, cwd=tmp_path)
        assert result.status == 1
        line = result.error_line()
        assert "'rows'" in line and "not be delivered" in line
        assert "'dxtrack-metric-input-prod'" in line and f"'{REGION}'" in line
        # dxtrack's own log line, with the service's reason, stays visible
        assert "ERROR dxtrack: dxtrack could not deliver 1 metric (" in result.err
        assert "ResourceNotFoundException" in result.err
        assert landing.lines("metric") == []

    def test_stage_test_appends_to_the_local_file(
        self, env: Dict[str, str], tmp_path: Any
    ) -> None:
        """Settings from the environment alone, through the installed console script."""
        out = tmp_path / "out"
        child = dict(env, DXTRACK_STAGE="test", DXTRACK_CONTEXT="backup",
                     DXTRACK_RUN_ID="r-9", DXTRACK_OUTPUT_DIR=str(out))
        for value in ("1", "-2"):
            result = dxtrack("metric", "backup.files", value, "--meta", "disk=sda",
                             env=child, cwd=tmp_path, script=True)
            assert (result.status, result.err) == (0, "")
        records = [orjson.loads(line) for line in (out / "metric.jsonl").read_bytes().splitlines()]
        assert [(r["metric_name"], r["value"], r["metadata"]) for r in records] == [
            ("backup.files", 1.0, {"disk": "sda"}), ("backup.files", -2.0, {"disk": "sda"}),
        ]
        assert {(r["stage"], r["context"], r["run_id"]) for r in records} == {
            ("test", "backup", "r-9")
        }


class TestMetaValues:
    """How a ``--meta`` value is typed (the README's rule), for the cases a shell produces."""

    @pytest.mark.parametrize(("text", "value"), [
        ("12", 12), ("-3", -3), ("0.25", 0.25), ("1e3", 1000.0), ("true", True),
        ("false", False), ("null", None), ('"12"', "12"), ('"true"', "true"),
        ("example", "example"), ("007", "007"), ("", ""), ("NaN", "NaN"),
        ("Infinity", "Infinity"), ("1e400", "1e400"), ("[1, 2]", "[1, 2]"),
        ('{"a": 1}', '{"a": 1}'), ("123456789012345678901234567890",
                                   "123456789012345678901234567890"),
        ("True", "True"), ("'quoted'", "'quoted'"),
    ])
    def test_typed_value(self, text: str, value: Any) -> None:
        assert typed_value(text) == value
        assert type(typed_value(text)) is type(value)


BAD_USAGE: List[Any] = [
    pytest.param(["metric", "rows", "twelve", *DEV], {}, ["argument VALUE", "'twelve'"],
                 id="non-numeric-value"),
    pytest.param(["metric", "rows", "inf", *DEV], {}, ["argument VALUE", "'inf'"],
                 id="infinite-value"),
    pytest.param(["metric", "rows", "1", "--meta", "shop", *DEV], {}, ["KEY=VALUE", "'shop'"],
                 id="meta-without-equals"),
    pytest.param(["metric", "rows", "1", "--meta", "=x", *DEV], {}, ["KEY=VALUE", "'=x'"],
                 id="meta-without-key"),
    pytest.param(["metric", "rows", "1", "--context", "c", "--run-id", "r"], {},
                 ["--stage", "DXTRACK_STAGE"], id="missing-stage"),
    pytest.param(["metric", "rows", "1", "--stage", "dev"], {},
                 ["--context", "DXTRACK_CONTEXT", "--run-id", "DXTRACK_RUN_ID"],
                 id="missing-context-and-run-id"),
    pytest.param(["metric", "rows", "1", "--context", "c", "--run-id", "r"],
                 {"DXTRACK_STAGE": "staging"}, ["DXTRACK_STAGE", "'staging'"],
                 id="unknown-stage-from-environment"),
    pytest.param(["metric", "rows", "1", *DEV[:2], "--context", " ", "--run-id", "r"], {},
                 ["--context", "non-empty"], id="blank-context-flag"),
    pytest.param(["metric", "rows", "1", *DEV], {"DXTRACK_SYNC_TIMEOUT": "soon"},
                 ["DXTRACK_SYNC_TIMEOUT", "'soon'"], id="bad-variable"),
    pytest.param(["metric", "", "1", *DEV], {}, ["metric name"], id="empty-name"),
    pytest.param(["metric", "rows", "1", *DEV], {"DXTRACK_ENDPOINT_URL": "localhost 4566"},
                 ["DXTRACK_ENDPOINT_URL", "'localhost 4566'", "must be a URL"],
                 id="malformed-endpoint-url"),
    pytest.param(["metric", "rows", "1", *DEV, "--profile", "nosuch"], {},
                 ["--profile", "'nosuch'", "is not"], id="profile-that-does-not-exist"),
    pytest.param(["metric", "rows", "1", *DEV], {"DXTRACK_PROFILE_NAME": "nosuch"},
                 ["DXTRACK_PROFILE_NAME", "'nosuch'"], id="profile-from-environment"),
    pytest.param(["check", "--stage", "prod", "--region", "eu west 1"], {},
                 ["--region", "'eu west 1'"], id="malformed-region"),
    pytest.param(["metric", "rows", "1", *DEV, "surplus"], {}, ["unrecognized", "surplus"],
                 id="extra-argument"),
    pytest.param(["check"], {}, ["--stage", "DXTRACK_STAGE"], id="check-missing-stage"),
    pytest.param(["frobnicate"], {}, ["invalid choice", "'frobnicate'"],
                 id="unknown-subcommand"),
    pytest.param([], {}, ["command is required"], id="no-subcommand"),
]


class TestBadUsage:
    """Bad usage and bad settings: exit 2, one line on stderr, no traceback, nothing sent."""

    @pytest.mark.parametrize(("args", "variables", "fragments"), BAD_USAGE)
    def test_exit_2_with_one_line(
        self, args: List[str], variables: Dict[str, str], fragments: List[str],
        env: Dict[str, str], tmp_path: Any,
    ) -> None:
        result = dxtrack(*args, env=dict(env, **variables), cwd=tmp_path)
        assert result.status == 2
        line = result.error_line()
        assert result.err.splitlines() == [line]
        for fragment in fragments:
            assert fragment in line


class TestCheck:
    """``dxtrack check``: one line per check, exit 1 when any fails."""

    def test_both_streams_active(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        result = dxtrack("check", "--stage", "dev", env=aws_env, cwd=tmp_path)
        assert (result.status, result.err) == (0, "")
        lines = result.out.splitlines()
        assert "credentials: ok (found by boto3: env)" in lines
        for kind in ("metric", "error"):
            assert f"{kind} stream 'dxtrack-{kind}-input-dev': ok (ACTIVE in region " \
                   f"'{REGION}', delivering to s3://{BUCKET}/{kind}/dt={DAY}/)" \
                   in lines
        assert lines[-1] == "3 checks passed"
        assert landing.lines("metric") == []  # a check sends nothing unless asked to

    def test_a_missing_stream_is_named(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        landing.firehose.delete_delivery_stream(DeliveryStreamName="dxtrack-error-input-dev")
        result = dxtrack("check", "--stage", "dev", env=aws_env, cwd=tmp_path)
        assert result.status == 1
        assert "1 of 3 checks failed" in result.error_line()
        lines = result.out.splitlines()
        assert any(line.startswith("metric stream 'dxtrack-metric-input-dev': ok (ACTIVE in "
                                   f"region '{REGION}'") for line in lines)
        [failed] = [line for line in lines if "FAILED" in line]
        assert failed.startswith("error stream 'dxtrack-error-input-dev': FAILED: ")
        assert f"region '{REGION}'" in failed and "DXTRACK_ERROR_STREAM" in failed
        assert "'dxtrack setup --stage dev' creates it" in failed

    def test_a_stream_not_as_setup_makes_it_fails_naming_the_fix(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        stream = landing.firehose.describe_delivery_stream(
            DeliveryStreamName="dxtrack-metric-input-dev")["DeliveryStreamDescription"]
        landing.firehose.update_destination(
            DeliveryStreamName="dxtrack-metric-input-dev",
            CurrentDeliveryStreamVersionId=stream["VersionId"],
            DestinationId=stream["Destinations"][0]["DestinationId"],
            ExtendedS3DestinationUpdate={"Prefix": "metrics/", "CompressionFormat": "UNCOMPRESSED"})
        result = dxtrack("check", "--stage", "dev", env=aws_env, cwd=tmp_path)
        assert result.status == 1
        [failed] = [line for line in result.out.splitlines() if "FAILED" in line]
        assert failed.startswith("metric stream 'dxtrack-metric-input-dev': FAILED: ACTIVE in "
                                 f"region '{REGION}', but Prefix is \"metrics/\", setup makes "
                                 f"\"metric/dt={DAY}/\"; CompressionFormat is \"UNCOMPRESSED\"")
        assert failed.endswith("'dxtrack setup --stage dev --update' fixes it")

    def test_send_test_delivers_one_record(
        self, aws_env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        result = dxtrack("check", "--stage", "dev", "--send-test", env=aws_env, cwd=tmp_path)
        assert (result.status, result.err) == (0, "")
        assert "test record: ok (metric 'dxtrack.check' delivered to delivery stream " \
               f"'dxtrack-metric-input-dev' in region '{REGION}')" in result.out.splitlines()
        [record] = landing.records("metric")
        assert (record["metric_name"], record["value"], record["context"]) == (
            "dxtrack.check", 1.0, "dxtrack-check"
        )

    def test_no_credentials_at_all(
        self, env: Dict[str, str], landing: Any, tmp_path: Any
    ) -> None:
        child = dict(env, DXTRACK_ENDPOINT_URL=landing.url)
        result = dxtrack("check", "--stage", "dev", "--send-test", env=child, cwd=tmp_path)
        assert result.status == 1
        result.error_line()
        lines = result.out.splitlines()
        [credentials] = [line for line in lines if line.startswith("credentials: ")]
        assert credentials.startswith("credentials: FAILED: none found: set AWS_ACCESS_KEY_ID")
        assert "error stream 'dxtrack-error-input-dev': skipped (needs credentials)" in lines
        assert "test record: skipped (an earlier check failed)" in lines

    def test_stage_test_checks_the_output_directory(
        self, env: Dict[str, str], tmp_path: Any
    ) -> None:
        child = dict(env, DXTRACK_OUTPUT_DIR=str(tmp_path / "out"))
        result = dxtrack("check", "--stage", "test", "--send-test", env=child, cwd=tmp_path)
        assert (result.status, result.err) == (0, "")
        lines = result.out.splitlines()
        assert "nothing in AWS is involved" in lines[0]
        assert lines[1].startswith(f"output directory {tmp_path / 'out'}: ok")
        assert len((tmp_path / "out" / "metric.jsonl").read_bytes().splitlines()) == 1

    def test_stage_test_with_a_file_in_the_way(
        self, env: Dict[str, str], tmp_path: Any
    ) -> None:
        (tmp_path / "taken").write_text("")
        child = dict(env, DXTRACK_OUTPUT_DIR=str(tmp_path / "taken" / "out"))
        result = dxtrack("check", "--stage", "test", env=child, cwd=tmp_path)
        assert result.status == 1
        result.error_line()
        [failed] = [line for line in result.out.splitlines() if "FAILED" in line]
        assert f"{tmp_path / 'taken'} is not a directory" in failed
        assert "DXTRACK_OUTPUT_DIR" in failed


class TestDemo:
    """``dxtrack demo`` runs the demo with its own options, and needs moto for stage dev."""

    def test_options_pass_through(self, env: Dict[str, str], tmp_path: Any) -> None:
        # 4 shops: shop 3 records an error, so both of the demo's files exist.
        result = dxtrack("demo", "--stage", "test", "--shops", "4", "--pages", "5",
                         "--workers", "2", env=env, cwd=tmp_path)
        assert result.status == 0, result.err
        assert "4 shops x 5 pages in 2 worker processes" in result.out
        assert "every record landed exactly once" in result.out

    def test_without_moto(self, env: Dict[str, str], tmp_path: Any) -> None:
        shadow = tmp_path / "no-moto" / "moto"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('moto is not installed')\n")
        child = dict(env, PYTHONPATH=str(tmp_path / "no-moto"))
        result = dxtrack("demo", "--shops", "1", env=child, cwd=tmp_path)
        assert result.status == 1
        assert "pip install 'dxtrack[demo]'" in result.error_line()
        assert result.out == ""


class TestHelpAndVersion:
    """``--help`` everywhere names what can be given; ``--version`` prints the version."""

    @pytest.mark.parametrize(("args", "fragments"), [
        ([], ["metric", "check", "demo", "exit status"]),
        (["metric"], ["NAME", "VALUE", "--meta KEY=VALUE", "--stage", "--context", "--run-id",
                      "DXTRACK_STAGE", "JSON number"]),
        (["check"], ["--send-test", "--stage", "--region", "--endpoint-url", "--profile"]),
        (["demo"], ["--stage", "--shops", "--pages", "--workers", "--start-method"]),
    ], ids=["top-level", "metric", "check", "demo"])
    def test_help(
        self, args: List[str], fragments: List[str], env: Dict[str, str], tmp_path: Any
    ) -> None:
        result = dxtrack(*args, "--help", env=env, cwd=tmp_path)
        assert (result.status, result.err) == (0, "")
        for fragment in fragments:
            assert fragment in result.out

    def test_version(self, env: Dict[str, str], tmp_path: Any) -> None:
        result = dxtrack("--version", env=env, cwd=tmp_path, script=True)
        assert (result.status, result.out, result.err) == (0, f"dxtrack {__version__}\n", "")
