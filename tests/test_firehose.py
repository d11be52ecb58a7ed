"""Delivery to Firehose against a real moto server on 127.0.0.1 (issue 4).

moto enforces none of Firehose's limits and never reports a partial failure
(see FACTS.md), so this file does both itself:

* :class:`CallLog` is a botocore ``before-sign`` handler on the sink's own
  client: it reads every PutRecordBatch request as it will go on the wire (the
  JSON body that dxtrack writes itself), even one that cannot be signed,
  checks it against the three limits and keeps its records.
* :class:`FaultInjector` is a ``before-send`` handler on the same client. It
  stands between botocore and the wire, so botocore parses its answers exactly
  as it would parse the service's: a throttled call gets a 503
  ``ServiceUnavailableException`` body; in a partially failed call the entries
  meant to succeed are forwarded to moto through a separate plain client (and
  land in S3 as they would), the others come back with an ``ErrorCode`` in a
  200 response. Calls with nothing to fail go to moto untouched. Being below
  botocore's retry layer, it would also see botocore retrying by itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import boto3
import botocore.awsrequest
import orjson
import pytest
from conftest import plain

from dxtrack import Config, DXTrack, MemorySink, RetryPolicy
from dxtrack.sinks.firehose import FirehoseSink, PreparedBodies

# Firehose's limits, from the service documentation (not from dxtrack's own constants).
MAX_CALL_RECORDS = 500
MAX_CALL_BYTES = 4 * 1024 * 1024
MAX_RECORD_BYTES = 1_024_000

EVENT_SEND = "before-send.firehose.PutRecordBatch"
EVENT_SIGN = "before-sign.firehose.PutRecordBatch"
ROLE = "arn:aws:iam::123456789012:role/dxtrack"
METRIC_STREAM = "dxtrack-metric-input-dev"
ERROR_STREAM = "dxtrack-error-input-dev"
TIMESTAMP = 1_700_000_000.0
LINE = re.compile(rb'\A(\{.*),"id":"([0-9a-f]{64})"\}\n\Z', re.S)


# -- helpers -----------------------------------------------------------------------------
class CallLog:
    """Every PutRecordBatch request a client sends, checked against the three limits.

    An exception in a handler becomes the call's exception (which dxtrack
    treats as a passing failure), so violations are also kept in a list that
    the test asserts empty at the end.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[str, List[bytes]]] = []
        self.violations: List[str] = []
        self._lock = threading.Lock()

    def attach(self, client: Any) -> CallLog:
        client.meta.events.register(EVENT_SIGN, self._check)
        return self

    def _check(self, request: Any, **_: Any) -> None:
        params = json.loads(request.body)
        datas = [base64.b64decode(record["Data"], validate=True)
                 for record in params.get("Records", [])]
        problems = []
        if not 1 <= len(datas) <= MAX_CALL_RECORDS:
            problems.append(f"{len(datas)} records in one call")
        total = sum(len(data) for data in datas)
        if total > MAX_CALL_BYTES:
            problems.append(f"{total:,} bytes in one call")
        problems += [f"a record of {len(d):,} bytes" for d in datas if len(d) > MAX_RECORD_BYTES]
        with self._lock:
            self.calls.append((params["DeliveryStreamName"], datas))
            self.violations.extend(problems)
        assert not problems, problems

    def records(self, stream: str) -> List[bytes]:
        return [data for name, datas in self.calls if name == stream for data in datas]

    def bodies(self, stream: str) -> List[bytes]:
        """What each call to ``stream`` should have left in S3: its records concatenated."""
        return [b"".join(datas) for name, datas in self.calls if name == stream]


class _Raw:
    """The ``raw`` of a canned botocore response."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def _http(request: Any, status: int, body: Dict[str, Any]) -> botocore.awsrequest.AWSResponse:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": "injected"}
    return botocore.awsrequest.AWSResponse(request.url, status, headers, _Raw(data))


CALL_ERRORS = {503: "ServiceUnavailableException", 500: "InternalFailure"}


def throttled(request: Any, status: int = 503) -> botocore.awsrequest.AWSResponse:
    """A call-level failure: 503 is Firehose's throttling, 500 an internal failure."""
    return _http(request, status, {"__type": CALL_ERRORS[status], "message": "Slow down."})


class FaultInjector:
    """Makes some PutRecordBatch calls fail as Firehose does under pressure (see module doc).

    :param failures: how many first attempts of a line fail (0 for most lines);
        a Firehose record fails while any line it carries still has failures due.
    :param throttle: call index -> HTTP status (503 or 500) of a whole-call failure.
    """

    def __init__(
        self, landing: Any, failures: Callable[[bytes], int], throttle: Dict[int, int]
    ) -> None:
        options = landing.client_options()
        options.pop("stage")
        self.forward = boto3.client("firehose", **options)
        self.failures = failures
        self.throttle = throttle
        self.calls = 0
        self.attempts: Counter = Counter()
        self.failed_lines = 0  # lines in entries answered with an ErrorCode
        self.throttled_lines = 0
        self.codes: Counter = Counter()

    def attach(self, client: Any) -> FaultInjector:
        client.meta.events.register(EVENT_SEND, self._answer)
        return self

    def _answer(self, request: Any, **_: Any) -> Optional[botocore.awsrequest.AWSResponse]:
        body = json.loads(request.body)
        sent = [base64.b64decode(record["Data"]) for record in body["Records"]]
        datas = [plain(data) for data in sent]  # the lines, of gzip members too
        index, self.calls = self.calls, self.calls + 1
        if index in self.throttle:
            status = self.throttle[index]
            self.throttled_lines += sum(data.count(b"\n") for data in datas)
            self.codes[f"call:{CALL_ERRORS[status]}"] += 1
            return throttled(request, status)
        codes = [self._fate(data) for data in datas]
        if not any(codes):
            return None  # the real request, to moto
        ok = [data for data, code in zip(sent, codes) if code is None]
        ids = iter([])
        if ok:
            answer = self.forward.put_record_batch(
                DeliveryStreamName=body["DeliveryStreamName"], Records=[{"Data": d} for d in ok]
            )
            ids = iter([entry["RecordId"] for entry in answer["RequestResponses"]])
        entries = []
        for data, code in zip(datas, codes):
            if code is None:
                entries.append({"RecordId": next(ids)})
            else:
                self.failed_lines += data.count(b"\n")
                self.codes[code] += 1
                entries.append({"ErrorCode": code, "ErrorMessage": "injected by the test"})
        failed = sum(1 for code in codes if code)
        return _http(request, 200, {
            "FailedPutCount": failed, "Encrypted": False, "RequestResponses": entries,
        })

    def _fate(self, data: bytes) -> Optional[str]:
        due = 0
        for line in data.splitlines(keepends=True):
            self.attempts[line] += 1
            if self.attempts[line] <= self.failures(line):
                due = max(due, self.failures(line))
        if not due:
            return None
        return "InternalFailure" if due > 1 else "ServiceUnavailableException"


def one_in(line: bytes) -> int:
    """About 1 line in 8 fails twice, 1 in 8 once (decided by the line's own hash)."""
    pick = hashlib.sha256(line).digest()[0] % 8
    return 2 if pick == 0 else 1 if pick == 1 else 0


def check_line(line: bytes) -> Dict[str, Any]:
    """The record in ``line``; its id must be the sha256 of the line without it."""
    match = LINE.match(line)
    assert match, line[:200]
    assert hashlib.sha256(match[1] + b"}").hexdigest() == match[2].decode()
    record = orjson.loads(line)
    assert record["id"] == match[2].decode()
    return record


def landed(landing: Any, stream: str) -> List[Dict[str, Any]]:
    """Every record in S3 under ``stream``'s prefix, ids checked and unique."""
    records = [check_line(line + b"\n") for line in landing.lines(stream)]
    ids = [record["id"] for record in records]
    assert len(set(ids)) == len(ids), "a record landed twice"
    return records


def values_of(landing: Any) -> List[int]:
    """The values of the metrics in S3, sorted (each must have landed once)."""
    return sorted(int(r["value"]) for r in landed(landing, "metric"))


def _aws(options: Dict[str, Any]) -> Dict[str, Any]:
    """The boto3 client keywords among configure() options."""
    keys = ("endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key")
    return {key: options[key] for key in keys if key in options}


def sink_config(landing: Any) -> Config:
    return Config(**dict(landing.client_options(), context="tests", run_id="run-1"))


def create_stream(landing: Any, name: str, prefix: str) -> None:
    bucket = landing.s3.list_buckets()["Buckets"][0]["Name"]
    landing.firehose.create_delivery_stream(
        DeliveryStreamName=name,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": ROLE, "BucketARN": f"arn:aws:s3:::{bucket}", "Prefix": f"{prefix}/",
        },
    )


def line_length_of(pad: int, **options: Any) -> int:
    """How long the line of :func:`padded_metric` is, measured through a MemorySink."""
    sink = MemorySink()
    probe = DXTrack()
    probe.configure(stage="dev", context="tests", run_id="run-1", sink=sink, **options)
    try:
        padded_metric(probe, 0, pad)
        assert probe.flush_metrics_buffer(timeout=10)
        return len(sink.lines("metric")[0])
    finally:
        probe.close(timeout=5)


def padded_metric(client: DXTrack, n: int, pad: int) -> None:
    """A metric whose line length is a constant plus ``pad`` (fixed-width fields)."""
    client.metric("size", 1.0, metadata={"n": f"{n:07d}", "pad": "x" * pad}, timestamp=TIMESTAMP)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpareServer:
    """A second moto server on a fixed port, stopped and started at will.

    moto keeps its state in module globals, so this server sees the same
    streams and bucket as the session's. Not ThreadedMotoServer itself: its
    ``stop()`` leaves the socket listening (connections would hang instead of
    being refused, and the port could not be bound again), and its ``start()``
    waits forever if the port cannot be bound. This is the same werkzeug
    server, bound in the caller's thread and closed on stop.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            assert self._thread is not None
            self._thread.join(10)


@pytest.fixture
def spare_server() -> Iterator[SpareServer]:
    """A moto server on a port of its own, not started: connections are refused until it is."""
    server = SpareServer(free_port())
    yield server
    server.stop()


#: Backoff in milliseconds, so retry tests take no time.
FAST_RETRY = RetryPolicy(backoff_base=0.002, backoff_cap=0.02)


def big_buffers() -> Dict[str, Any]:
    return dict(max_buffer_records=300_000, max_buffer_bytes=256 * 1024 * 1024)


class FailedAttempts:
    """Counts PutRecordBatch calls that raised in botocore (connection refused, say)."""

    def __init__(self, client: Any) -> None:
        self.errors: List[str] = []
        self._changed = threading.Condition()
        client.meta.events.register("after-call-error.firehose.PutRecordBatch", self._seen)

    def _seen(self, exception: BaseException, **_: Any) -> None:
        with self._changed:
            self.errors.append(type(exception).__name__)
            self._changed.notify_all()

    def wait(self, count: int, timeout: float = 20.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.errors) >= count, timeout)


def messages(caplog: pytest.LogCaptureFixture, *needles: str) -> List[str]:
    texts = [r.getMessage() for r in caplog.records if r.name == "dxtrack"]
    return [text for text in texts if all(needle in text for needle in needles)]


# -- records land as recorded ------------------------------------------------------------
class TestLanding:
    """Records land in S3 byte for byte, each stream under its own prefix."""

    @pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
    def test_metrics_and_errors_land_byte_for_byte(
        self, landing: Any, make_client: Any, packed: bool
    ) -> None:
        client = make_client(
            use_async_requests=True, pack_records=packed, max_record_bytes=4096,
            **landing.client_options(),
        )
        log = CallLog().attach(client.sink.client())
        for n in range(600):
            client.metric(
                f"rows.{n % 3}", n * 1.5, metadata={"n": n, "shop": "é🚀"}, timestamp=TIMESTAMP + n
            )
        problems = []
        for n in range(20):
            try:
                raise KeyError(f"missing {n}")
            except KeyError as exc:
                problems.append(exc)
        client.errors(problems, metadata={"page": 7})
        assert client.flush_metrics_buffer(timeout=30)

        assert log.violations == []
        for stream, name in (("metric", METRIC_STREAM), ("error", ERROR_STREAM)):
            # One S3 object per call, holding exactly the call's records concatenated.
            assert sorted(landing.objects(stream)) == sorted(log.bodies(name))
            for data in log.records(name):
                lines = data.splitlines(keepends=True)
                assert b"".join(lines) == data and all(line.endswith(b"\n") for line in lines)
                assert len(lines) == 1 or packed
        records = log.records(METRIC_STREAM)
        if packed:
            assert len(records) < 600 / 5
            assert max(len(data) for data in records) <= 4096
        else:
            assert len(records) == 600

        metrics = landed(landing, "metric")
        fields = sorted(
            (r["metadata"]["n"], r["metric_name"], r["value"], r["timestamp"]) for r in metrics
        )
        assert fields == [(n, f"rows.{n % 3}", n * 1.5, TIMESTAMP + n) for n in range(600)]
        shared = {(r["context"], r["run_id"], r["stage"], r["metadata"]["shop"]) for r in metrics}
        assert shared == {("tests", "run-1", "dev", "é🚀")}
        for body in landing.objects("metric"):  # one client thread: order kept within a call
            ns = [orjson.loads(line)["metadata"]["n"] for line in body.splitlines()]
            assert ns == sorted(ns)
        errors = landed(landing, "error")
        values = sorted(r["exception"]["value"] for r in errors)
        assert values == sorted(f"'missing {n}'" for n in range(20))
        assert {r["exception"]["type"] for r in errors} == {"KeyError"}
        assert all("raise KeyError" in r["exception"]["traceback"] for r in errors)
        assert all("metric_name" not in r for r in errors)

        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["retried"]) == (620, 0, 0)
        assert stats["put_record_batch_calls"] == len(log.calls)
        assert stats["firehose_records"] == sum(len(datas) for _, datas in log.calls)
        assert stats["bytes_sent"] == sum(len(d) for _, datas in log.calls for d in datas)

    def test_packing_changes_the_records_not_the_bytes(
        self, landing: Any, make_client: Any
    ) -> None:
        create_stream(landing, "unpacked-metrics", "unpacked")
        logs = {}
        for packed, stream in ((True, METRIC_STREAM), (False, "unpacked-metrics")):
            client = make_client(
                buffer_metrics=True, pack_records=packed, metric_stream=stream,
                **landing.client_options(),
            )
            logs[packed] = CallLog().attach(client.sink.client())
            for n in range(2_000):
                client.metric("same", n, metadata={"even": n % 2 == 0}, timestamp=TIMESTAMP)
            assert client.flush_metrics_buffer(timeout=30)
        packed_lines = sorted(landing.lines("metric"))
        assert len(packed_lines) == 2_000
        assert packed_lines == sorted(landing.lines("unpacked"))
        assert len(logs[True].records(METRIC_STREAM)) == 1
        assert len(logs[False].records("unpacked-metrics")) == 2_000


# -- the request body dxtrack writes ---------------------------------------------------------
class TestPreparedBodies:
    """PutRecordBatch bodies are written by dxtrack and handed to botocore before signing."""

    def test_the_body_is_what_botocore_would_send_for_the_records(self, landing: Any) -> None:
        client = boto3.client("firehose", **{k: v for k, v in landing.client_options().items()
                                             if k != "stage"})
        sent: List[bytes] = []
        client.meta.events.register(EVENT_SIGN, lambda request, **_: sent.append(request.body))
        data = [b"", b"x", bytes(range(256)) * 40, '"\\\n\u2028é🚀'.encode(), b"y" * 1000]
        prepared = PreparedBodies()
        prepared.install(client)
        answer = prepared.call(client, METRIC_STREAM, data)
        # botocore's own body for the same records (the handler leaves a plain call alone)
        client.put_record_batch(DeliveryStreamName=METRIC_STREAM,
                                Records=[{"Data": one} for one in data])
        assert len(sent) == 2 and sent[0] != sent[1]  # botocore writes its JSON with spaces
        assert json.loads(sent[0]) == json.loads(sent[1])
        assert [r.get("RecordId") is not None for r in answer["RequestResponses"]] == [True] * 5
        assert landing.objects("metric") == [b"".join(data), b"".join(data)]

    def test_a_body_botocore_did_not_take_is_sent_again_its_way(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        client = make_client(buffer_metrics=True, **landing.client_options())  # one batch
        sink_client = client.sink.client()
        log = CallLog().attach(sink_client)
        # As a botocore that no longer emits before-call there would: the body stays botocore's.
        sink_client.meta.events.unregister("before-call.firehose.PutRecordBatch",
                                           unique_id=client.sink.prepared_bodies.unique_id)
        for n in range(50):
            client.metric("rows", n, timestamp=TIMESTAMP)
        assert client.flush_metrics_buffer(timeout=30)
        # The first call went out with the empty placeholders (they land as nothing) and
        # counted as not delivered; the retry went as botocore builds it.
        assert [len(datas) for _, datas in log.calls] == [1, 1]
        assert log.calls[0][1] == [b""] and log.calls[1][1][0].count(b"\n") == 50
        assert sorted(r["value"] for r in landing.records("metric")) == [float(n) for n in
                                                                         range(50)]
        stats = client.stats()
        assert (stats["delivered"], stats["retried"], stats["failed"]) == (50, 50, 0)
        assert messages(caplog, "sent again as botocore builds it")


# -- the limits, on every call -----------------------------------------------------------
class TestLimits:
    """Every PutRecordBatch call stays within 500 records, 4 MiB, 1,000 KiB per record."""

    # Packed: 120,000 lines make calls full to 4 MiB. Unpacked: 30,000 make 60 calls of 500
    # records (a record per call to moto costs a quarter of a second a thousand).
    @pytest.mark.parametrize(("packed", "count"), [(True, 120_000), (False, 30_000)],
                             ids=["packed", "unpacked"])
    def test_a_volume_of_metrics(self, landing: Any, make_client: Any, packed: bool,
                                 count: int) -> None:
        client = make_client(
            use_async_requests=True, pack_records=packed, **big_buffers(),
            **landing.client_options(),
        )
        log = CallLog().attach(client.sink.client())
        for n in range(count):
            client.metric("volume", n)
        assert client.flush_metrics_buffer(timeout=60)
        assert log.violations == []
        assert sum(len(data.splitlines()) for data in log.records(METRIC_STREAM)) == count
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["dropped"]) == (count, 0, {})
        assert len(landing.lines("metric")) == count
        if packed:
            assert stats["firehose_records"] < count / 1_000

    @pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
    def test_error_records_near_the_record_limit(
        self, landing: Any, make_client: Any, packed: bool
    ) -> None:
        client = make_client(
            use_async_requests=True, pack_records=packed, **landing.client_options()
        )
        log = CallLog().attach(client.sink.client())
        huge = [ValueError("h" * 1_500_000) for _ in range(5)]  # cut to fit
        # The value appears twice (value and the traceback's last line): these fit as they are.
        near = [ValueError("n" * (505_000 + 1_000 * k)) for k in range(5)]
        small = [ValueError("small") for _ in range(5)]
        client.errors([e for trio in zip(huge, near, small) for e in trio])
        assert client.flush_metrics_buffer(timeout=60)
        assert log.violations == []
        records = log.records(ERROR_STREAM)
        assert max(len(data) for data in records) > 1_010_000
        assert max(len(line) + 1 for line in landing.lines("error")) <= MAX_RECORD_BYTES
        by_kind: Dict[str, List[str]] = {}
        for record in landed(landing, "error"):
            value = record["exception"]["value"]
            by_kind.setdefault(value[0], []).append(value)
        assert sorted(by_kind) == ["h", "n", "s"]
        assert all("cut by dxtrack" in value for value in by_kind["h"])
        assert len(by_kind["h"]) == 5
        assert sorted(map(len, by_kind["n"])) == [505_000 + 1_000 * k for k in range(5)]
        assert by_kind["s"] == ["small"] * 5

    @pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
    def test_mixed_sizes_up_to_exactly_the_record_limit(
        self, landing: Any, make_client: Any, packed: bool
    ) -> None:
        base = line_length_of(0)
        largest = MAX_RECORD_BYTES - base
        client = make_client(
            buffer_metrics=True, pack_records=packed, **big_buffers(), **landing.client_options()
        )
        log = CallLog().attach(client.sink.client())
        rng = random.Random(4)
        pads = [rng.randrange(0, 300) for _ in range(3_000)]
        pads += [rng.randrange(1_000, 300_000) for _ in range(30)]
        pads += [rng.randrange(largest - 40_000, largest) for _ in range(8)] + [largest] * 4
        rng.shuffle(pads)
        for n, pad in enumerate(pads):
            padded_metric(client, n, pad)
        assert client.flush_metrics_buffer(timeout=60)
        assert log.violations == []
        lengths = sorted(len(line) + 1 for line in landing.lines("metric"))
        assert lengths == sorted(base + pad for pad in pads)
        assert lengths[-4:] == [MAX_RECORD_BYTES] * 4
        assert client.stats()["failed"] == 0

    def test_a_metric_over_the_record_limit_is_refused_at_the_call(
        self, landing: Any, make_client: Any
    ) -> None:
        largest = MAX_RECORD_BYTES - line_length_of(0)
        client = make_client(**landing.client_options())
        with pytest.raises(ValueError, match="record limit"):
            padded_metric(client, 0, largest + 1)
        padded_metric(client, 1, largest)
        assert client.flush_metrics_buffer(timeout=30)
        assert [len(line) + 1 for line in landing.lines("metric")] == [MAX_RECORD_BYTES]
        assert client.stats()["enqueued"] == 1

    def test_the_sink_refuses_an_oversize_line_and_sends_the_rest(self, landing: Any) -> None:
        sink = FirehoseSink(sink_config(landing))
        good = [b'{"n":%d}\n' % n for n in range(3)]
        result = sink.send("metric", [good[0], b"x" * MAX_RECORD_BYTES + b"\n", good[1], good[2]])
        assert (list(result.retry), result.failed) == ([], 1)
        assert "record limit" in (result.error or "")
        assert landing.lines("metric") == [line.rstrip(b"\n") for line in good]
        sink.close()


# -- partial failures and throttling -------------------------------------------------------
class TestRetries:
    """Failed entries and throttled calls are sent again until every record lands once."""

    @pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
    def test_partial_failures_and_throttling_deliver_every_record_once(
        self, landing: Any, make_client: Any, packed: bool
    ) -> None:
        client = make_client(
            use_async_requests=True, pack_records=packed, max_record_bytes=2048, retry_deadline=30,
            retry=FAST_RETRY, **landing.client_options(),
        )
        sink_client = client.sink.client()
        log = CallLog().attach(sink_client)
        faults = FaultInjector(landing, one_in, throttle={0: 503, 3: 500, 4: 503})
        faults.attach(sink_client)
        for n in range(3_000):
            client.metric("retried", n)
            if n % 300 == 0:
                try:
                    raise RuntimeError(f"boom {n}")
                except RuntimeError:
                    client.error({"n": n})
        assert client.flush_metrics_buffer(timeout=60)

        assert log.violations == []
        assert faults.codes["InternalFailure"] and faults.codes["ServiceUnavailableException"]
        assert faults.codes["call:ServiceUnavailableException"] == 2
        assert faults.codes["call:InternalFailure"] == 1
        assert values_of(landing) == list(range(3_000))
        assert sorted(r["metadata"]["n"] for r in landed(landing, "error")) == [
            n for n in range(3_000) if n % 300 == 0
        ]
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (3_010, 0, 0)
        assert stats["retried"] >= faults.failed_lines + faults.throttled_lines > 0
        # Calls made, whatever became of them; records and bytes as Firehose took them in.
        objects = landing.objects("metric") + landing.objects("error")
        assert stats["put_record_batch_calls"] == len(log.calls) == faults.calls
        assert stats["bytes_sent"] == sum(len(body) for body in objects)
        if not packed:
            assert stats["firehose_records"] == 3_010

    def test_only_failed_entries_are_sent_again(
        self, landing: Any, make_client: Any
    ) -> None:
        client = make_client(buffer_metrics=True, pack_records=False, retry=FAST_RETRY,
                             **landing.client_options())
        sink_client = client.sink.client()
        log = CallLog().attach(sink_client)
        failing = {b'"value":3.0', b'"value":7.0'}
        FaultInjector(landing, lambda line: int(any(f in line for f in failing)), {}).attach(
            sink_client
        )
        for n in range(10):
            client.metric("m", n)
        assert client.flush_metrics_buffer(timeout=30)
        sizes = [len(datas) for _, datas in log.calls]
        assert sizes == [10, 2]
        assert values_of(landing) == list(range(10))
        assert client.stats()["retried"] == 2

    def test_botocore_does_not_retry_behind_dxtrack(
        self, landing: Any, make_client: Any
    ) -> None:
        client = make_client(retry=FAST_RETRY, **landing.client_options())
        sent: List[int] = []

        def first_throttled(request: Any, **_: Any) -> Any:
            sent.append(1)
            return throttled(request) if len(sent) == 1 else None

        client.sink.client().meta.events.register(EVENT_SEND, first_throttled)
        client.metric("once", 1)
        assert client.flush_metrics_buffer(timeout=30)
        stats = client.stats()
        # Two requests, and dxtrack saw the first fail: botocore did not retry on its own.
        assert (len(sent), stats["retried"], stats["delivered"]) == (2, 1, 1)
        assert len(landed(landing, "metric")) == 1


# -- the endpoint goes away -------------------------------------------------------------------
class TestEndpointDown:
    """An endpoint that is down delays delivery, within bounds, and never reaches the caller."""

    def test_records_made_while_down_land_once_it_is_back(
        self, landing: Any, make_client: Any, spare_server: SpareServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        options = dict(landing.client_options(), endpoint_url=spare_server.url)
        client = make_client(use_async_requests=True, retry_deadline=30, retry=FAST_RETRY,
                             **options)
        attempts = FailedAttempts(client.sink.client())
        started = time.monotonic()
        for n in range(200):
            client.metric("outage", n)
        try:
            raise OSError("disk full")
        except OSError:
            client.error()
        assert time.monotonic() - started < 2.0
        assert attempts.wait(2)  # the second attempt comes after the first one's log line
        assert set(attempts.errors) == {"EndpointConnectionError"}
        assert not client.flush_metrics_buffer(timeout=0.1)  # nothing gets through while down
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (0, 0, 201)
        assert messages(caplog, "will retry", "EndpointConnectionError", spare_server.url)

        spare_server.start()
        # moto's state lives in this process: the restarted server has the fixture's streams.
        probe = boto3.client("firehose", **_aws(options))
        assert METRIC_STREAM in probe.list_delivery_streams()["DeliveryStreamNames"]
        assert client.flush_metrics_buffer(timeout=30)
        assert values_of(landing) == list(range(200))
        assert [r["exception"]["value"] for r in landed(landing, "error")] == ["disk full"]
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (201, 0, 0)
        assert stats["retried"] > 0

    def test_past_the_retry_deadline_records_count_as_failed(
        self, landing: Any, make_client: Any, spare_server: SpareServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        options = dict(landing.client_options(), endpoint_url=spare_server.url)
        client = make_client(use_async_requests=True, retry_deadline=0.3, retry=FAST_RETRY,
                             **options)
        for n in range(50):
            client.metric("lost", n)
        client.errors([ValueError("lost too")])
        started = time.monotonic()
        assert not client.flush_metrics_buffer(timeout=20)
        assert time.monotonic() - started < 10
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (0, 51, 0)
        assert stats["retried"] > 0
        assert messages(caplog, "gave up", "retry_deadline")
        spare_server.start()  # back, but too late: nothing is sent twice or late
        assert client.flush_metrics_buffer(timeout=5)
        assert landing.lines("metric") == [] and landing.lines("error") == []

    def test_default_mode_waits_at_most_sync_timeout(
        self, landing: Any, make_client: Any, spare_server: SpareServer
    ) -> None:
        options = dict(landing.client_options(), endpoint_url=spare_server.url)
        client = make_client(sync_timeout=0.2, retry_deadline=60, **options)  # default backoff
        for n in range(3):
            started = time.monotonic()
            client.metric("waits", n)
            assert time.monotonic() - started < 1.0
        started = time.monotonic()
        try:
            {}["key"]
        except KeyError:
            client.error()
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        assert client.close(timeout=0.5) is False  # wakes the worker out of its backoff
        assert time.monotonic() - started < 2.0
        assert client.stats()["delivered"] == 0


# -- what retrying cannot fix -------------------------------------------------------------------
class TestPermanentErrors:
    """A missing stream or unusable credentials: counted, logged once, no retry loop."""

    def test_missing_stream(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        client = make_client(
            metric_stream="no-such-stream", sync_timeout=5, **landing.client_options()
        )
        log = CallLog().attach(client.sink.client())
        for n in range(5):  # default mode: the first call waits for its failure ...
            started = time.monotonic()
            client.metric("nowhere", n)
            assert time.monotonic() - started < 2.0
            if n == 0:
                assert client.stats()["failed"] == 1
        # ... and the stream is then in an outage: the next four did not wait, so they
        # queued together and went in one batch. The error stream is not in an outage.
        try:
            raise ValueError("still recorded")
        except ValueError:
            client.error()
        assert client.stats()["delivered"] == 1
        assert not client.flush_metrics_buffer(timeout=10)  # the job can tell

        stats = client.stats()
        outcome = (stats["failed"], stats["delivered"], stats["retried"], stats["pending"])
        assert outcome == (5, 1, 0, 0)
        names = [name for name, _ in log.calls]
        assert sorted(names) == [ERROR_STREAM] + ["no-such-stream"] * 2
        assert names[0] == "no-such-stream"
        assert (stats["put_record_batch_calls"], stats["firehose_records"]) == (3, 1)
        logged = messages(caplog, "no-such-stream")
        assert len(logged) == 1, logged
        assert "'eu-west-1'" in logged[0] and "ResourceNotFoundException" in logged[0]
        assert "metric_stream" in logged[0]  # says what to check
        assert [r["exception"]["value"] for r in landed(landing, "error")] == ["still recorded"]

    def test_stream_in_another_region(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        client = make_client(**dict(landing.client_options(), region_name="ap-southeast-2"))
        for n in range(3):
            client.metric("elsewhere", n)
        assert not client.flush_metrics_buffer(timeout=10)
        assert client.stats()["failed"] == 3
        logged = messages(caplog, METRIC_STREAM, "'ap-southeast-2'")
        assert len(logged) == 1, messages(caplog)

    def test_keys_the_service_refuses(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        client = make_client(buffer_metrics=True, **landing.client_options())
        sent: List[int] = []

        def refuse(request: Any, **_: Any) -> Any:  # moto accepts any key; Firehose does not
            sent.append(1)
            return _http(request, 400, {
                "__type": "UnrecognizedClientException",
                "message": "The security token included in the request is invalid.",
            })

        client.sink.client().meta.events.register(EVENT_SEND, refuse)
        for flush in range(3):
            client.metric("refused", flush)
            assert not client.flush_metrics_buffer(timeout=10)
        stats = client.stats()
        assert (stats["failed"], stats["retried"], len(sent)) == (3, 0, 3)
        logged = messages(caplog, METRIC_STREAM, "'eu-west-1'", "UnrecognizedClientException")
        assert len(logged) == 1, messages(caplog)
        assert "check the AWS access key id" in logged[0]

    def test_profile_gone_by_the_first_send(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """configure() refuses a profile that does not exist; one removed after it fails here."""
        caplog.set_level(logging.WARNING, logger="dxtrack")
        options = dict(landing.client_options(), profile_name="nope", region_name="eu-central-1")
        del options["aws_access_key_id"], options["aws_secret_access_key"]
        credentials = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        with open(credentials, "w") as f:
            f.write("[nope]\naws_access_key_id = k\naws_secret_access_key = s\n")
        client = make_client(buffer_metrics=True, **options)
        os.remove(credentials)  # the boto3 session is made at the first send, without it
        for n in range(4):
            client.metric("unsent", n)
        try:
            raise ValueError("unsent")
        except ValueError:
            client.error()  # default mode: waits for its record, which fails at once
        assert not client.flush_metrics_buffer(timeout=10)
        stats = client.stats()
        assert (stats["failed"], stats["retried"], stats["put_record_batch_calls"]) == (5, 0, 0)
        logged = messages(caplog, "'eu-central-1'", "nope")
        assert len(logged) == 2, messages(caplog)  # once per stream
        assert {METRIC_STREAM in text or ERROR_STREAM in text for text in logged} == {True}
        assert all("profile" in text for text in logged)

    def test_no_credentials_at_all(
        self, landing: Any, make_client: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        options = dict(landing.client_options())
        del options["aws_access_key_id"], options["aws_secret_access_key"]
        client = make_client(sync_timeout=5, **options)
        log = CallLog().attach(client.sink.client())
        for n in range(4):  # default mode: the first waits; the stream is then in an outage
            started = time.monotonic()
            client.metric("unsigned", n)
            assert time.monotonic() - started < 2.0
        assert not client.flush_metrics_buffer(timeout=10)
        stats = client.stats()
        assert (stats["failed"], stats["retried"]) == (4, 0)
        sent = [line for _, datas in log.calls for data in datas for line in data.splitlines()]
        assert len(sent) == 4  # one attempt per record, none repeated
        logged = messages(caplog, METRIC_STREAM, "'eu-west-1'", "NoCredentialsError")
        assert len(logged) == 1, messages(caplog)
        assert "profile_name" in logged[0] and "aws_access_key_id" in logged[0]


# -- the client: credentials, region, streams, processes --------------------------------------
@pytest.fixture
def aws_files() -> Dict[str, str]:
    """A shared credentials and config file (in tmp_path, where the autouse fixture points)."""
    with open(os.environ["AWS_SHARED_CREDENTIALS_FILE"], "w") as f:
        f.write(
            "[default]\naws_access_key_id = default-key\naws_secret_access_key = default-secret\n"
            "[other]\naws_access_key_id = profile-key\naws_secret_access_key = profile-secret\n"
        )
    with open(os.environ["AWS_CONFIG_FILE"], "w") as f:
        f.write("[profile other]\nregion = us-west-2\n")
    return {"default": "default-key", "other": "profile-key"}


def signed_as(client: DXTrack) -> Tuple[str, str]:
    """(access key id, region) of the first PutRecordBatch request the client sends."""
    seen: List[str] = []

    def capture(request: Any, **_: Any) -> None:
        header = request.headers["Authorization"]
        seen.append(header.decode() if isinstance(header, bytes) else header)

    client.sink.client().meta.events.register(EVENT_SEND, capture)
    client.metric("whoami", 1)
    client.flush_metrics_buffer(timeout=10)
    assert seen, "no request was sent"
    key, _, region = re.search(r"Credential=([^,]+)", seen[0])[1].split("/")[:3]
    return key, region


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class TestClientSetup:
    """Credentials, region and stream names are resolved as documented; one client per process."""

    def test_explicit_keys_win_over_a_profile(
        self, landing: Any, make_client: Any, aws_files: Dict[str, str]
    ) -> None:
        client = make_client(
            **dict(landing.client_options(), aws_access_key_id="explicit-key", profile_name="other")
        )
        assert signed_as(client) == ("explicit-key", "eu-west-1")
        assert len(landed(landing, "metric")) == 1

    def test_a_profile_gives_keys_and_region(
        self, landing: Any, make_client: Any, aws_files: Dict[str, str]
    ) -> None:
        client = make_client(stage="dev", endpoint_url=landing.url, profile_name="other")
        assert signed_as(client) == ("profile-key", "us-west-2")

    def test_region_name_wins_over_the_profile_region(
        self, landing: Any, make_client: Any, aws_files: Dict[str, str]
    ) -> None:
        client = make_client(
            stage="dev", endpoint_url=landing.url, profile_name="other", region_name="eu-west-1"
        )
        assert signed_as(client) == ("profile-key", "eu-west-1")
        assert len(landed(landing, "metric")) == 1

    def test_default_chain_and_default_region(
        self, landing: Any, make_client: Any, aws_files: Dict[str, str]
    ) -> None:
        client = make_client(stage="dev", endpoint_url=landing.url)
        assert signed_as(client) == ("default-key", "eu-west-1")
        assert client.sink.client().meta.region_name == "eu-west-1"
        assert len(landed(landing, "metric")) == 1

    def test_stream_names_can_be_overridden(self, landing: Any, make_client: Any) -> None:
        create_stream(landing, "team-metrics", "team-metric")
        create_stream(landing, "team-errors", "team-error")
        client = make_client(
            metric_stream="team-metrics", error_stream="team-errors", **landing.client_options()
        )
        client.metric("custom", 1)
        client.errors([ValueError("custom")])
        assert client.flush_metrics_buffer(timeout=10)
        assert [r["metric_name"] for r in landed(landing, "team-metric")] == ["custom"]
        assert [r["exception"]["value"] for r in landed(landing, "team-error")] == ["custom"]
        assert landing.lines("metric") == [] and landing.lines("error") == []

    def test_the_client_is_created_lazily_and_once(
        self, landing: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        made: List[str] = []
        real = boto3.session.Session.client

        def spy(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
            made.append(service_name)
            return real(self, service_name, *args, **kwargs)

        monkeypatch.setattr(boto3.session.Session, "client", spy)
        client = make_client(**landing.client_options())
        assert made == []
        for n in range(3):
            client.metric("lazy", n)
        assert client.flush_metrics_buffer(timeout=10)
        assert made == ["firehose"]

    @needs_fork
    def test_a_forked_child_makes_its_own_client(self, landing: Any, make_client: Any) -> None:
        client = make_client(**landing.client_options())
        parent_client = client.sink.client()
        client.metric("parent", 1)
        assert client.flush_metrics_buffer(timeout=10)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            status = "crashed"
            try:
                own = client.sink.client()
                status = "shared client" if own is parent_client else "own client"
                client.metric("child", 2)
                if not client.flush_metrics_buffer(timeout=10):
                    status += ", not delivered"
                status += f", {client.stats()['put_record_batch_calls']} call(s)"
            finally:
                os.write(write, status.encode())
                os._exit(0)
        os.close(write)
        _, code = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            assert pipe.read() == b"own client, 1 call(s)"  # its own call, not the parent's too
        assert code == 0
        assert client.sink.client() is parent_client
        assert client.stats()["put_record_batch_calls"] == 1
        assert sorted(r["metric_name"] for r in landed(landing, "metric")) == ["child", "parent"]

    @needs_fork
    def test_a_sink_used_alone_starts_afresh_after_its_fork_hook(self, landing: Any) -> None:
        sink = FirehoseSink(sink_config(landing))
        parent_client = sink.client()
        assert sink.send("metric", [b'{"from":"parent"}\n']).error is None
        pid = os.fork()
        if pid == 0:  # no pipeline: the child calls the hook a pipeline's fork hook calls
            own = delivered = counted = False
            try:
                sink.after_fork()
                own = sink.client() is not parent_client
                delivered = sink.send("metric", [b'{"from":"child"}\n']).error is None
                counted = sink.stats()["put_record_batch_calls"] == 1  # its own call only
            finally:
                os._exit(0 if own and delivered and counted else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert sink.client() is parent_client
        assert sorted(landing.lines("metric")) == [b'{"from":"child"}', b'{"from":"parent"}']
        sink.close()
