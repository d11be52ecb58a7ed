"""The test proxy itself: it forwards faithfully, misbehaves on cue and leaves no thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import boto3
import botocore.config
import botocore.exceptions
import pytest
from faultproxy import (
    FaultProxy,
    answer,
    empty,
    failure,
    forward,
    mixed,
    partial,
    refuse,
    reset,
    slow,
    throttle_entries,
    throttled,
    trickle,
)

STREAM = "dxtrack-metric-input-dev"


@pytest.fixture
def proxy(landing: Any, moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=moto_url) as proxy:
        yield proxy


@pytest.fixture
def firehose(landing: Any, proxy: FaultProxy) -> Any:
    """A plain boto3 client through the proxy, without botocore's own retries."""
    options = dict(landing.client_options(), endpoint_url=proxy.url)
    del options["stage"]
    config = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})
    return boto3.client("firehose", config=config, **options)


def put(firehose: Any, *datas: bytes) -> Any:
    return firehose.put_record_batch(
        DeliveryStreamName=STREAM, Records=[{"Data": data} for data in datas]
    )


class TestFaultProxy:
    """Scripted behaviours come first, in order; then every request is forwarded."""

    def test_forwards_and_records(self, proxy: FaultProxy, firehose: Any, landing: Any) -> None:
        response = put(firehose, b"a\n", b"b\n")
        # moto's own answer, untouched: one RecordId per record (what delivery rests on).
        assert response["FailedPutCount"] == 0
        assert [sorted(entry) for entry in response["RequestResponses"]] == [["RecordId"]] * 2
        (seen,) = proxy.calls()
        assert (seen.method, seen.path) == ("POST", "/")
        assert seen.target == "Firehose_20150804.PutRecordBatch"
        assert seen.body["DeliveryStreamName"] == STREAM
        assert seen.records == [b"a\n", b"b\n"]
        assert landing.objects("metric") == [b"a\nb\n"]

    def test_script_then_always_then_forward(self, proxy: FaultProxy, firehose: Any) -> None:
        proxy.script(answer(200, b"{}"), reset())
        assert "RequestResponses" not in put(firehose, b"a\n")
        with pytest.raises(botocore.exceptions.ConnectionClosedError):
            put(firehose, b"b\n")
        assert len(put(firehose, b"c\n")["RequestResponses"]) == 1
        proxy.always(answer(503, b'{"__type": "ServiceUnavailableException"}'))
        with pytest.raises(botocore.exceptions.ClientError, match="ServiceUnavailable"):
            put(firehose, b"d\n")
        assert len(proxy.requests) == 4

    def test_partial_fails_the_given_entries_and_stores_the_rest(
        self, proxy: FaultProxy, firehose: Any, landing: Any
    ) -> None:
        proxy.script(partial([0, 2]))
        response = put(firehose, b"a\n", b"b\n", b"c\n")
        assert response["FailedPutCount"] == 2
        entries = response["RequestResponses"]
        assert [entry.get("ErrorCode") for entry in entries] == [
            "ServiceUnavailableException", None, "ServiceUnavailableException",
        ]
        assert "RecordId" in entries[1]
        assert landing.objects("metric") == [b"b\n"]

    def test_a_trickle_ends_when_the_proxy_closes(self, moto_url: str) -> None:
        before = set(threading.enumerate())
        with FaultProxy(upstream=moto_url) as proxy:
            proxy.always(trickle(b"{}", interval=0.2))
            with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                assert s.recv(1) == b"H"  # the first byte of the status line, at once
                started = time.monotonic()
                proxy.close()
                assert time.monotonic() - started < 2
                s.settimeout(5)
                assert len(b"".join(iter(lambda: s.recv(100), b""))) < 3  # then nothing more
        assert set(threading.enumerate()) <= before


def error_code(call: Any) -> Any:
    """The (HTTP status, error code) of a call that must fail with a ClientError."""
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


class TestErrorAnswers:
    """Canned answers as the service writes them; none reaches the upstream."""

    @pytest.mark.parametrize(("behaviour", "expected"), [
        (failure(500), (500, "InternalFailure")),
        (failure(503), (503, "ServiceUnavailableException")),
        (throttled(), (400, "ThrottlingException")),
    ])
    def test_error_answers(self, proxy: FaultProxy, firehose: Any, landing: Any,
                           behaviour: Any, expected: Any) -> None:
        proxy.script(behaviour)
        assert error_code(lambda: put(firehose, b"a\n")) == expected
        assert landing.objects("metric") == []

    @pytest.mark.parametrize("body", [b"{}", b'{"FailedPutCount": 0}'])
    def test_empty_200_has_no_result_and_stores_nothing(
        self, proxy: FaultProxy, firehose: Any, landing: Any, body: bytes
    ) -> None:
        proxy.script(empty(body))
        response = put(firehose, b"a\n")
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert "RequestResponses" not in response
        assert landing.objects("metric") == []

    def test_slow_waits_then_forwards(
        self, proxy: FaultProxy, firehose: Any, landing: Any
    ) -> None:
        proxy.script(slow(0.5))
        started = time.monotonic()
        assert len(put(firehose, b"a\n")["RequestResponses"]) == 1
        assert time.monotonic() - started >= 0.5
        assert landing.objects("metric") == [b"a\n"]


class TestDrawnBehaviours:
    """Storms: behaviours drawn per request or per entry, repeatable with a seed."""

    def test_throttle_entries_fails_about_the_fraction_and_stores_the_rest(
        self, proxy: FaultProxy, firehose: Any, landing: Any
    ) -> None:
        proxy.always(throttle_entries(0.5, seed=1))
        datas = [b"%d\n" % n for n in range(200)]
        response = put(firehose, *datas)
        failed = [entry.get("ErrorCode") == "ServiceUnavailableException"
                  for entry in response["RequestResponses"]]
        assert response["FailedPutCount"] == sum(failed)
        assert 60 < sum(failed) < 140
        stored = landing.objects("metric")[0].splitlines(keepends=True)
        assert stored == [data for data, no in zip(datas, failed) if not no]

    def test_mixed_draws_by_weight(self, proxy: FaultProxy, firehose: Any) -> None:
        proxy.always(mixed((3, throttled()), (1, forward()), seed=7))
        outcomes = []
        for n in range(40):
            try:
                put(firehose, b"%d\n" % n)
                outcomes.append("ok")
            except botocore.exceptions.ClientError:
                outcomes.append("throttled")
        assert 20 <= outcomes.count("throttled") <= 38
        assert len(proxy.calls()) == 40


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


class TestRefuse:
    """refuse() closes the port for real; another behaviour opens the same port again."""

    def test_connections_are_refused_then_accepted_on_the_same_port(
        self, proxy: FaultProxy, firehose: Any, landing: Any
    ) -> None:
        assert len(put(firehose, b"a\n")["RequestResponses"]) == 1  # a keep-alive connection
        port = proxy.port
        proxy.always(refuse())
        assert proxy.refusing
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            put(firehose, b"b\n")  # the open connection was closed too: a new one is refused
        proxy.always(forward())
        assert (proxy.port, proxy.refusing) == (port, False)
        assert len(put(firehose, b"c\n")["RequestResponses"]) == 1
        assert sorted(landing.objects("metric")) == [b"a\n", b"c\n"]
        assert len(proxy.calls()) == 2  # a refused call never arrives

    def test_refusing_from_the_start(self, moto_url: str) -> None:
        proxy = FaultProxy(upstream=moto_url)
        proxy.always(refuse())
        with proxy:
            with pytest.raises(ConnectionRefusedError):
                connect(proxy)
            proxy.always(forward())
            connect(proxy).close()

    def test_refuse_cannot_be_scripted(self, proxy: FaultProxy) -> None:
        with pytest.raises(ValueError, match="always"):
            proxy.script(refuse())


class TestTimeline:
    """Behaviours switched at offsets in time, for every request from then on."""

    def test_steps_take_effect_in_time(
        self, proxy: FaultProxy, firehose: Any, landing: Any
    ) -> None:
        started = time.monotonic()
        done = proxy.timeline([(0.0, refuse()), (0.6, throttled()), (1.2, forward())])
        assert proxy.refusing  # a step at 0 is in effect at once
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            put(firehose, b"a\n")
        while len(proxy.switches) < 2:  # throttled() is in effect, forward() 0.6 s away
            time.sleep(0.02)
        assert error_code(lambda: put(firehose, b"b\n")) == (400, "ThrottlingException")
        assert done.wait(5)
        assert len(put(firehose, b"c\n")["RequestResponses"]) == 1
        taken = [at - started for at, _ in proxy.switches]
        assert taken[0] < 0.1  # not before its time; on a loaded machine a little after
        assert 0.6 <= taken[1] < 0.6 + 2 and 1.2 <= taken[2] < 1.2 + 2
        assert landing.objects("metric") == [b"c\n"]

    def test_a_new_timeline_cancels_the_old_one(self, proxy: FaultProxy) -> None:
        proxy.timeline([(0.3, refuse())])
        done = proxy.timeline([(0.0, throttled()), (0.6, forward())])
        assert done.wait(5)
        assert not proxy.refusing
        assert len(proxy.switches) == 2

    def test_close_ends_a_timeline_and_leaves_no_thread(self, moto_url: str) -> None:
        before = set(threading.enumerate())
        with FaultProxy(upstream=moto_url) as proxy:
            proxy.timeline([(0.0, refuse()), (60.0, forward())])
            started = time.monotonic()
        assert time.monotonic() - started < 2
        assert set(threading.enumerate()) <= before
