"""The landing zone of a stage, defined once: the S3 bucket, the role Firehose assumes, the
two delivery streams, the Glue database and tables Athena reads, and the IAM policies of a
producer and of ``dxtrack setup``.

Each definition is the body of the AWS call that creates the resource. ``dxtrack setup``
(:mod:`dxtrack.provision`) sends them, :func:`template` writes the same bodies as a
CloudFormation template, and ``dxtrack check`` compares a stream's destination with them;
docs/landing-zone.md explains the choices.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from .config import Config

__all__ = ["STREAMS", "Landing", "differences", "template"]

STREAMS = ("metric", "error")
#: Firehose writes an S3 object after this many seconds or MiB, whichever comes first: a
#: record is queryable about a minute after it is sent, and a busy stream writes few objects.
BUFFER_SECONDS, BUFFER_MIB = 60, 64
#: The day Firehose received a record (UTC): the partition ``dt`` of both tables.
DAY = "!{timestamp:yyyy-MM-dd}"
_SERDE = "org.openx.data.jsonserde.JsonSerDe"
_COMMON = [("id", "string"), ("context", "string"), ("stage", "string"), ("run_id", "string")]
_COLUMNS = {
    "metric": [("metric_name", "string"), ("value", "double")],
    "error": [("exception", "struct<type:string,value:string,traceback:string>")],
}
_SETUP_ACTIONS = {
    "s3": ["s3:CreateBucket", "s3:ListBucket", "s3:GetBucketPublicAccessBlock",
           "s3:PutBucketPublicAccessBlock", "s3:GetEncryptionConfiguration",
           "s3:PutEncryptionConfiguration"],
    "iam": ["iam:CreateRole", "iam:GetRole", "iam:UpdateAssumeRolePolicy", "iam:GetRolePolicy",
            "iam:PutRolePolicy"],
    "firehose": ["firehose:CreateDeliveryStream", "firehose:DescribeDeliveryStream",
                 "firehose:UpdateDestination"],
    "glue": ["glue:GetDatabase", "glue:CreateDatabase", "glue:GetTable", "glue:CreateTable",
             "glue:UpdateTable"],
}


def _policy(*statements: Dict[str, Any]) -> Dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(actions: List[str], resources: List[str], **extra: Any) -> Dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resources, **extra}


def differences(want: Any, have: Any, path: str = "") -> List[str]:
    """What in ``have`` differs from ``want``: only the keys ``want`` names are compared
    (AWS adds its own), lists item by item."""
    if isinstance(want, dict) and isinstance(have, dict):
        return [problem for key, value in want.items()
                for problem in differences(value, have.get(key), f"{path}.{key}".lstrip("."))]
    if isinstance(want, list) and isinstance(have, list):
        if len(want) == len(have):
            return [problem for index, (w, h) in enumerate(zip(want, have))
                    for problem in differences(w, h, f"{path}[{index}]")]
        lacks, extra = [w for w in want if w not in have], [h for h in have if h not in want]
        return [f"{path} lacks {json.dumps(lacks)}" + (f" and has {json.dumps(extra)}"
                                                       if extra else "")]
    if want == have:
        return []
    return [f"{path or 'value'} is {json.dumps(have)}, setup makes {json.dumps(want)}"]


@dataclass(frozen=True)
class Landing:
    """What ``setup`` makes for one stage in one account and region. ``account``,
    ``region`` and ``partition`` may be CloudFormation's ``${AWS::...}`` or ``*`` (a policy
    printed without credentials)."""

    stage: str
    account: str
    region: str
    #: Delivery stream names by kind ('metric', 'error'), as ``Config.stream_name`` gives them.
    stream_names: Mapping[str, str]
    partition: str = "aws"
    bucket_name: Optional[str] = None
    timestamp_format: str = "unix"
    #: The client's ``compression``: 'gzip' makes the streams store its gzip as it is.
    compression: str = "none"

    @classmethod
    def of(cls, config: Config, account: str, region: str, partition: str = "aws",
           bucket: Optional[str] = None) -> Landing:
        return cls(config.stage, account, region,
                   {kind: config.stream_name(kind) for kind in STREAMS}, partition, bucket,
                   config.timestamp_format, config.compression)

    # Names and ARNs.
    @property
    def bucket(self) -> str:
        return self.bucket_name or f"dxtrack-{self.stage}-{self.account}"

    @property
    def bucket_arn(self) -> str:
        return f"arn:{self.partition}:s3:::{self.bucket}"

    @property
    def role_name(self) -> str:
        return f"dxtrack-firehose-{self.stage}"

    @property
    def role_arn(self) -> str:
        return f"arn:{self.partition}:iam::{self.account}:role/{self.role_name}"

    @property
    def database(self) -> str:
        return f"dxtrack_{self.stage}"

    def stream(self, kind: str) -> str:
        return self.stream_names[kind]

    def stream_arn(self, kind: str) -> str:
        return (f"arn:{self.partition}:firehose:{self.region}:{self.account}:"
                f"deliverystream/{self.stream(kind)}")

    def _glue_arn(self, what: str) -> str:
        return f"arn:{self.partition}:glue:{self.region}:{self.account}:{what}"

    @staticmethod
    def prefix(kind: str) -> str:
        """Where a stream's objects land: one folder per day, as the tables project it."""
        return f"{kind}/dt={DAY}/"

    @staticmethod
    def error_prefix(kind: str) -> str:
        """Where Firehose puts what it could not deliver, beside the tables' folders."""
        return f"failed/{kind}/!{{firehose:error-output-type}}/dt={DAY}/"

    # The resources.
    def public_access_block(self) -> Dict[str, bool]:
        return {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True}

    def encryption(self) -> Dict[str, Any]:
        return {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}

    def trust_policy(self) -> Dict[str, Any]:
        """Firehose may assume the role, for this account's streams only."""
        return _policy({"Effect": "Allow", "Principal": {"Service": "firehose.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                        "Condition": {"StringEquals": {"sts:ExternalId": self.account}}})

    @property
    def role_policy_name(self) -> str:
        return f"{self.role_name}-s3"

    def role_policy(self) -> Dict[str, Any]:
        """What Firehose needs to write objects, on this bucket only."""
        return _policy(_allow(
            ["s3:AbortMultipartUpload", "s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket",
             "s3:ListBucketMultipartUploads", "s3:PutObject"],
            [self.bucket_arn, f"{self.bucket_arn}/*"]))

    def destination(self, kind: str) -> Dict[str, Any]:
        """The stream's ``ExtendedS3DestinationConfiguration``. Objects are gzip either way,
        which Athena reads by the extension: Firehose compresses the client's plain lines, or
        stores the client's gzip members as they are (``compression="gzip"``)."""
        return {
            "BucketARN": self.bucket_arn, "RoleARN": self.role_arn,
            "Prefix": self.prefix(kind), "ErrorOutputPrefix": self.error_prefix(kind),
            "BufferingHints": {"IntervalInSeconds": BUFFER_SECONDS, "SizeInMBs": BUFFER_MIB},
            "CompressionFormat": "UNCOMPRESSED" if self.compression == "gzip" else "GZIP",
            "FileExtension": ".jsonl.gz",
        }

    def database_input(self) -> Dict[str, Any]:
        return {"Name": self.database,
                "Description": f"dxtrack records of stage {self.stage}, one table per stream"}

    def table_input(self, kind: str) -> Dict[str, Any]:
        """An external table over a stream's objects: one JSON record a line, the day of
        arrival projected as partition ``dt`` (no crawler, no ``MSCK REPAIR``)."""
        location = f"s3://{self.bucket}/{kind}/"
        when = "timestamp" if self.timestamp_format == "datetime" else "double"
        columns = _COMMON + _COLUMNS[kind] + [("metadata", "string"), ("timestamp", when)]
        return {
            "Name": kind, "TableType": "EXTERNAL_TABLE",
            "Description": f"dxtrack {kind} records, one a line; metadata is JSON text",
            "PartitionKeys": [{"Name": "dt", "Type": "string"}],
            "Parameters": {
                "classification": "json", "compressionType": "gzip",
                "projection.enabled": "true", "projection.dt.type": "date",
                "projection.dt.format": "yyyy-MM-dd", "projection.dt.range": "2020-01-01,NOW",
                "projection.dt.interval": "1", "projection.dt.interval.unit": "DAYS",
                "storage.location.template": location + "dt=${dt}/",
            },
            "StorageDescriptor": {
                "Columns": [{"Name": name, "Type": type_} for name, type_ in columns],
                "Location": location,
                "InputFormat": "org.apache.hadoop.mapred.TextInputFormat",
                "OutputFormat": "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat",
                "SerdeInfo": {"SerializationLibrary": _SERDE,
                              "Parameters": {"ignore.malformed.json": "true"}},
            },
        }

    # Who may do what.
    def producer_policy(self) -> Dict[str, Any]:
        """What a program sending records needs, and nothing more."""
        return _policy(_allow(["firehose:PutRecordBatch", "firehose:DescribeDeliveryStream"],
                              [self.stream_arn(kind) for kind in STREAMS]))

    def setup_policy(self) -> Dict[str, Any]:
        """What ``dxtrack setup`` needs to create or update this stage."""
        tables = [self._glue_arn(f"table/{self.database}/{kind}") for kind in STREAMS]
        return _policy(
            _allow(["sts:GetCallerIdentity"], ["*"]),
            _allow(_SETUP_ACTIONS["s3"], [self.bucket_arn]),
            _allow(_SETUP_ACTIONS["iam"], [self.role_arn]),
            _allow(["iam:PassRole"], [self.role_arn],
                   Condition={"StringEquals": {"iam:PassedToService": "firehose.amazonaws.com"}}),
            _allow(_SETUP_ACTIONS["firehose"], [self.stream_arn(kind) for kind in STREAMS]),
            _allow(_SETUP_ACTIONS["glue"], [self._glue_arn("catalog"),
                                            self._glue_arn(f"database/{self.database}")] + tables),
        )


#: CloudFormation's pseudo parameters that stand for what ``setup`` looks up.
PSEUDO = {"account": "${AWS::AccountId}", "region": "${AWS::Region}",
          "partition": "${AWS::Partition}"}


def template(config: Config, bucket: Optional[str] = None) -> Dict[str, Any]:
    """The stage's landing zone as a CloudFormation template, built from the same definitions
    as ``setup``: ARNs and the default bucket name are ``Fn::Sub`` of pseudo parameters."""
    landing = Landing.of(config, PSEUDO["account"], PSEUDO["region"], PSEUDO["partition"],
                         bucket)
    catalog = {"CatalogId": {"Ref": "AWS::AccountId"}}
    encryption = [{"ServerSideEncryptionByDefault": rule["ApplyServerSideEncryptionByDefault"]}
                  for rule in landing.encryption()["Rules"]]
    resources: Dict[str, Any] = {
        "Bucket": _resource("AWS::S3::Bucket", {
            "BucketName": landing.bucket,
            "PublicAccessBlockConfiguration": landing.public_access_block(),
            "BucketEncryption": {"ServerSideEncryptionConfiguration": encryption},
        }),
        "FirehoseRole": _resource("AWS::IAM::Role", {
            "RoleName": landing.role_name, "AssumeRolePolicyDocument": landing.trust_policy(),
            "Policies": [{"PolicyName": landing.role_policy_name,
                          "PolicyDocument": landing.role_policy()}],
        }),
        "Database": _resource("AWS::Glue::Database",
                              {**catalog, "DatabaseInput": landing.database_input()}),
    }
    for kind in STREAMS:
        title = kind.capitalize()
        resources[f"{title}Stream"] = _resource("AWS::KinesisFirehose::DeliveryStream", {
            "DeliveryStreamName": landing.stream(kind), "DeliveryStreamType": "DirectPut",
            "ExtendedS3DestinationConfiguration": landing.destination(kind),
        }, depends=["Bucket", "FirehoseRole"])
        resources[f"{title}Table"] = _resource("AWS::Glue::Table", {
            **catalog, "DatabaseName": landing.database, "TableInput": landing.table_input(kind),
        }, depends=["Database"])
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"dxtrack landing zone of stage {config.stage}: what 'dxtrack setup "
                       f"--stage {config.stage}' creates",
        "Resources": resources,
        "Outputs": {"Bucket": {"Value": {"Ref": "Bucket"}},
                    **{f"{kind.capitalize()}Stream": {"Value": landing.stream(kind)}
                       for kind in STREAMS}},
    }


def _resource(kind: str, properties: Dict[str, Any],
              depends: Optional[List[str]] = None) -> Dict[str, Any]:
    resource: Dict[str, Any] = {"Type": kind, "Properties": _substituted(properties)}
    if depends:
        resource["DependsOn"] = depends
    return resource


_PSEUDO = re.compile(r"\$\{AWS::")
_OTHER = re.compile(r"\$\{(?!AWS::)")


def _substituted(value: Any) -> Any:
    """``value`` with each string naming a pseudo parameter made an ``Fn::Sub`` (where any
    other ``${`` is written ``${!`` to stay literal)."""
    if isinstance(value, dict):
        return {key: _substituted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_substituted(item) for item in value]
    if isinstance(value, str) and _PSEUDO.search(value):
        return {"Fn::Sub": _OTHER.sub("${!", value)}
    return value
