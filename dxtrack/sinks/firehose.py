"""Delivery to Amazon Data Firehose with ``PutRecordBatch``.

Each :meth:`FirehoseSink.send` makes the calls one batch needs (one, almost
always), reads every response, and sorts the lines into delivered, to retry
(throttling, 5xx, connection trouble, entries with an ``ErrorCode``) and
failed (what retrying cannot fix: a missing stream, refused credentials).
Retrying itself is the pipeline's job. A line over the service's record limit
(the record builders never make one) is counted failed, not sent.

The boto3 client is created lazily in the process that uses it, and again
after a fork: a client, and its connection pool, is never shared across one.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from .._version import __version__
from ..config import DEFAULT_REGION, Config
from .base import DELIVERED, SendResult
from .packing import MAX_CALL_BYTES, MAX_CALL_RECORDS, MAX_RECORD_BYTES, Record, plan_calls

__all__ = ["Connection", "FirehoseSink", "connect"]

#: Error codes that say "try again later".
RETRYABLE_CODES = frozenset({
    "ServiceUnavailableException", "ThrottlingException", "Throttling", "LimitExceededException",
    "InternalFailure", "InternalFailureException", "InternalServerError", "RequestTimeout",
    "RequestTimeoutException", "RequestLimitExceeded", "TooManyRequestsException",
})
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
NO_CREDENTIALS = (
    "no AWS credentials were found: pass aws_access_key_id and aws_secret_access_key or "
    "profile_name to configure(), or set up boto3's default chain (environment, "
    "~/.aws/credentials, instance role)"
)
#: ... and when botocore refuses the request before sending it.
BAD_REQUEST = "botocore refused the request as built; this is a dxtrack bug, please report it"

#: Timeouts: a hung endpoint costs seconds, not minutes.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0


#: What botocore raises when a body cannot be parsed: its own ``ResponseParserError`` (not
#: a ``BotoCoreError``), or, in the JSON parser, ``UnicodeDecodeError`` for bytes that are
#: not UTF-8 and ``AttributeError`` / ``TypeError`` for JSON that is not an object.
UNREADABLE = (botocore.parsers.ResponseParserError, ValueError, TypeError, AttributeError,
              LookupError)


def answer_problem(response: Any, count: int) -> Optional[str]:
    """What keeps ``response`` from proving the delivery of ``count`` records, if anything.

    Firehose answers a PutRecordBatch with one entry per record, in request
    order, each carrying a ``RecordId`` (stored) or an ``ErrorCode`` (not).
    """
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
    """What :func:`connect` builds for one configuration."""

    session: boto3.session.Session
    #: The Firehose client, with dxtrack's timeouts and no retries of botocore's own.
    client: Any
    #: The region the client talks to.
    region: str


def connect(config: Config) -> Connection:
    """The boto3 session and Firehose client that ``config`` asks for.

    Credentials: explicit keys first, then ``profile_name``, then boto3's
    default chain (environment, config files, roles). Region: ``region_name``,
    else the session's, else :data:`~dxtrack.config.DEFAULT_REGION`. The sink
    sends with this client and ``dxtrack check`` inspects the same one, so the
    check sees what delivery will use. Nothing is sent (botocore does resolve
    the credentials while it builds the client).

    :raises botocore.exceptions.BotoCoreError: for a profile that does not
        exist, for example.
    """
    if config.aws_access_key_id:
        session = boto3.session.Session(
            aws_access_key_id=config.aws_access_key_id,
            aws_secret_access_key=config.aws_secret_access_key,
            aws_session_token=config.aws_session_token,
            region_name=config.region_name,
        )
    else:
        session = boto3.session.Session(
            profile_name=config.profile_name, region_name=config.region_name
        )
    region = session.region_name or DEFAULT_REGION
    client = session.client(
        "firehose",
        region_name=region,
        endpoint_url=config.endpoint_url,
        config=botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=2,
            retries={"mode": "standard", "total_max_attempts": 1},
            user_agent_extra=f"dxtrack/{__version__}",
        ),
    )
    return Connection(session, client, region)


class FirehoseSink:
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
        self.streams = {name: config.stream_name(name) for name in ("metric", "error")}
        self.region: Optional[str] = config.region_name
        self._client = client
        self._client_pid = os.getpid() if client is not None else None
        self._reset_counts()

    def _reset_counts(self) -> None:
        # Calls made, whatever their outcome; records and bytes that Firehose accepted.
        self._counts_pid = os.getpid()
        self._counts = {"put_record_batch_calls": 0, "firehose_records": 0, "bytes_sent": 0}

    # -- the client --------------------------------------------------------------
    def client(self) -> Any:
        """The boto3 Firehose client of this process, created on first use."""
        if self._client is None or self._client_pid != os.getpid():
            connection = connect(self.config)
            self.region = connection.region
            self._client = connection.client
            self._client_pid = os.getpid()
        return self._client

    def after_fork(self) -> None:
        """In a forked child: the parent's client and counters are the parent's."""
        self._client = None
        self._reset_counts()

    def drop_connection(self) -> Any:
        """An attempt was abandoned while it waited on its connection: the next one
        starts on a new client. Returns the old one, for the abandoned call to close
        once it returns."""
        client, self._client = self._client, None
        return client

    def _own_counts(self) -> Dict[str, int]:
        if self._counts_pid != os.getpid():  # forked without the hook having run
            self._reset_counts()
        return self._counts

    # -- sending -------------------------------------------------------------------
    def send(self, stream: str, lines: Sequence[bytes]) -> SendResult:
        name = self.streams[stream]
        try:
            client = self.client()
        except botocore.exceptions.BotoCoreError as exc:
            return SendResult(failed=len(lines), error=self._describe(name, exc, "check the "
                              "AWS profile and credentials given to configure()"))
        oversize = sum(1 for line in lines if len(line) > MAX_RECORD_BYTES)
        if oversize:  # the record builders never make one; refuse it rather than retry it
            lines = [line for line in lines if len(line) <= MAX_RECORD_BYTES]
        retry: List[bytes] = []
        failed = 0
        error: Optional[str] = None
        calls = list(plan_calls(lines, packed=self.packed, max_record_bytes=self.max_record_bytes))
        for index, call in enumerate(calls):
            outcome = self._put(client, name, call)
            if outcome is None:
                continue
            if isinstance(outcome, list):
                retry.extend(outcome)
                error = f"{name}: some records were refused for now (throttled or internal failure)"
                continue
            # The whole call failed: this call's lines and every later call's share its fate.
            rest = [line for later in calls[index:] for _, carried in later for line in carried]
            permanent, error = outcome
            if permanent:
                failed += len(rest)
            else:
                retry.extend(rest)
            break
        if oversize:
            failed += oversize
            error = (f"{error}; " if error else "") + (
                f"{oversize} line(s) for {name!r} exceed the Firehose record limit of "
                f"{MAX_RECORD_BYTES:,} bytes and were not sent"
            )
        if not retry and not failed:
            return DELIVERED
        return SendResult(retry=retry, failed=failed, error=error)

    def _put(self, client: Any, name: str, call: List[Record]) -> Any:
        """One call. None: all delivered; a list: lines to retry; (permanent, message)."""
        counts = self._own_counts()
        counts["put_record_batch_calls"] += 1
        try:
            response = client.put_record_batch(
                DeliveryStreamName=name, Records=[{"Data": data} for data, _ in call]
            )
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            permanent = code not in RETRYABLE_CODES and status < 500 and status != 429
            return permanent, self._describe(name, exc, ADVICE.get(code, ""))
        except (botocore.exceptions.NoCredentialsError,
                botocore.exceptions.PartialCredentialsError) as exc:
            return True, self._describe(name, exc, NO_CREDENTIALS)
        except botocore.exceptions.ParamValidationError as exc:
            return True, self._describe(name, exc, BAD_REQUEST)
        except botocore.exceptions.BotoCoreError as exc:  # connection trouble, timeouts
            return False, self._describe(name, exc, "")
        except UNREADABLE as exc:  # a body botocore could not parse as Firehose's
            advice = f"botocore could not read the answer; {check_endpoint(client)}"
            return False, self._describe(name, exc, advice)
        # Only a result per record proves delivery: a 200 with anything else (``{}``, an
        # HTML page, a body cut short) came from something that is not Firehose.
        problem = answer_problem(response, len(call))
        if problem:
            where = f"delivery stream {name!r} in region {self.region or DEFAULT_REGION!r}"
            return False, (
                f"PutRecordBatch to {where} got {describe_answer(response)} that is not "
                f"Firehose's: {problem}, so none of its {len(call)} record(s) counts as "
                f"delivered; {check_endpoint(client)}"
            )
        retry: List[bytes] = []
        for (data, carried), answer in zip(call, response["RequestResponses"]):
            if answer.get("ErrorCode"):
                retry.extend(carried)
            else:
                counts["firehose_records"] += 1
                counts["bytes_sent"] += len(data)
        return retry or None

    def _describe(self, name: str, exc: Exception, advice: str) -> str:
        where = f"delivery stream {name!r} in region {self.region or DEFAULT_REGION!r}"
        text = f"PutRecordBatch to {where} failed: {type(exc).__name__}: {exc}"
        return f"{text}; {advice}" if advice else text

    def stats(self) -> Dict[str, int]:
        """``put_record_batch_calls`` made (whatever their outcome) in this process, and the
        ``firehose_records`` and ``bytes_sent`` that Firehose accepted (what it bills and
        delivers: failed entries are counted again only when a retry gets them in)."""
        return dict(self._own_counts())

    def close(self) -> None:
        client, self._client = self._client, None
        close = getattr(client, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"FirehoseSink(streams={self.streams!r}, region={self.region!r})"
