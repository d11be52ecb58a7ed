"""Through an outage: the job is not stalled, a flush is not slept through, and no
single attempt outlives its batch.

- In the default mode a caller waits for its record; once an attempt on a
  stream has delivered nothing, callers stop waiting (their records still queue
  and retry) until an attempt delivers again.
- A flush or close ends the worker's retry backoff at once.
- A response that trickles in a byte at a time is abandoned when the attempt's
  time is up, and the records are sent again on a new connection.

The clock is a :class:`ManualClock` wherever backoff matters: time moves only
when a test says so, so a backoff that is not cut short never ends.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Iterator, List, Optional

import pytest
from faultproxy import FaultProxy, trickle
from sinks_for_tests import FlakySink

from dxtrack import DXTrack, RetryPolicy, SendResult
from dxtrack.testing import ManualClock

HANG = 20.0  # a call still running after this long counts as stalled


def returns_within(seconds: float, call: Callable[[], Any]) -> Any:
    """Run ``call`` in a thread; fail if it is still running after ``seconds``."""
    result: List[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "stalled"
    return result[0]


def values(sink: FlakySink) -> List[float]:
    return sorted(record["value"] for record in sink.records("metric"))


class TestDefaultModeInAnOutage:
    """Synchronous callers stop waiting once a stream's delivery fails."""

    def test_calls_stop_waiting_then_wait_again_once_delivery_works(
        self, make_client: Callable[..., DXTrack]
    ) -> None:
        clock = ManualClock()
        sink = FlakySink(failures=1, how="retry")
        client = make_client(sink=sink, clock=clock, sync_timeout=3600)
        # The first call waits for its attempt, which fails; its retry waits for the clock.
        returns_within(HANG, lambda: client.metric("down", 1))
        assert (client.stats()["retried"], values(sink)) == (1, [])
        # Before the fix, each of these waited sync_timeout (an hour here).
        for n in range(2, 22):
            returns_within(HANG, lambda n=n: client.metric("down", n))
        assert client.stats()["pending"] == 21
        clock.advance(60)  # the backoff ends; the retry delivers all that queued meanwhile
        assert client.flush(timeout=10)
        assert values(sink) == [float(n) for n in range(1, 22)]
        # Delivery works again: a call returns once its record is delivered.
        returns_within(HANG, lambda: client.metric("up", 22))
        assert 22.0 in values(sink)

    def test_one_failing_stream_does_not_release_the_other(
        self, make_client: Callable[..., DXTrack]
    ) -> None:
        class MetricsDown(FlakySink):
            """The metric stream refuses for good (a missing stream); errors are delivered."""

            def send(self, stream: str, lines: Any) -> SendResult:
                if stream == "metric":
                    self._log_call(stream, lines)
                    return SendResult(failed=len(lines), error="ResourceNotFoundException")
                return super().send(stream, lines)

        sink = MetricsDown(failures=0)
        client = make_client(sink=sink)
        client.metric("lost", 1)
        try:
            raise ValueError("still waited for")
        except ValueError:
            client.error()
        assert len(sink.records("error")) == 1  # error() returned after its delivery


    def test_errors_do_not_wait_behind_a_metric_batch_in_backoff(
        self, make_client: Callable[..., DXTrack]
    ) -> None:
        # The worker serves one batch at a time: while it waits to retry metrics, an error
        # cannot be sent, so waiting for it would only wait out the metrics' retries.
        sink = FlakySink(failures=10**9, how="retry")
        client = make_client(sink=sink, clock=ManualClock(), sync_timeout=3600)
        returns_within(HANG, lambda: client.metric("down", 1))
        for n in range(3):
            returns_within(HANG, functools.partial(client.error, exception=ValueError(n)))
        assert client.stats()["pending"] == 4


class TestAFlushDoesNotSleepThroughABackoff:
    """flush() and close() make the worker retry at once."""

    @pytest.mark.parametrize("how", ["raise", "retry"])
    def test_flush_retries_now(self, make_client: Callable[..., DXTrack], how: str) -> None:
        sink = FlakySink(failures=1, how=how)
        client = make_client(sink=sink, clock=ManualClock(), use_async_requests=True)
        for n in range(100):
            client.metric("pending", n)
        # The clock never moves: only a flush can end the backoff.
        assert returns_within(HANG, lambda: client.flush(timeout=3))
        assert len(values(sink)) == 100

    def test_close_retries_now(self, make_client: Callable[..., DXTrack]) -> None:
        sink = FlakySink(failures=1, how="retry")
        client = make_client(sink=sink, clock=ManualClock(), use_async_requests=True)
        for n in range(100):
            client.metric("pending", n)
        assert returns_within(HANG, lambda: client.close(timeout=3))
        assert len(values(sink)) == 100


@pytest.fixture
def proxy(landing: Any, moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=moto_url) as proxy:
        yield proxy


#: Backoff capped at 50 ms; the rest as by default (two abandoned attempts at most).
QUICK_RETRY = RetryPolicy(backoff_cap=0.05)
TRICKLE = trickle(b'{"FailedPutCount": 0, "RequestResponses": []}', 0.5)


def through_proxy(
    landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack],
    attempt_timeout: Optional[float] = None, **options: Any,
) -> DXTrack:
    """A Firehose client sending through ``proxy``, its attempts cut at ``attempt_timeout``."""
    client = make_client(**dict(landing.client_options(), endpoint_url=proxy.url), **options)
    if attempt_timeout is not None:
        client.sink.attempt_timeout = attempt_timeout  # type: ignore[union-attr]
    return client


class TestOneAttemptIsBounded:
    """A response trickling in byte by byte cannot hold the worker past its batch's time."""

    def test_a_trickle_is_abandoned_and_the_batch_fails_at_its_deadline(
        self, landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack]
    ) -> None:
        proxy.always(TRICKLE)
        client = through_proxy(landing, proxy, make_client, use_async_requests=True,
                               retry_deadline=2)
        for n in range(10):
            client.metric("trickled", n)
        # Before the fix the first attempt alone lasted the whole trickle (23 s here, since
        # botocore's read timeout applies to each byte); now the batch ends near its deadline.
        assert returns_within(HANG, lambda: client.flush(timeout=None)) is False
        assert client.stats()["failed"] == 10
        assert landing.lines("metric") == []

    def test_the_next_attempt_uses_a_new_connection_and_lands(
        self, landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack]
    ) -> None:
        proxy.script(TRICKLE)
        # The cut applies to the forwarded attempt too: 3 s leaves moto room to answer it on a
        # loaded machine (the suite runs in parallel), and is far short of the trickle (63 s).
        client = through_proxy(landing, proxy, make_client, attempt_timeout=3.0,
                               buffer_metrics=True, retry_deadline=30, retry=QUICK_RETRY)
        for n in range(10):
            client.metric("trickled", n)
        assert returns_within(HANG, lambda: client.flush(timeout=None))
        landed = sorted(record["value"] for record in landing.records("metric"))
        assert landed == [float(n) for n in range(10)]
        assert len(proxy.calls()) == 2


def sender_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dxtrack-sender"]


class TestSenderThreads:
    """The threads that make Firehose calls do not pile up."""

    def test_none_left_after_close(
        self, landing: Any, make_client: Callable[..., DXTrack]
    ) -> None:
        before = set(sender_threads())
        client = make_client(**landing.client_options())
        for n in range(10):  # each configure() replaces the pipeline, and closes the old one
            client.configure(context="c", run_id=f"run-{n}", **landing.client_options())
            client.metric("m", n)
        client.close(timeout=10)
        for thread in set(sender_threads()) - before:
            thread.join(HANG)
            assert not thread.is_alive()
        assert len(landing.lines("metric")) == 10

    def test_abandoned_attempts_are_bounded(
        self, landing: Any, proxy: FaultProxy, make_client: Callable[..., DXTrack]
    ) -> None:
        proxy.always(TRICKLE)
        before = set(sender_threads())
        client = through_proxy(landing, proxy, make_client, attempt_timeout=1.0,
                               buffer_metrics=True, retry_deadline=6, retry=QUICK_RETRY)
        client.metric("trickled", 1)
        assert returns_within(HANG, lambda: client.flush(timeout=None)) is False
        # About six attempts were abandoned; at most two may still wait beside the live one.
        assert len(set(sender_threads()) - before) <= 1 + QUICK_RETRY.max_abandoned
        assert len(proxy.calls()) <= 1 + QUICK_RETRY.max_abandoned
