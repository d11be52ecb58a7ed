"""Delivery to Amazon Data Firehose with ``PutRecordBatch`` (users' guide: docs/firehose.md).

:meth:`FirehoseSink.send` makes the calls a batch needs and sorts its lines into delivered,
to retry (throttling, 5xx, connection trouble, entries with an ``ErrorCode``) and failed (a
missing stream, refused credentials). The boto3 client is created lazily, and again after a
fork: a client and its connection pool are never shared across one.

:class:`PreparedBodies` writes each call's JSON body itself and hands it to botocore at
``before-call``, before botocore signs and sends it: botocore otherwise spends about as much
CPU on serializing a packed call (its base64 text scanned again by ``json.dumps``) as dxtrack
spends on everything else a line needs.
"""

from __future__ import annotations

import binascii
import contextlib
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import orjson

from .._version import __version__
from ..config import DEFAULT_REGION, Config
from .base import DELIVERED, SendResult, Sink
from .packing import (
    GZIP_MARGIN,
    MAX_CALL_BYTES,
    MAX_CALL_RECORDS,
    MAX_RECORD_BYTES,
    Gzip,
    Record,
    plan_calls,
)

__all__ = ["Connection", "FirehoseSink", "PreparedBodies", "Put", "connect", "session_for"]

#: Error codes that say "try again later".
RETRYABLE_CODES = frozenset({
    "ServiceUnavailableException", "ThrottlingException", "Throttling", "LimitExceededException",
    "InternalFailure", "InternalFailureException", "InternalServerError", "RequestTimeout",
    "RequestTimeoutException", "RequestLimitExceeded", "TooManyRequestsException"})
#: What to tell the user to check when the service refuses for good.
ADVICE = {
    "ResourceNotFoundException": "check that the delivery stream exists in this account and "
    "region, or set metric_stream / error_stream",
    "AccessDeniedException": "check that the credentials may call firehose:PutRecordBatch on it",
    "UnrecognizedClientException": "check the AWS access key id and secret",
    "InvalidSignatureException": "check the AWS secret access key",
    "ExpiredTokenException": "the session token has expired: refresh the credentials",
    "InvalidArgumentException": "a record was refused as invalid; this is a dxtrack bug, "
    "please report it",
}
#: ... when botocore finds no credentials at all ...
NO_CREDENTIALS = ("no AWS credentials were found: pass aws_access_key_id and "
                  "aws_secret_access_key or profile_name to configure(), or set up boto3's "
                  "default chain (environment, ~/.aws/credentials, instance role)")
#: ... and when botocore refuses the request before sending it.
BAD_REQUEST = "botocore refused the request as built; this is a dxtrack bug, please report it"

#: Timeouts: a hung endpoint costs seconds, not minutes.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0

#: What a call may raise: botocore's errors, and on a body it cannot parse its own
#: ``ResponseParserError`` (not a ``BotoCoreError``) or, in the JSON parser,
#: ``UnicodeDecodeError`` (not UTF-8) and ``AttributeError`` / ``TypeError`` (not an object).
CALL_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
               botocore.parsers.ResponseParserError, ValueError, TypeError, AttributeError,
               LookupError)


def answer_problem(response: Any, count: int) -> Optional[str]:
    """What keeps ``response`` from proving the delivery of ``count`` records, if anything:
    Firehose answers one entry per record, in order, with a ``RecordId`` or an ``ErrorCode``."""
    answers = response.get("RequestResponses") if isinstance(response, dict) else None
    if answers is None:
        return f"no RequestResponses (one result per record) for the {count} record(s) sent"
    if not isinstance(answers, list) or len(answers) != count:
        size = len(answers) if isinstance(answers, list) else type(answers).__name__
        return f"{size} RequestResponses for the {count} record(s) sent"
    for index, answer in enumerate(answers):
        if not isinstance(answer, dict) or not (answer.get("RecordId") or answer.get("ErrorCode")):
            return f"RequestResponses[{index}] has neither a RecordId nor an ErrorCode"
    return None


def describe_answer(response: Any) -> str:
    """``an HTTP 200 answer (text/html)``, as far as botocore's metadata tells."""
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    status = meta.get("HTTPStatusCode")
    kind = meta.get("HTTPHeaders", {}).get("content-type")
    text = f"an HTTP {status} answer" if status else "an answer"
    return f"{text} ({kind})" if kind else text


def check_endpoint(client: Any) -> str:
    """Advice for an answer that did not come from Firehose."""
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    endpoint = f"endpoint_url ({url})" if url else "endpoint_url"
    return (f"check {endpoint} and any HTTP proxy in the way (HTTPS_PROXY, HTTP_PROXY): "
            "something other than Firehose may be answering, such as a captive portal")


class Connection(NamedTuple):
    """What :func:`connect` builds: the session, the Firehose client and its region."""

    session: boto3.session.Session
    client: Any
    region: str


def session_for(config: Config) -> boto3.session.Session:
    """The boto3 session of ``config``: its keys, else its profile, else boto3's chain."""
    credentials: Dict[str, Any] = dict(
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        aws_session_token=config.aws_session_token,
    ) if config.aws_access_key_id else dict(profile_name=config.profile_name)
    return boto3.session.Session(region_name=config.region_name, **credentials)


def connect(config: Config) -> Connection:
    """The boto3 session and Firehose client that ``config`` asks for, used by the sink and
    by ``dxtrack check`` alike. Region: ``region_name``, else the session's, else
    :data:`~dxtrack.config.DEFAULT_REGION`. Nothing is sent, but botocore resolves the
    credentials: a profile that does not exist raises a ``BotoCoreError``.
    """
    session = session_for(config)
    region = session.region_name or DEFAULT_REGION
    settings = botocore.config.Config(  # dxtrack's timeouts, no retries of botocore's own
        connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT, max_pool_connections=2,
        retries={"mode": "standard", "total_max_attempts": 1},
        user_agent_extra=f"dxtrack/{__version__}",
    )
    client = session.client("firehose", region_name=region, endpoint_url=config.endpoint_url,
                            config=settings)
    return Connection(session, client, region)


class Put(NamedTuple):
    """What one PutRecordBatch call came to: delivered (the defaults), entries refused for
    now (``retry``: their lines), or a ``failure`` of the whole call, ``permanent`` or not."""

    retry: Sequence[bytes] = ()
    failure: Optional[str] = None
    permanent: bool = False


def judge(exc: Exception, client: Any) -> Tuple[bool, str]:
    """Whether a call that raised ``exc`` failed for good, and what to advise."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code not in RETRYABLE_CODES and status < 500 and status != 429, ADVICE.get(code, "")
    if isinstance(exc, (botocore.exceptions.NoCredentialsError,
                        botocore.exceptions.PartialCredentialsError)):
        return True, NO_CREDENTIALS
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return True, BAD_REQUEST
    if isinstance(exc, botocore.exceptions.BotoCoreError):  # connection trouble, timeouts
        return False, ""
    return False, f"botocore could not read the answer; {check_endpoint(client)}"


class BodyNotReplaced(Exception):
    """botocore sent a call without the body :class:`PreparedBodies` wrote for it."""


class PreparedBodies:
    """PutRecordBatch bodies written by dxtrack, for the clients it creates.

    The call goes through botocore as usual (its validation, endpoint, signing, sending,
    parsing, errors), with one empty placeholder record per record, which botocore
    serializes in microseconds. At ``before-call``, which botocore emits after serializing
    and before signing, the request's body is replaced with the one :meth:`call` wrote: the
    same JSON document botocore would have made of the real records (base64 text needs no
    escaping, so it is written straight into the JSON). A call whose body was not replaced
    raises :class:`BodyNotReplaced` once it returns (its answer is about the placeholders):
    the sink then counts the records as not delivered, retries them, and stops preparing.
    """

    #: The record botocore sees for each real one.
    _PLACEHOLDER: Dict[str, bytes] = {"Data": b""}

    def __init__(self) -> None:
        self._pending = threading.local()  # the body of this thread's call in progress
        #: The handler's id in the clients' event systems.
        self.unique_id = f"dxtrack-prepared-body-{id(self)}"

    def install(self, client: Any) -> None:
        client.meta.events.register("before-call.firehose.PutRecordBatch", self._replace,
                                    unique_id=self.unique_id)

    def _replace(self, params: Dict[str, Any], **_: Any) -> None:
        body = getattr(self._pending, "body", None)
        if body is not None:
            params["body"] = body
            self._pending.body = None  # done: call() checks

    def call(self, client: Any, name: str, data: Sequence[bytes]) -> Any:
        """``client.put_record_batch`` of records ``data`` to stream ``name``."""
        pending = self._pending
        encode = binascii.b2a_base64
        records = b",".join([b'{"Data":"%b"}' % encode(one, newline=False) for one in data])
        pending.body = b'{"DeliveryStreamName":%b,"Records":[%b]}' % (orjson.dumps(name), records)
        try:
            response = client.put_record_batch(
                DeliveryStreamName=name, Records=[self._PLACEHOLDER] * len(data))
            replaced = pending.body is None
        finally:
            pending.body = None
        if not replaced:
            raise BodyNotReplaced("botocore sent the call without dxtrack's body (it no longer "
                                  "emits before-call where dxtrack expects it)")
        return response


class FirehoseSink(Sink):
    """Sends lines to the stage's two delivery streams."""

    #: Calls go over the network: the worker bounds each attempt by the time its batch has,
    blocking_io = True
    #: ... and by this many seconds, a connect and a read (a trickling answer is given up on).
    attempt_timeout = CONNECT_TIMEOUT + READ_TIMEOUT

    def __init__(self, config: Config, *, client: Any = None) -> None:
        self.config = config
        self.packed = config.pack_records
        self.max_record_bytes = config.max_record_bytes
        # One batch from the buffer is one call: 4 MiB, and 500 lines when each is a record.
        self.max_batch_bytes = MAX_CALL_BYTES
        self.max_batch_lines = 1_000_000 if self.packed else MAX_CALL_RECORDS
        self.gzip = Gzip(config.max_record_bytes) if config.compression == "gzip" else None
        if self.gzip is not None:
            # Room for gzip's few bytes on a line that does not compress; and a batch of
            # 8 MiB of lines is still about one call once compressed.
            self.max_line_bytes = MAX_RECORD_BYTES - GZIP_MARGIN
            self.max_batch_bytes = 2 * MAX_CALL_BYTES
        self.streams = {name: config.stream_name(name) for name in ("metric", "error")}
        self.region: Optional[str] = config.region_name
        self._client = client
        #: Bodies written by dxtrack, for the clients it creates (a client given to it is
        #: left as it is: a botocore Stubber, say, checks the real records); None once
        #: botocore did not take one.
        self.prepared_bodies: Optional[PreparedBodies] = (
            PreparedBodies() if client is None else None)
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._counts = {"put_record_batch_calls": 0, "firehose_records": 0, "bytes_sent": 0,
                        "line_bytes_sent": 0}

    def client(self) -> Any:
        """The boto3 Firehose client, created on first use and after a fork or a drop."""
        if self._client is None:
            connection = connect(self.config)
            self.region = connection.region
            if self.prepared_bodies is not None:
                self.prepared_bodies.install(connection.client)
            self._client = connection.client
        return self._client

    def after_fork(self) -> None:
        """In a forked child: the parent's client and counters are the parent's."""
        self._client = None
        self._reset_counts()

    def drop_connection(self) -> None:
        """The next attempt starts on a new client; the abandoned one closes its own once
        its call returns (see :meth:`send`)."""
        self._client = None

    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        name = self.streams[stream]
        try:
            client = self.client()
        except botocore.exceptions.BotoCoreError as exc:
            return SendResult(failed=len(lines), refused=lines, error=self._describe(
                name, exc, "check the AWS profile and credentials given to configure()"))
        most = self.max_line_bytes
        oversize = 0
        # The record builders never make a longer line: refuse one rather than retry it. One
        # pass in C finds out; counted only if there is one.
        if max(map(len, lines), default=0) > most:
            oversize = sum(1 for line in lines if len(line) > most)
            lines = [line for line in lines if len(line) <= most]
        try:
            result = self._send_calls(client, name, lines)
        finally:
            if client is not self._client:  # dropped while this attempt was abandoned
                with contextlib.suppress(Exception):  # a connection that is gone already
                    client.close()
        if not oversize:
            return result
        note = (f"{oversize} line(s) for {name!r} exceed the Firehose record limit of "
                f"{most:,} bytes and were not sent")
        return SendResult(retry=result.retry, failed=result.failed + oversize,
                          error=f"{result.error}; {note}" if result.error else note,
                          refused=result.refused)

    def _send_calls(self, client: Any, name: str, lines: Sequence[bytes]) -> SendResult:
        """The calls ``lines`` need, in order; one that fails whole decides for the rest."""
        calls = list(plan_calls(lines, packed=self.packed, max_record_bytes=self.max_record_bytes,
                                gzip=self.gzip))
        retry: List[bytes] = []
        for index, call in enumerate(calls):
            put = self._put(client, name, call)
            retry.extend(put.retry)
            if put.failure is not None:
                rest = [line for later in calls[index:] for _, carried in later for line in carried]
                if put.permanent:
                    return SendResult(retry=retry, failed=len(rest), error=put.failure,
                                      refused=rest)
                return SendResult(retry=retry + rest, error=put.failure)
        if retry:
            return SendResult(retry=retry, error=f"{name}: some records were refused for now "
                              "(throttled or internal failure)")
        return DELIVERED

    def _put(self, client: Any, name: str, call: List[Record]) -> Put:
        """One PutRecordBatch call, and what it came to."""
        counts = self._counts
        counts["put_record_batch_calls"] += 1
        bodies = self.prepared_bodies
        try:
            if bodies is not None:
                response = bodies.call(client, name, [data for data, _ in call])
            else:
                response = client.put_record_batch(
                    DeliveryStreamName=name, Records=[{"Data": data} for data, _ in call])
        except CALL_ERRORS as exc:
            permanent, advice = judge(exc, client)
            return Put(failure=self._describe(name, exc, advice), permanent=permanent)
        except BodyNotReplaced as exc:
            self.prepared_bodies = None  # botocore's own serializer from now on
            return Put(failure=f"PutRecordBatch to {self._where(name)}: {exc}; sent again as "
                       "botocore builds it")
        # Only a result per record proves delivery: a 200 with anything else (``{}``, an
        # HTML page, a body cut short) came from something that is not Firehose.
        problem = answer_problem(response, len(call))
        if problem:
            return Put(failure=(
                f"PutRecordBatch to {self._where(name)} got {describe_answer(response)} that "
                f"is not Firehose's: {problem}, so none of its {len(call)} record(s) counts as "
                f"delivered; {check_endpoint(client)}"
            ))
        retry: List[bytes] = []
        for (data, carried), answer in zip(call, response["RequestResponses"]):
            if answer.get("ErrorCode"):
                retry.extend(carried)
            else:
                counts["firehose_records"] += 1
                counts["bytes_sent"] += len(data)
                counts["line_bytes_sent"] += sum(map(len, carried))
        return Put(retry=retry)

    def _where(self, name: str) -> str:
        return f"delivery stream {name!r} in region {self.region or DEFAULT_REGION!r}"

    def _describe(self, name: str, exc: Exception, advice: str) -> str:
        text = f"PutRecordBatch to {self._where(name)} failed: {type(exc).__name__}: {exc}"
        return f"{text}; {advice}" if advice else text

    def stats(self) -> Dict[str, int]:
        """This process's counters (docs/firehose.md)."""
        return dict(self._counts)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"FirehoseSink(streams={self.streams!r}, region={self.region!r})"
