"""What ``dxtrack setup`` does: make a stage's landing zone (:mod:`dxtrack.landing`) exist in
an AWS account, one resource at a time, and idempotently.

Each resource is read first. A missing one is created; one that matches is left alone; one
that differs is reported and changed only with ``update``. ``dry_run`` reads and changes
nothing. Every step is one line of output; :meth:`Setup.run` returns how many resources
differ and were left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from typing import Any, Callable, Dict, Optional

import botocore.config
import botocore.exceptions

from .config import DEFAULT_REGION, Config
from .landing import STREAMS, Landing, differences
from .sinks.firehose import session_for

__all__ = ["Setup", "SetupError"]

#: How long a new stream may take to become ACTIVE (about a minute in AWS), and how long
#: Firehose may take to see a new role (IAM is eventually consistent).
ACTIVE_TIMEOUT, ROLE_TIMEOUT, POLL = 300.0, 60.0, 5.0
#: A call's connect and read timeouts (three attempts each): an endpoint that answers nothing
#: ends setup within a minute, where botocore's defaults would take three.
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 15.0
_MISSING = ("NoSuchBucket", "404", "NoSuchEntity", "ResourceNotFoundException",
            "EntityNotFoundException")


class SetupError(Exception):
    """A step that cannot go on: refused by AWS (``code`` is its error code), or a resource
    setup must not touch."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _refused(service: str, operation: str, exc: botocore.exceptions.ClientError) -> SetupError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    advice = ""
    if code in ("AccessDenied", "AccessDeniedException"):
        advice = "; 'dxtrack setup --print-policy setup' prints what setup needs"
    return SetupError(f"{service} {operation} failed: {exc}{advice}", code)


class Setup:
    """The stage's resources, read and made through one boto3 session."""

    def __init__(self, config: Config, *, bucket: Optional[str] = None, update: bool = False,
                 dry_run: bool = False, say: Callable[[str], None] = print,
                 active_timeout: float = ACTIVE_TIMEOUT, session: Any = None) -> None:
        try:
            session = session or session_for(config)  # one given is reused (tests, demo)
        except botocore.exceptions.BotoCoreError as exc:  # a profile that is not there
            raise SetupError(f"{type(exc).__name__}: {exc}; check --profile") from None
        self.region = session.region_name or DEFAULT_REGION
        settings = botocore.config.Config(connect_timeout=CONNECT_TIMEOUT,
                                          read_timeout=READ_TIMEOUT,
                                          retries={"mode": "standard", "total_max_attempts": 3})
        self._clients = {service: session.client(service, region_name=self.region,
                                                 endpoint_url=config.endpoint_url,
                                                 config=settings)
                         for service in ("sts", "s3", "iam", "firehose", "glue")}
        self.config, self.update, self.dry_run, self.say = config, update, dry_run, say
        self.active_timeout = active_timeout
        identity = self._call("sts", "get_caller_identity")
        self.landing = Landing.of(config, identity["Account"], self.region,
                                  identity["Arn"].split(":")[1], bucket)
        self.counts: Counter[str] = Counter()
        self.adopted = None if bucket else self._bucket_in_use()
        if self.adopted:
            self.landing = dataclasses.replace(self.landing, bucket_name=self.adopted)

    def _bucket_in_use(self) -> Optional[str]:
        """The bucket the stage's existing streams deliver to, when no ``--bucket`` is given:
        a run without ``--bucket`` after one with it finds the same bucket."""
        for kind in STREAMS:
            found = self._read("firehose", "describe_delivery_stream",
                               DeliveryStreamName=self.landing.stream(kind))
            if found is not None:
                first = (found["DeliveryStreamDescription"].get("Destinations") or [{}])[0]
                arn = first.get("ExtendedS3DestinationDescription", {}).get("BucketARN", "")
                if arn.startswith("arn:") and arn.rpartition(":")[2] != self.landing.bucket:
                    return str(arn.rpartition(":")[2])
        return None

    def run(self) -> int:
        """Make (or, dry, plan) every resource; returns how many differ and were left."""
        land = self.landing
        what = "plan" if self.dry_run else "setup"
        self.say(f"dxtrack {what}: stage {land.stage!r}, account {land.account}, "
                 f"region {self.region}")
        if self.adopted:
            self.say(f"  (bucket {self.adopted}: the one the stage's streams deliver to)")
        self._bucket()
        self._role()
        for kind in STREAMS:
            self._stream(kind)
        self._apply(f"Glue database {land.database}", self._read_database(),
                    {"Name": land.database},  # a database found by its name is the one
                    lambda: self._call("glue", "create_database",
                                       DatabaseInput=land.database_input()),
                    lambda: None)
        for kind in STREAMS:
            self._table(kind)
        done = ", ".join(f"{count} {state}" for state, count in sorted(self.counts.items()))
        if set(self.counts) == {"unchanged"}:
            done = f"nothing to change, all {self.counts['unchanged']} are as setup makes them"
        self.say(f"{'plan' if self.dry_run else 'done'}: {done}")
        return self.counts["left as they are"]

    # One resource each.
    def _bucket(self) -> None:
        land = self.landing
        want = {"PublicAccessBlock": land.public_access_block(), "Encrypted": True}

        def create() -> None:
            where = {} if self.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            self._call("s3", "create_bucket", Bucket=land.bucket, **where)
            fix()

        def fix() -> None:
            self._call("s3", "put_public_access_block", Bucket=land.bucket,
                       PublicAccessBlockConfiguration=land.public_access_block())
            self._call("s3", "put_bucket_encryption", Bucket=land.bucket,
                       ServerSideEncryptionConfiguration=land.encryption())

        self._apply(f"bucket {land.bucket}", self._read_bucket(), want, create, fix)

    def _read_bucket(self) -> Optional[Dict[str, Any]]:
        bucket = self.landing.bucket
        if self._read("s3", "head_bucket", Bucket=bucket) is None:
            return None
        block = self._read("s3", "get_public_access_block", Bucket=bucket) or {}
        encryption = self._read("s3", "get_bucket_encryption", Bucket=bucket) or {}
        rules = encryption.get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
        return {"PublicAccessBlock": block.get("PublicAccessBlockConfiguration", {}),
                "Encrypted": bool(rules)}  # any default encryption will do, KMS included

    def _role(self) -> None:
        land = self.landing
        have = self._read("iam", "get_role", RoleName=land.role_name)
        if have is not None:
            policy = self._read("iam", "get_role_policy", RoleName=land.role_name,
                                PolicyName=land.role_policy_name) or {}
            have = {"Trust": have["Role"].get("AssumeRolePolicyDocument"),
                    "Policy": policy.get("PolicyDocument")}

        def put_policy() -> None:
            self._call("iam", "put_role_policy", RoleName=land.role_name,
                       PolicyName=land.role_policy_name,
                       PolicyDocument=json.dumps(land.role_policy()))

        def create() -> None:
            self._call("iam", "create_role", RoleName=land.role_name,
                       AssumeRolePolicyDocument=json.dumps(land.trust_policy()),
                       Description=f"Firehose writes dxtrack's {land.stage} records to S3")
            put_policy()

        def fix() -> None:
            self._call("iam", "update_assume_role_policy", RoleName=land.role_name,
                       PolicyDocument=json.dumps(land.trust_policy()))
            put_policy()

        label = f"role {land.role_name}"
        if have and have["Policy"] is None and have["Trust"] == land.trust_policy():
            if not self.dry_run:  # what a run that stopped after create_role leaves
                put_policy()
            self._count(label, "to create" if self.dry_run else "created",
                        f"its policy {land.role_policy_name} "
                        f"{'to create' if self.dry_run else 'created'} (the role had none)")
            return
        self._apply(label, have, {"Trust": land.trust_policy(), "Policy": land.role_policy()},
                    create, fix)

    def _stream(self, kind: str) -> None:
        land = self.landing
        name, destination = land.stream(kind), land.destination(kind)
        label = f"{kind} stream {name}"
        found = self._read("firehose", "describe_delivery_stream", DeliveryStreamName=name)
        have = None
        if found is not None:
            description = found["DeliveryStreamDescription"]
            if description.get("DeliveryStreamType") != "DirectPut":
                self._count(label, "left as they are", "DIFFERS, and setup cannot change it: "
                            f"it reads from {description.get('DeliveryStreamType')}, where "
                            "dxtrack needs a Direct PUT stream; delete it, or name another "
                            f"with DXTRACK_{kind.upper()}_STREAM")
                return
            if description.get("DeliveryStreamStatus") == "CREATING" and not self.dry_run:
                self._wait_active(name)  # an earlier run that stopped while it was made
            first = (description.get("Destinations") or [{}])[0]
            have = {"Destination": first.get("ExtendedS3DestinationDescription", {})}

        def create() -> None:
            deadline = time.monotonic() + ROLE_TIMEOUT
            while True:
                try:
                    self._call("firehose", "create_delivery_stream", DeliveryStreamName=name,
                               DeliveryStreamType="DirectPut",
                               ExtendedS3DestinationConfiguration=destination)
                    break
                except SetupError as exc:  # a new role that Firehose cannot assume yet
                    if (exc.code != "InvalidArgumentException" or "assume" not in str(exc)
                            or time.monotonic() > deadline):
                        raise
                    time.sleep(POLL)
            self._wait_active(name)

        def fix() -> None:
            current = found["DeliveryStreamDescription"] if found else {}
            self._call("firehose", "update_destination", DeliveryStreamName=name,
                       CurrentDeliveryStreamVersionId=current["VersionId"],
                       DestinationId=current["Destinations"][0]["DestinationId"],
                       ExtendedS3DestinationUpdate=destination)

        self._apply(label, have, {"Destination": destination}, create, fix)

    def _wait_active(self, name: str) -> None:
        deadline = time.monotonic() + self.active_timeout
        while True:
            answer = self._call("firehose", "describe_delivery_stream", DeliveryStreamName=name)
            status = answer["DeliveryStreamDescription"]["DeliveryStreamStatus"]
            if status == "ACTIVE":
                return
            if status.endswith("FAILED") or time.monotonic() > deadline:
                raise SetupError(f"stream {name} is {status}, not ACTIVE; see it in the "
                                 "Firehose console, then run setup again")
            time.sleep(POLL)

    def _read_database(self) -> Optional[Dict[str, Any]]:
        found = self._read("glue", "get_database", Name=self.landing.database)
        return None if found is None else {"Name": found["Database"]["Name"]}

    def _table(self, kind: str) -> None:
        land = self.landing
        table = land.table_input(kind)
        found = self._read("glue", "get_table", DatabaseName=land.database, Name=kind)

        def create() -> None:
            self._call("glue", "create_table", DatabaseName=land.database, TableInput=table)

        def fix() -> None:
            self._call("glue", "update_table", DatabaseName=land.database, TableInput=table)

        self._apply(f"table {land.database}.{kind}", found and found["Table"], table,
                    create, fix)

    # The common steps.
    def _apply(self, label: str, have: Optional[Dict[str, Any]], want: Dict[str, Any],
               create: Callable[[], None], fix: Callable[[], None]) -> None:
        if have is None:
            if not self.dry_run:
                create()
            self._count(label, "to create" if self.dry_run else "created")
            return
        problems = differences(want, have)
        if not problems:
            self._count(label, "unchanged", "exists as setup makes it")
            return
        detail = "; ".join(problems)
        if not self.update:
            self._count(label, "left as they are",
                        f"DIFFERS, left as it is (--update changes it): {detail}")
        elif self.dry_run:
            self._count(label, "to update", f"differs, to update: {detail}")
        else:
            fix()
            self._count(label, "updated", f"updated: {detail}")

    def _count(self, label: str, state: str, detail: Optional[str] = None) -> None:
        self.counts[state] += 1
        self.say(f"  {label}: {detail or state}")

    def _call(self, service: str, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._clients[service], operation)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise _refused(service, operation, exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise SetupError(f"{service} {operation} failed: {type(exc).__name__}: {exc}; "
                             "check the credentials, --region and --endpoint-url") from None

    def _read(self, service: str, operation: str, **kwargs: Any) -> Optional[Dict[str, Any]]:
        """The answer, or None for a resource (or a bucket setting) that is not there."""
        try:
            return self._call(service, operation, **kwargs)  # type: ignore[no-any-return]
        except SetupError as exc:
            if exc.code in _MISSING or exc.code.startswith(("NoSuch", "ServerSideEncryption")):
                return None
            if operation == "head_bucket" and exc.code in ("403", "AccessDenied"):
                raise SetupError(f"bucket {kwargs['Bucket']} belongs to another account, or "
                                 "these credentials may not read it: name another with "
                                 "--bucket") from None
            raise

    def settings(self) -> Dict[str, Any]:
        """The ``configure()`` arguments that send to this stage (besides context, run_id)."""
        config = self.config
        settings: Dict[str, Any] = {"stage": config.stage, "region_name": self.region}
        for option in ("profile_name", "endpoint_url", "metric_stream", "error_stream"):
            if getattr(config, option):
                settings[option] = getattr(config, option)
        if config.compression != "none":
            settings["compression"] = config.compression
        return settings
