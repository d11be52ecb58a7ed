"""A 200 answer without a result per record is not a delivery (issue item 2).

A wrong ``endpoint_url``, a proxy or a captive portal can answer a
PutRecordBatch with ``200 OK`` and a body that is not Firehose's. botocore
parses what it can (``{}``, an HTML page and a body cut short all come back as
an empty response), so only one ``RecordId`` or ``ErrorCode`` per record sent
proves what became of the records. These tests put a :class:`FaultProxy` in
front of the moto server and check that every such answer is retried, logged
with advice, and counted failed once ``retry_deadline`` has passed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List

import pytest
from faultproxy import Behaviour, FaultProxy, answer, partial, truncated

from dxtrack import Config, DXTrack, RetryPolicy
from dxtrack.sinks.firehose import FirehoseSink

HTML = b"<!DOCTYPE html><html><body><h1>Sign in to the guest Wi-Fi</h1></body></html>"
COUNT = 5

#: A bad answer, and what the log must say about it. ``pack_records=False`` sends each of
#: the COUNT metrics as a record of its own, so the wrong-length answer is wrong.
BAD_ANSWERS = {
    "empty-object": (answer(200, b"{}"), "no RequestResponses"),
    "html-page": (answer(200, HTML, "text/html"), "(text/html)"),
    "truncated-body": (truncated(), "no RequestResponses"),
    "no-request-responses": (answer(200, b'{"FailedPutCount": 0}'), "no RequestResponses"),
    "wrong-length": (
        answer(200, b'{"FailedPutCount": 0, "RequestResponses": [{"RecordId": "r-1"}]}'),
        f"1 RequestResponses for the {COUNT} record(s) sent",
    ),
    "entries-without-result": (
        answer(200, b'{"FailedPutCount": 0, "RequestResponses": [{}, {}, {}, {}, {}]}'),
        "RequestResponses[0] has neither a RecordId nor an ErrorCode",
    ),
    "not-utf-8": (answer(200, b"\xff\xfe{}"), "UnicodeDecodeError"),
    "json-array": (answer(200, b"[]"), "could not read the answer"),
}
CASES = pytest.mark.parametrize("bad, says", BAD_ANSWERS.values(), ids=list(BAD_ANSWERS))


#: Backoff in milliseconds: every client here retries quickly.
FAST_RETRY = RetryPolicy(backoff_base=0.005, backoff_cap=0.05)


@pytest.fixture
def proxy(landing: Any, moto_url: str) -> Iterator[FaultProxy]:
    """A proxy in front of a freshly reset moto server with both streams."""
    with FaultProxy(upstream=moto_url) as proxy:
        yield proxy


@pytest.fixture
def through(
    landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack]
) -> Callable[..., DXTrack]:
    """A client sending through the proxy: one call per flush, one record per metric."""

    def make(**options: Any) -> DXTrack:
        options = dict(landing.client_options(), endpoint_url=proxy.url,
                       use_async_requests=True, buffer_metrics=True, pack_records=False,
                       retry=FAST_RETRY, **options)
        return make_client(**options)

    return make


def record(client: DXTrack, count: int = COUNT) -> None:
    for n in range(count):
        client.metric("answers", float(n), metadata={"n": n})


def logged(caplog: pytest.LogCaptureFixture, *needles: str) -> List[str]:
    texts = [r.getMessage() for r in caplog.records
             if r.name == "dxtrack" and r.levelno >= logging.WARNING]
    return [text for text in texts if all(needle in text for needle in needles)]


class TestABadAnswerIsNoDelivery:
    """An answer that does not account for every record counts nothing delivered."""

    @CASES
    def test_always_bad_ends_failed_and_logged(
        self, through: Callable[..., DXTrack], proxy: FaultProxy, landing: Any,
        caplog: pytest.LogCaptureFixture, bad: Behaviour, says: str,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        proxy.always(bad)
        client = through(retry_deadline=0.5)
        record(client)
        assert client.flush(timeout=15) is False
        stats = client.stats()
        assert (stats["delivered"], stats["failed"]) == (0, COUNT), stats
        assert len(proxy.calls()) >= 2, "the call was never retried"
        assert landing.lines("metric") == []
        # What was wrong, and where to look (the endpoint the client really used).
        assert logged(caplog, says, f"endpoint_url ({proxy.url})"), logged(caplog)
        assert logged(caplog, "gave up", "retry_deadline"), logged(caplog)

    @CASES
    def test_bad_once_then_every_record_lands_once(
        self, through: Callable[..., DXTrack], proxy: FaultProxy, landing: Any,
        bad: Behaviour, says: str,
    ) -> None:
        proxy.script(bad)
        client = through(retry_deadline=10.0)
        record(client)
        assert client.flush(timeout=15) is True
        values = sorted(r["value"] for r in landing.records("metric"))
        assert values == [float(n) for n in range(COUNT)]
        stats = client.stats()
        assert (stats["delivered"], stats["failed"]) == (COUNT, 0), stats
        first, *later = proxy.calls()
        assert set(first.records) <= {data for call in later for data in call.records}

    def test_the_sink_reports_a_retry_with_the_reason(
        self, landing: Any, proxy: FaultProxy
    ) -> None:
        """At the seam: a retry of every line, never an exception or a delivery."""
        proxy.always(answer(200, b"{}"))
        config = Config(**dict(landing.client_options(), endpoint_url=proxy.url,
                               context="tests", run_id="run-1"))
        sink = FirehoseSink(config)
        try:
            lines = [b'{"n":1}\n', b'{"n":2}\n']
            result = sink.send("metric", lines)
            assert list(result.retry) == lines and result.failed == 0
            assert result.error and "not Firehose's" in result.error
            assert sink.stats()["firehose_records"] == 0
        finally:
            sink.close()


class TestPartialFailure:
    """Entries with an ``ErrorCode`` are sent again; the others are not."""

    def test_only_failed_entries_are_resent(
        self, through: Callable[..., DXTrack], proxy: FaultProxy, landing: Any
    ) -> None:
        proxy.script(partial([1, 4]))
        client = through(retry_deadline=10.0)
        record(client, 6)
        assert client.flush(timeout=15) is True
        first, second = proxy.calls()
        assert len(first.records) == 6
        assert second.records == [first.records[1], first.records[4]]
        values = sorted(r["value"] for r in landing.records("metric"))
        assert values == [float(n) for n in range(6)]
        assert client.stats()["delivered"] == 6


class TestLogLinesCountMetrics:
    """What dxtrack logs counts metrics and errors, as stats() does, not Firehose records."""

    def test_a_packed_record_that_keeps_failing(
        self, landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        proxy.always(partial([0]))  # the one packed record of each call is throttled
        client = make_client(**dict(landing.client_options(), endpoint_url=proxy.url),
                             buffer_metrics=True, retry_deadline=0.5, retry=FAST_RETRY)
        record(client, 1000)
        assert client.flush(timeout=15) is False
        assert all(len(call.records) == 1 for call in proxy.calls())  # packed: one record
        assert client.stats()["failed"] == 1000
        assert logged(caplog, "will retry 1,000 metrics")
        assert logged(caplog, "could not deliver 1,000 metrics", "retry_deadline passed")

    def test_what_close_leaves_behind(
        self, landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dxtrack")
        proxy.always(partial([0]))
        client = make_client(**dict(landing.client_options(), endpoint_url=proxy.url),
                             buffer_metrics=True, retry_deadline=60, retry=FAST_RETRY)
        record(client, 1000)
        assert client.close(timeout=0.5) is False
        assert logged(caplog, "closed with records not delivered (1,000 metrics, 0 errors)")
