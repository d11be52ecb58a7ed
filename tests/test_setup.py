"""``dxtrack setup``: the landing zone of a stage made against the moto server (S3, IAM,
Firehose, Glue), idempotent, reporting what differs; its CloudFormation template (checked by
cfn-lint and against what setup made) and its IAM policies (against the calls setup makes and
moto's IAM enforcement); records from the client landing under the date partitions."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import urllib.request
from typing import Any, Dict, Iterator, List, Set

import boto3
import orjson
import pytest
from botocore.awsrequest import AWSResponse

from dxtrack import DXTrack
from dxtrack.cli import main
from dxtrack.config import Config
from dxtrack.landing import STREAMS, Landing, differences, template
from dxtrack.provision import Setup, SetupError

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's
STAGE = "prod"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
BUCKET = f"dxtrack-{STAGE}-{ACCOUNT}"
#: cfn-lint's command, installed with moto's server.
CFN_LINT = os.path.join(os.path.dirname(sys.executable), "cfn-lint")


def _answer(response: Dict[str, Any]) -> Dict[str, Any]:
    """An answer without its request id."""
    return {key: value for key, value in response.items() if key != "ResponseMetadata"}


class Account:
    """A fresh moto account, read through boto3 as an operator would."""

    def __init__(self, url: str) -> None:
        self.url = url
        options: Dict[str, Any] = dict(region_name=REGION, endpoint_url=url, **KEYS)
        self.s3, self.iam = boto3.client("s3", **options), boto3.client("iam", **options)
        self.firehose = boto3.client("firehose", **options)
        self.glue = boto3.client("glue", **options)

    def setup(self, *flags: str) -> int:
        return main(["setup", "--stage", STAGE, "--endpoint-url", self.url, *flags])

    def config(self, **options: Any) -> Config:
        return Config(**{"stage": STAGE, "context": "tests", "run_id": "run-1",
                         "endpoint_url": self.url, "region_name": REGION, **KEYS, **options})

    def stream(self, kind: str) -> Dict[str, Any]:
        answer = self.firehose.describe_delivery_stream(
            DeliveryStreamName=f"dxtrack-{kind}-input-{STAGE}")
        return dict(answer["DeliveryStreamDescription"])

    def destination(self, kind: str) -> Dict[str, Any]:
        return dict(self.stream(kind)["Destinations"][0]["ExtendedS3DestinationDescription"])

    def state(self) -> Dict[str, Any]:
        """Everything setup makes, as AWS describes it."""
        role = self.iam.get_role(RoleName=f"dxtrack-firehose-{STAGE}")["Role"]
        return {
            "block": _answer(self.s3.get_public_access_block(Bucket=BUCKET)),
            "encryption": _answer(self.s3.get_bucket_encryption(Bucket=BUCKET)),
            "role": role["AssumeRolePolicyDocument"],
            "policy": _answer(self.iam.get_role_policy(RoleName=role["RoleName"],
                                                       PolicyName=f"{role['RoleName']}-s3")),
            "streams": {kind: self.stream(kind) for kind in STREAMS},
            "database": self.glue.get_database(Name=f"dxtrack_{STAGE}")["Database"],
            "tables": {kind: self.glue.get_table(DatabaseName=f"dxtrack_{STAGE}",
                                                 Name=kind)["Table"] for kind in STREAMS},
        }

    def keys(self, prefix: str = "") -> List[str]:
        found = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return [item["Key"] for item in found]


@pytest.fixture
def account(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Account:
    """A moto server holding nothing, and credentials for it in the environment."""
    request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return Account(moto_url)


def _lines(capsys: pytest.CaptureFixture[str]) -> List[str]:
    return capsys.readouterr().out.splitlines()


class TestSetup:
    def test_creates_everything_a_stage_needs(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup() == 0
        out = _lines(capsys)
        assert out[0] == f"dxtrack setup: stage '{STAGE}', account {ACCOUNT}, region {REGION}"
        assert [line.rsplit(": ", 1)[1] for line in out[1:8]] == ["created"] * 7
        assert out[8] == "done: 7 created"
        assert f"dxtrack.configure(stage='{STAGE}', region_name='{REGION}'" in out[9]
        assert out[10].startswith(f"or with the variables: DXTRACK_STAGE={STAGE} "
                                  f"DXTRACK_REGION_NAME={REGION}")
        state = account.state()
        assert state["block"]["PublicAccessBlockConfiguration"] == dict.fromkeys(
            ["BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"],
            True)
        [rule] = state["encryption"]["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        [trust] = state["role"]["Statement"]
        assert trust["Principal"] == {"Service": "firehose.amazonaws.com"}
        assert trust["Condition"] == {"StringEquals": {"sts:ExternalId": ACCOUNT}}
        [allowed] = state["policy"]["PolicyDocument"]["Statement"]
        assert allowed["Resource"] == [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]
        for kind in STREAMS:
            stream = state["streams"][kind]
            assert (stream["DeliveryStreamType"], stream["DeliveryStreamStatus"]) == (
                "DirectPut", "ACTIVE")
            destination = stream["Destinations"][0]["ExtendedS3DestinationDescription"]
            assert destination["BucketARN"] == f"arn:aws:s3:::{BUCKET}"
            assert destination["RoleARN"] == f"arn:aws:iam::{ACCOUNT}:role/dxtrack-firehose-prod"
            assert destination["Prefix"] == f"{kind}/dt=!{{timestamp:yyyy-MM-dd}}/"
            assert destination["ErrorOutputPrefix"].startswith(f"failed/{kind}/")
            assert (destination["CompressionFormat"], destination["FileExtension"]) == (
                "GZIP", ".jsonl.gz")
            table = state["tables"][kind]
            assert table["StorageDescriptor"]["Location"] == f"s3://{BUCKET}/{kind}/"
            assert table["PartitionKeys"] == [{"Name": "dt", "Type": "string"}]
            assert table["Parameters"]["storage.location.template"] == \
                f"s3://{BUCKET}/{kind}/dt=${{dt}}/"
            columns = [c["Name"] for c in table["StorageDescriptor"]["Columns"]]
            assert {"id", "context", "run_id", "metadata", "timestamp"} <= set(columns)
        assert state["database"]["Name"] == f"dxtrack_{STAGE}"

    def test_a_second_run_changes_nothing_and_says_so(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup() == 0
        before = account.state()
        capsys.readouterr()
        assert account.setup() == 0
        out = _lines(capsys)
        assert [line.split(": ", 1)[1] for line in out[1:8]] == [
            "exists as setup makes it"] * 7
        assert out[8] == "done: nothing to change, all 7 are as setup makes them"
        assert account.state() == before  # stream versions and table versions included

    def test_a_mismatched_stream_is_reported_and_left_alone(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup() == 0
        stream = account.stream("error")
        account.firehose.update_destination(
            DeliveryStreamName=stream["DeliveryStreamName"],
            CurrentDeliveryStreamVersionId=stream["VersionId"],
            DestinationId=stream["Destinations"][0]["DestinationId"],
            ExtendedS3DestinationUpdate={"Prefix": "custom/", "CompressionFormat": "UNCOMPRESSED"})
        before = account.state()
        capsys.readouterr()

        assert account.setup() == 1
        captured = capsys.readouterr()
        [line] = [line for line in captured.out.splitlines() if "DIFFERS" in line]
        assert line.startswith(f"  error stream dxtrack-error-input-{STAGE}: DIFFERS, left as "
                               "it is (--update changes it): ")
        assert 'Destination.Prefix is "custom/", setup makes "error/dt=' in line
        assert 'Destination.CompressionFormat is "UNCOMPRESSED", setup makes "GZIP"' in line
        assert "1 resource differs from what setup makes" in captured.err
        assert account.state() == before

        assert account.setup("--update", "--dry-run") == 0  # a plan changes nothing
        planned = capsys.readouterr().out
        assert "error stream dxtrack-error-input-prod: differs, to update: " in planned
        assert account.state() == before

        assert account.setup("--update") == 0
        assert f"error stream dxtrack-error-input-{STAGE}: updated: " in capsys.readouterr().out
        assert account.destination("error")["Prefix"] == "error/dt=!{timestamp:yyyy-MM-dd}/"
        assert account.setup() == 0

    def test_a_dry_run_plans_and_creates_nothing(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup("--dry-run") == 0
        out = _lines(capsys)
        assert out[0].startswith("dxtrack plan: ")
        assert [line.rsplit(": ", 1)[1] for line in out[1:8]] == ["to create"] * 7
        assert out[8] == "plan: 7 to create" and len(out) == 9
        assert account.s3.list_buckets()["Buckets"] == []
        assert account.firehose.list_delivery_streams()["DeliveryStreamNames"] == []
        assert account.glue.get_databases()["DatabaseList"] == []

    def test_a_chosen_bucket_and_stream_names_are_used_everywhere(
        self, account: Account, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("DXTRACK_METRIC_STREAM", "shop-metrics")
        assert account.setup("--bucket", "my-landing") == 0
        out = capsys.readouterr().out
        assert "metric_stream='shop-metrics'" in out and "DXTRACK_METRIC_STREAM=shop-metrics" in out
        answer = account.firehose.describe_delivery_stream(DeliveryStreamName="shop-metrics")
        destination = answer["DeliveryStreamDescription"]["Destinations"][0]
        assert destination["ExtendedS3DestinationDescription"]["BucketARN"] == \
            "arn:aws:s3:::my-landing"
        table = account.glue.get_table(DatabaseName=f"dxtrack_{STAGE}", Name="metric")["Table"]
        assert table["StorageDescriptor"]["Location"] == "s3://my-landing/metric/"
        # Without --bucket, a later run finds the bucket the streams deliver to.
        assert account.setup() == 0
        out = _lines(capsys)
        assert out[1] == "  (bucket my-landing: the one the stage's streams deliver to)"
        assert out[-3] == "done: nothing to change, all 7 are as setup makes them"
        assert [b["Name"] for b in account.s3.list_buckets()["Buckets"]] == ["my-landing"]

    def test_a_run_stopped_after_the_role_is_completed(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup() == 0
        account.iam.delete_role_policy(RoleName="dxtrack-firehose-prod",
                                       PolicyName="dxtrack-firehose-prod-s3")
        capsys.readouterr()
        assert account.setup() == 0
        assert "  role dxtrack-firehose-prod: its policy dxtrack-firehose-prod-s3 created (the " \
               "role had none)" in _lines(capsys)
        assert account.setup() == 0

    def test_a_stream_reading_from_kinesis_is_reported_and_the_rest_made(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        account.firehose.create_delivery_stream(
            DeliveryStreamName=f"dxtrack-metric-input-{STAGE}",
            DeliveryStreamType="KinesisStreamAsSource",
            KinesisStreamSourceConfiguration={
                "KinesisStreamARN": f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/scraper",
                "RoleARN": f"arn:aws:iam::{ACCOUNT}:role/kinesis"},
            ExtendedS3DestinationConfiguration={"BucketARN": f"arn:aws:s3:::{BUCKET}",
                                                "RoleARN": f"arn:aws:iam::{ACCOUNT}:role/x"})
        for flags in ([], ["--update"]):
            assert account.setup(*flags) == 1
            out = _lines(capsys)
            [line] = [line for line in out if "metric stream" in line]
            assert line == (f"  metric stream dxtrack-metric-input-{STAGE}: DIFFERS, and setup "
                            "cannot change it: it reads from KinesisStreamAsSource, where dxtrack "
                            "needs a Direct PUT stream; delete it, or name another with "
                            "DXTRACK_METRIC_STREAM")
        assert account.stream("error")["DeliveryStreamStatus"] == "ACTIVE"  # the rest was made
        assert account.glue.get_table(DatabaseName=f"dxtrack_{STAGE}", Name="metric")

    def test_a_new_role_firehose_cannot_assume_yet_is_waited_for(
        self, account: Account, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """IAM is eventually consistent: Firehose refuses a role created a moment ago. The
        refusal is injected into the first CreateDeliveryStream (moto never sends it)."""
        monkeypatch.setattr("dxtrack.provision.POLL", 0.01)
        said: List[str] = []
        setup = Setup(account.config(), say=said.append)
        calls: List[str] = []

        def count(params: Dict[str, Any], **kwargs: Any) -> None:
            calls.append(params["DeliveryStreamName"])

        def refuse_once(**kwargs: Any) -> Any:
            if len(calls) > 1:
                return None
            error = {"Code": "InvalidArgumentException",
                     "Message": "Firehose is unable to assume role arn:aws:iam::..."}
            return AWSResponse(account.url, 400, {}, None), {"Error": error}

        events = setup._clients["firehose"].meta.events
        events.register("before-parameter-build.firehose.CreateDeliveryStream", count)
        events.register("before-call.firehose.CreateDeliveryStream", refuse_once)
        assert setup.run() == 0
        assert calls == ["dxtrack-metric-input-prod"] * 2 + ["dxtrack-error-input-prod"]
        assert account.stream("metric")["DeliveryStreamStatus"] == "ACTIVE"

    def test_a_refusal_is_one_line_naming_the_policy(
        self, account: Account, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        setup = Setup(account.config(), say=lambda line: None)

        def deny(**kwargs: Any) -> Any:
            error = {"Code": "AccessDenied", "Message": "not authorized to perform iam:CreateRole"}
            return AWSResponse(account.url, 403, {}, None), {"Error": error}

        setup._clients["iam"].meta.events.register("before-call.iam.CreateRole", deny)
        with pytest.raises(SetupError, match="iam create_role failed: .*'dxtrack setup "
                                             "--print-policy setup' prints what setup needs"):
            setup.run()


class TestUsage:
    @pytest.mark.parametrize("args, message", [
        (["setup"], "setup needs --stage (or DXTRACK_STAGE)"),
        (["setup", "--stage", "test"], "stage 'test' writes local files and needs nothing in AWS"),
        (["setup", "--stage", "prod", "--print-policy", "admin"], "invalid choice: 'admin'"),
        (["setup", "--stage", "prod", "--bucket", "My_Bucket"],
         "--bucket: 'My_Bucket' is not an S3 bucket name"),
    ])
    def test_bad_usage_is_one_line_and_status_2(
        self, args: List[str], message: str, tmp_path: Any
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DXTRACK_"))}
        done = subprocess.run([sys.executable, "-m", "dxtrack", *args], capture_output=True,
                              text=True, timeout=60, env=env, cwd=tmp_path)
        assert (done.returncode, done.stdout) == (2, "")
        [line] = done.stderr.splitlines()
        assert line.startswith("dxtrack: error: ") and message in line

    def test_without_credentials_it_says_so_in_one_line(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["setup", "--stage", "prod", "--endpoint-url", "http://127.0.0.1:9"]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("dxtrack: error: sts get_caller_identity failed: "
                               "NoCredentialsError")


class TestRecordsLand:
    def test_under_the_date_partitions_the_tables_project(self, account: Account) -> None:
        assert account.setup() == 0
        before = datetime.datetime.now(datetime.timezone.utc).date()
        client = DXTrack()
        client.configure(**{"stage": STAGE, "context": "tests", "run_id": "run-1",
                            "endpoint_url": account.url, "region_name": REGION, **KEYS})
        for n in range(5):
            client.metric("landing.rows", n, metadata={"shop": f"shop-{n}"})
        try:
            raise RuntimeError("a page could not be read")
        except RuntimeError:
            client.error()
        assert client.flush_metrics_buffer(timeout=10)
        client.close(timeout=10)
        after = datetime.datetime.now(datetime.timezone.utc).date()
        days = {f"{day:%Y-%m-%d}" for day in (before, after)}
        landing = Landing.of(account.config(), ACCOUNT, REGION)
        found: Dict[str, List[Dict[str, Any]]] = {}
        for kind in STREAMS:
            keys = account.keys(f"{kind}/")
            assert keys
            template = landing.table_input(kind)["Parameters"]["storage.location.template"]
            for key in keys:
                folder, _, name = key.rpartition("/")
                assert any(f"s3://{BUCKET}/{folder}/" == template.replace("${dt}", day)
                           for day in days), key
                assert name.startswith(f"dxtrack-{kind}-input-{STAGE}-")
                body = account.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                found.setdefault(kind, []).extend(orjson.loads(line) for line in body.splitlines())
        assert sorted(r["value"] for r in found["metric"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert [r["exception"]["type"] for r in found["error"]] == ["RuntimeError"]


def _resolved(value: Any) -> Any:
    """A template's value with its Fn::Sub done for moto's account and region."""
    if isinstance(value, dict) and set(value) == {"Fn::Sub"}:
        text = value["Fn::Sub"]
        for name, real in (("AccountId", ACCOUNT), ("Region", REGION), ("Partition", "aws")):
            text = text.replace("${AWS::" + name + "}", real)
        return text.replace("${!", "${")
    if isinstance(value, dict):
        return {key: _resolved(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolved(item) for item in value]
    return value


class TestTemplate:
    def test_passes_cfn_lint(self, tmp_path: Any) -> None:
        path = tmp_path / "landing.json"
        path.write_text(json.dumps(template(Config(stage=STAGE, context="c", run_id="r"))))
        done = subprocess.run([CFN_LINT, str(path)], capture_output=True, text=True, timeout=300)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    def test_a_broken_template_fails_cfn_lint(self, tmp_path: Any) -> None:
        """The check above can fail: a stream with a compression Firehose does not know."""
        broken = template(Config(stage=STAGE, context="c", run_id="r"))
        properties = broken["Resources"]["MetricStream"]["Properties"]
        properties["ExtendedS3DestinationConfiguration"]["CompressionFormat"] = "BROTLI"
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        done = subprocess.run([CFN_LINT, str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "BROTLI" in done.stdout

    def test_names_the_resources_and_settings_setup_creates(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup() == 0
        capsys.readouterr()
        assert main(["setup", "--stage", STAGE, "--template"]) == 0
        printed = json.loads(capsys.readouterr().out)
        resources = _resolved(printed["Resources"])
        state = account.state()
        assert {r["Type"] for r in resources.values()} == {
            "AWS::S3::Bucket", "AWS::IAM::Role", "AWS::KinesisFirehose::DeliveryStream",
            "AWS::Glue::Database", "AWS::Glue::Table"}
        assert len(resources) == 7  # the seven resources setup reports
        bucket = resources["Bucket"]["Properties"]
        assert bucket["BucketName"] == BUCKET
        assert bucket["PublicAccessBlockConfiguration"] == \
            state["block"]["PublicAccessBlockConfiguration"]
        [rule] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        [made] = state["encryption"]["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ServerSideEncryptionByDefault"] == made["ApplyServerSideEncryptionByDefault"]
        role = resources["FirehoseRole"]["Properties"]
        assert role["AssumeRolePolicyDocument"] == state["role"]
        [policy] = role["Policies"]
        assert (policy["PolicyName"], policy["PolicyDocument"]) == (
            state["policy"]["PolicyName"], state["policy"]["PolicyDocument"])
        assert resources["Database"]["Properties"]["DatabaseInput"]["Name"] == \
            state["database"]["Name"]
        for kind in STREAMS:
            stream = resources[f"{kind.capitalize()}Stream"]["Properties"]
            made_stream = state["streams"][kind]
            assert stream["DeliveryStreamName"] == made_stream["DeliveryStreamName"]
            assert stream["DeliveryStreamType"] == made_stream["DeliveryStreamType"]
            described = made_stream["Destinations"][0]["ExtendedS3DestinationDescription"]
            assert differences(stream["ExtendedS3DestinationConfiguration"], described) == []
            table = resources[f"{kind.capitalize()}Table"]["Properties"]
            assert table["DatabaseName"] == state["database"]["Name"]
            assert differences(table["TableInput"], state["tables"][kind]) == []

    def test_keeps_athena_placeholders_literal(self) -> None:
        printed = template(Config(stage=STAGE, context="c", run_id="r"))
        parameters = printed["Resources"]["MetricTable"]["Properties"]["TableInput"]["Parameters"]
        assert parameters["storage.location.template"] == {
            "Fn::Sub": "s3://dxtrack-prod-${AWS::AccountId}/metric/dt=${!dt}/"}
        chosen = template(Config(stage=STAGE, context="c", run_id="r"), bucket="mine")
        parameters = chosen["Resources"]["MetricTable"]["Properties"]["TableInput"]["Parameters"]
        assert parameters["storage.location.template"] == "s3://mine/metric/dt=${dt}/"


def _record_calls(setup: Setup, made: Set[str]) -> None:
    """Add to ``made`` the IAM action of every call ``setup``'s clients make."""
    renamed = {"s3:HeadBucket": "s3:ListBucket",
               "s3:GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock",
               "s3:GetBucketEncryption": "s3:GetEncryptionConfiguration",
               "s3:PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
               "s3:PutBucketEncryption": "s3:PutEncryptionConfiguration"}

    def record(model: Any, **kwargs: Any) -> None:
        action = f"{model.service_model.signing_name}:{model.name}"
        made.add(renamed.get(action, action))

    for client in setup._clients.values():
        client.meta.events.register("before-call", record)


class TestPolicies:
    def test_the_setup_policy_allows_every_call_setup_makes(self, account: Account) -> None:
        """On an empty account, on a second run, and while updating what differs."""
        policy = Landing.of(account.config(), ACCOUNT, REGION).setup_policy()
        allowed = {action for statement in policy["Statement"] for action in statement["Action"]}
        called: Set[str] = set()
        for flags in ({}, {}, {"update": True}):
            setup = Setup(account.config(), say=lambda line: None, **flags)
            _record_calls(setup, called)
            if flags:
                stream = account.stream("metric")
                account.firehose.update_destination(
                    DeliveryStreamName=stream["DeliveryStreamName"],
                    CurrentDeliveryStreamVersionId=stream["VersionId"],
                    DestinationId=stream["Destinations"][0]["DestinationId"],
                    ExtendedS3DestinationUpdate={"Prefix": "elsewhere/"})
                account.iam.update_assume_role_policy(
                    RoleName="dxtrack-firehose-prod", PolicyDocument=json.dumps(
                        Landing.of(account.config(), "111122223333", REGION).trust_policy()))
                account.glue.update_table(DatabaseName="dxtrack_prod", TableInput={
                    "Name": "error", "StorageDescriptor": {"Location": "s3://elsewhere/"}})
                account.s3.delete_public_access_block(Bucket=BUCKET)
            setup.run()
        # Every call is allowed, and every action allowed is called. PassRole is no call: IAM
        # checks it when CreateDeliveryStream and UpdateDestination name the role; the
        # caller's identity is read before the test listens, when Setup is made.
        assert called == allowed - {"iam:PassRole", "sts:GetCallerIdentity"}

    def test_printed_policies_name_the_account_the_credentials_give(
        self, account: Account, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert account.setup("--print-policy", "producer") == 0
        captured = capsys.readouterr()
        [statement] = json.loads(captured.out)["Statement"]
        assert statement["Resource"][0] == \
            f"arn:aws:firehose:{REGION}:{ACCOUNT}:deliverystream/dxtrack-metric-input-{STAGE}"
        assert captured.err == ""

    def test_printed_policies_without_credentials_leave_the_account_open(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["setup", "--stage", STAGE, "--region", REGION,
                     "--print-policy", "producer"]) == 0
        captured = capsys.readouterr()
        assert captured.err.startswith("dxtrack: note: account left as '*' (")
        producer = json.loads(captured.out)
        [statement] = producer["Statement"]
        assert statement["Action"] == ["firehose:PutRecordBatch",
                                       "firehose:DescribeDeliveryStream"]
        assert statement["Resource"] == [
            f"arn:aws:firehose:{REGION}:*:deliverystream/dxtrack-{kind}-input-{STAGE}"
            for kind in STREAMS]
        assert main(["setup", "--stage", STAGE, "--print-policy", "setup"]) == 0  # region: default
        resources = {r for s in json.loads(capsys.readouterr().out)["Statement"]
                     for r in s["Resource"]}
        assert f"arn:aws:s3:::dxtrack-{STAGE}-*" in resources
        assert "arn:aws:iam::*:role/dxtrack-firehose-prod" in resources


@pytest.fixture
def iam_enforced(account: Account, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto checks every request against the IAM policies of its signer, for this test only.
    moto checks Firehose actions against the resource '*'; the stream's ARN is given to it
    here, as AWS does, so that a policy naming streams can be tested."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin, disable_iam_authentication
    from moto.firehose.responses import FirehoseResponse

    def user_with(policy: Dict[str, Any]) -> Dict[str, str]:
        with disable_iam_authentication():
            account.iam.create_user(UserName="producer")
            account.iam.put_user_policy(UserName="producer", PolicyName="producer",
                                        PolicyDocument=json.dumps(policy))
            key = account.iam.create_access_key(UserName="producer")["AccessKey"]
        return {"aws_access_key_id": key["AccessKeyId"],
                "aws_secret_access_key": key["SecretAccessKey"]}

    def stream_arn(self: Any) -> str:
        name = json.loads(self.body or "{}").get("DeliveryStreamName")
        return f"arn:aws:firehose:{self.region}:{self.current_account}:deliverystream/{name}"

    monkeypatch.setattr(FirehoseResponse, "_determine_resource", stream_arn, raising=False)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    yield user_with


class TestProducerPolicy:
    def test_is_enough_to_send_and_nothing_more(
        self, account: Account, iam_enforced: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from moto.core.authorization import disable_iam_authentication

        with disable_iam_authentication():
            assert account.setup() == 0
            account.firehose.create_delivery_stream(
                DeliveryStreamName="someone-else", DeliveryStreamType="DirectPut",
                ExtendedS3DestinationConfiguration={"BucketARN": f"arn:aws:s3:::{BUCKET}",
                                                    "RoleARN": "arn:aws:iam::1:role/x"})
        policy = Landing.of(account.config(), ACCOUNT, REGION).producer_policy()
        keys = iam_enforced(policy)
        client = DXTrack()
        client.configure(stage=STAGE, context="tests", run_id="run-1", endpoint_url=account.url,
                         region_name=REGION, **keys)
        client.metric("allowed.rows", 1)
        assert client.flush_metrics_buffer(timeout=10)
        client.close(timeout=5)
        firehose = boto3.client("firehose", region_name=REGION, endpoint_url=account.url, **keys)
        firehose.describe_delivery_stream(DeliveryStreamName=f"dxtrack-error-input-{STAGE}")
        for call in (lambda: firehose.put_record_batch(DeliveryStreamName="someone-else",
                                                       Records=[{"Data": b"{}\n"}]),
                     lambda: firehose.delete_delivery_stream(
                         DeliveryStreamName=f"dxtrack-metric-input-{STAGE}")):
            with pytest.raises(Exception) as refused:
                call()
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with disable_iam_authentication():
            assert len(account.keys("metric/")) == 1  # the one allowed put
