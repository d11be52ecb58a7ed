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
from faultproxy import FaultProxy, answer, partial, reset, trickle

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
