"""Papertrail copies (issue 7): syslog copies of records over UDP, off the caller's path.

Every test listens on a real UDP socket on the loopback interface. None
sleeps to wait for the copies' worker thread: they wait on a flush, on a
socket timeout, or on an event a stand-in for DNS sets (``slow_dns``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator, List, NamedTuple, Tuple

import orjson
import pytest
from sinks_for_tests import GateSink

import dxtrack.sinks.papertrail as papertrail
from dxtrack import ConfigurationError, DXTrack, MemorySink
from dxtrack._logging import RateLimitedLog
from dxtrack.clock import ManualClock, SystemClock
from dxtrack.config import Config
from dxtrack.pipeline import Pipeline
from dxtrack.records import METRIC, RecordBuilder, finalize
from dxtrack.sinks.base import DELIVERED
from dxtrack.sinks.papertrail import MAX_TRACEBACK_LINES, PapertrailSink, syslog_tag

USER_INFO = 14  # facility user (1) * 8 + severity info (6)
USER_ERR = 11   # facility user (1) * 8 + severity err (3)

MakeClient = Callable[..., DXTrack]

_LINE = re.compile(
    rb"<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (\S+) ([^\s\[]+)\[(\d+)\]: (.*)", re.DOTALL
)


class Line(NamedTuple):
    """One datagram, parsed as RFC 3164."""

    pri: int
    timestamp: str
    host: str
    tag: str
    pid: int
    message: str
    size: int


class Syslog:
    """A UDP socket on the loopback interface standing in for Papertrail."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((host, 0))
        port = self.sock.getsockname()[1]
        self.hostport = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"

    def wait_for(self, count: int, timeout: float = 10.0) -> List[Line]:
        """The next ``count`` datagrams; fails if they do not come within ``timeout``."""
        lines = []
        deadline = time.monotonic() + timeout
        while len(lines) < count:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                pytest.fail(f"{len(lines)} of {count} syslog datagrams arrived: {lines!r}")
            lines.append(parse(data))
        return lines

    def rest(self) -> List[Line]:
        """Datagrams already waiting (after a flush: everything that was sent)."""
        self.sock.setblocking(False)
        lines = []
        while True:
            try:
                lines.append(parse(self.sock.recv(65536)))
            except BlockingIOError:
                return lines

    def close(self) -> None:
        self.sock.close()


def parse(data: bytes) -> Line:
    match = _LINE.fullmatch(data)
    assert match, f"not an RFC 3164 line: {data[:200]!r}"
    pri, stamp, host, tag, pid, message = match.groups()
    return Line(int(pri), stamp.decode(), host.decode(), tag.decode(), int(pid),
                message.decode(), len(data))


@pytest.fixture
def syslog() -> Iterator[Syslog]:
    receiver = Syslog()
    yield receiver
    receiver.close()


class SlowDNS:
    """Stands in for name resolution: blocks until the test opens it; says who called."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.callers: List[str] = []
        self.blocked_signals: List[Any] = []
        self.failures: List[BaseException] = []  # raised by the next calls, in order
        self.calls = 0

    def __call__(self, host: str, port: int) -> Tuple[str, int]:
        self.calls += 1
        self.callers.append(threading.current_thread().name)
        if hasattr(signal, "pthread_sigmask"):
            self.blocked_signals.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        self.entered.set()
        self.opened.wait(30)
        if self.failures:
            raise self.failures.pop(0)
        return (host, port)


class _Lookups:
    """Name resolution that answers with a receiver's address, or fails when told to."""

    def __init__(self, hostport: str) -> None:
        host, _, port = hostport.rpartition(":")
        self.address, self.port = (host, int(port)), int(port)
        self.calls, self.fail = 0, False

    def __call__(self, host: str, port: int) -> Tuple[str, int]:
        self.calls += 1
        if self.fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self.address


@pytest.fixture
def slow_dns(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDNS]:
    """Closed at first; opened at teardown, before ``make_client`` closes the clients."""
    dns = SlowDNS()
    monkeypatch.setattr(papertrail, "_resolve", dns)
    yield dns
    dns.opened.set()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> SlowDNS:
    """Name resolution that answers at once (or fails, as the test says)."""
    resolver = SlowDNS()
    resolver.opened.set()
    monkeypatch.setattr(papertrail, "_resolve", resolver)
    return resolver


def forwarding_client(make_client: MakeClient, syslog: Syslog, tmp_path: Any,
                      **options: Any) -> DXTrack:
    options.setdefault("output_dir", str(tmp_path))
    return make_client(papertrail_hostport=syslog.hostport, context="shop scraper", **options)


def pipeline_of(client: DXTrack) -> Pipeline:
    state = client._state
    assert state is not None
    return state[1]


def copy_pipeline(hostport: str) -> Pipeline:
    """A pipeline with copies, outside any client: its copy route can be driven directly."""
    config = Config(stage="test", context="unit", run_id="r1", papertrail_hostport=hostport)
    return Pipeline(config, MemorySink(), SystemClock(), RateLimitedLog())


def local_records(tmp_path: Any, stream: str) -> List[Any]:
    path = tmp_path / f"{stream}.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def bodies(count: int, name: str = "rows") -> List[bytes]:
    builder = RecordBuilder(Config(stage="test", context="unit", run_id="r1"))
    return [builder.metric(name, value) for value in range(count)]


def raise_and_record(client: DXTrack, exc: BaseException, **metadata: Any) -> None:
    def failing() -> None:
        raise exc

    try:
        failing()
    except type(exc):
        client.error(metadata=metadata or None)


# -- what arrives ----------------------------------------------------------------------


class TestSyslogLines:
    """Metrics are user.info lines, errors user.err lines, with host, tag and pid."""

    def test_a_metric_is_one_info_line(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path, stage="test", run_id="run-7",
                                   default_metadata={"host": "w3"})
        client.metric("scrape.products", 120, metadata={"shop": "example"})
        assert client.flush(timeout=10)
        (line,) = syslog.wait_for(1)
        assert line.pri == USER_INFO
        assert line.host == papertrail._hostname() and line.host
        assert line.tag == "shop-scraper" and line.pid == os.getpid()
        assert line.message == (
            'metric scrape.products=120.0 stage=test run_id=run-7 '
            'metadata={"host":"w3","shop":"example"}'
        )
        assert syslog.rest() == []

    def test_an_error_is_a_summary_then_its_traceback_line_by_line(
        self, make_client, syslog, tmp_path
    ):
        client = forwarding_client(make_client, syslog, tmp_path, run_id="run-7")
        raise_and_record(client, KeyError("sku-42"), shop="example")
        assert client.flush(timeout=10)
        traceback_text = local_records(tmp_path, "error")[0]["exception"]["traceback"]
        expected = [line for line in traceback_text.splitlines() if line.strip()]
        lines = syslog.wait_for(1 + len(expected))
        assert {line.pri for line in lines} == {USER_ERR}
        assert {(line.tag, line.pid) for line in lines} == {("shop-scraper", os.getpid())}
        assert lines[0].message == (
            "error KeyError: 'sku-42' stage=test run_id=run-7 metadata={\"shop\":\"example\"}"
        )
        assert [line.message for line in lines[1:]] == expected
        assert expected[0] == "Traceback (most recent call last):"
        assert any("in failing" in line for line in expected)
        assert expected[-1] == "KeyError: 'sku-42'"

    def test_errors_sends_each_exception(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        client.errors([ValueError("first"), OSError("second")])  # no tracebacks: summaries only
        assert client.flush(timeout=10)
        summaries = [line.message.split(" stage=")[0] for line in syslog.wait_for(2)]
        assert summaries == ["error ValueError: first", "error OSError: second"]

    def test_records_still_land_in_the_local_files(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        client.metric("rows", 3)
        raise_and_record(client, ValueError("boom"))
        assert client.flush(timeout=10) is True
        assert [r["value"] for r in local_records(tmp_path, "metric")] == [3.0]
        assert [r["exception"]["value"] for r in local_records(tmp_path, "error")] == ["boom"]
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["dropped"]) == (2, 0, {})
        assert stats["papertrail_sent"] == 2

    def test_copies_go_out_at_once_even_when_metrics_are_buffered(
        self, make_client, syslog, tmp_path
    ):
        client = forwarding_client(make_client, syslog, tmp_path, buffer_metrics=True,
                                   flush_interval=3600)
        client.metric("rows", 1)
        (line,) = syslog.wait_for(1)  # no flush: only the socket's timeout bounds the wait
        assert line.message.startswith("metric rows=1.0 ")
        assert client.stats()["pending"] == 1  # the Firehose copy still waits for its batch

    def test_records_the_full_buffer_drops_are_still_forwarded(
        self, make_client, syslog, tmp_path
    ):
        sink = GateSink()
        try:
            client = forwarding_client(make_client, syslog, tmp_path, sink=sink,
                                       use_async_requests=True, max_buffer_records=1)
            client.metric("rows", 0)
            assert sink.entered.wait(10)  # the worker holds record 0 in a send that hangs
            for value in (1, 2, 3):       # 1 fills the buffer, 2 and 3 are dropped
                client.metric("rows", value)
            assert client.stats()["dropped"] == {"buffer_full": 2}
            values = sorted(line.message.split()[1] for line in syslog.wait_for(4))
            assert values == ["rows=0.0", "rows=1.0", "rows=2.0", "rows=3.0"]
        finally:
            sink.release()

    @pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
    def test_an_ipv6_address_in_brackets(self, make_client, tmp_path):
        try:
            receiver = Syslog(socket.AF_INET6)
        except OSError:
            pytest.skip("no IPv6 loopback here")
        try:
            client = forwarding_client(make_client, receiver, tmp_path)
            client.metric("rows", 1)
            assert receiver.wait_for(1)[0].message.startswith("metric rows=1.0")
        finally:
            receiver.close()


class TestSyslogTag:
    """The context becomes a tag Papertrail parses: safe characters, at most 32."""

    @pytest.mark.parametrize(
        ("context", "tag"),
        [
            ("shop-scraper", "shop-scraper"),
            ("shop scraper", "shop-scraper"),
            ("team/job: prices [eu]", "team-job-prices-eu"),
            ("prix été", "prix-t"),
            ("a" * 40, "a" * 32),
            ("   ", "dxtrack"),
            ("日本", "dxtrack"),
        ],
    )
    def test_tag(self, context, tag):
        assert syslog_tag(context) == tag


class TestDatagramSize:
    """No datagram is over Papertrail's 1024 bytes; cuts are marked."""

    def test_a_huge_error_is_capped(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        message = "\n".join(f"detail {i} " + "x" * 40 for i in range(5000))
        raise_and_record(client, ValueError(message))
        assert client.flush(timeout=10)
        lines = syslog.wait_for(1 + MAX_TRACEBACK_LINES + 1)  # summary, lines and the cut mark
        assert syslog.rest() == []
        assert max(line.size for line in lines) <= 1024  # Papertrail's limit over UDP
        summary, rest = lines[0], [line.message for line in lines[1:]]
        assert summary.message.startswith("error ValueError: detail 0 xxx")
        assert "cut by dxtrack" in summary.message
        assert rest[0] == "Traceback (most recent call last):"
        assert any(re.fullmatch(r"\[\.\.\. [\d,]+ traceback lines cut by dxtrack \.\.\.\]", m)
                   for m in rest)
        assert rest[-1] == "detail 4999 " + "x" * 40  # the tail says how it ended

    def test_a_long_line_is_cut_to_one_datagram(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        client.metric("rows", 1, metadata={"blob": "é" * 100_000})
        raise_and_record(client, RuntimeError("y" * 100_000))
        assert client.flush(timeout=10)
        lines = [syslog.wait_for(1)[0], *syslog.wait_for(1), *syslog.rest()]
        assert max(line.size for line in lines) <= 1024  # Papertrail's limit over UDP
        assert lines[0].message.startswith("metric rows=1.0 stage=test run_id=run-1 metadata=")
        assert lines[0].message.endswith("bytes in all]")
        assert lines[-1].message.startswith("RuntimeError: yyy")
        assert lines[-1].message.endswith("bytes in all]")


# -- the program's logging ------------------------------------------------------------


class TestLoggingIsolation:
    """The root logger, its level and logging's hierarchy are left exactly as they were."""

    def test_root_handlers_and_level_are_unchanged(self, make_client, syslog, tmp_path):
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        dxtrack_logger = logging.getLogger("dxtrack")
        dxtrack_before = (list(dxtrack_logger.handlers), dxtrack_logger.level,
                          dxtrack_logger.propagate)
        client = forwarding_client(make_client, syslog, tmp_path)
        assert (list(root.handlers), root.level) == before
        client.metric("rows", 1)
        raise_and_record(client, ValueError("boom"))
        assert client.flush(timeout=10)
        assert syslog.wait_for(2)
        assert (list(root.handlers), root.level) == before
        assert (list(dxtrack_logger.handlers), dxtrack_logger.level,
                dxtrack_logger.propagate) == dxtrack_before

    def test_no_logger_of_the_hierarchy_gets_a_handler(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        client.metric("rows", 1)
        assert client.flush(timeout=10)
        assert syslog.wait_for(1)
        manager = logging.Logger.manager
        assert "dxtrack.papertrail" not in manager.loggerDict
        loggers = [logging.getLogger()] + [
            item for item in manager.loggerDict.values() if isinstance(item, logging.Logger)
        ]
        assert not any(
            isinstance(handler, logging.handlers.SysLogHandler)
            for item in loggers for handler in item.handlers
        )

    def test_the_programs_log_records_are_not_forwarded(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        logging.getLogger("the.program").error("not for Papertrail")
        logging.getLogger("dxtrack").error("not for Papertrail either")
        client.metric("rows", 1)
        assert client.flush(timeout=10)
        assert [line.message.split()[1] for line in syslog.wait_for(1)] == ["rows=1.0"]
        assert syslog.rest() == []

    def test_logging_disable_does_not_silence_the_copies(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path)
        logging.disable(logging.CRITICAL)
        try:
            client.metric("rows", 1)
            assert client.flush(timeout=10)
        finally:
            logging.disable(logging.NOTSET)
        assert syslog.wait_for(1)[0].message.startswith("metric rows=1.0")


# -- the caller's path and failures ------------------------------------------------------


class TestCallersPath:
    """Sending happens on the copies' own worker thread; nothing it does reaches the caller."""

    def test_without_papertrail_the_hot_path_is_the_buffers_own(self, make_client, tmp_path):
        client = make_client(output_dir=str(tmp_path))
        pipeline = pipeline_of(client)
        assert pipeline.copies is None
        assert pipeline.put == pipeline.buffer.put

    def test_callers_do_not_wait_for_a_slow_dns_answer(
        self, make_client, syslog, tmp_path, slow_dns
    ):
        client = forwarding_client(make_client, syslog, tmp_path)  # default mode: waits for
        client.metric("rows", 0)                                   # Firehose, not Papertrail
        assert slow_dns.entered.wait(10)
        for value in range(1, 5):
            client.metric("rows", value)
        raise_and_record(client, ValueError("boom"))
        assert client.stats()["delivered"] == 6
        assert not slow_dns.opened.is_set()  # all of it while the lookup still hangs
        assert slow_dns.callers == ["dxtrack-worker"]  # the copies' worker, not the caller
        slow_dns.opened.set()
        assert client.flush(timeout=10)
        assert len(syslog.wait_for(5)) == 5

    @pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX only")
    def test_the_copies_thread_blocks_signals(self, make_client, syslog, tmp_path, dns):
        client = forwarding_client(make_client, syslog, tmp_path)
        client.metric("rows", 1)
        assert client.flush(timeout=10)
        assert signal.SIGTERM in dns.blocked_signals[0]
        assert signal.SIGINT in dns.blocked_signals[0]

    def test_a_port_nobody_listens_on_costs_nothing(self, make_client, tmp_path):
        receiver = Syslog()
        hostport = receiver.hostport
        receiver.close()  # nobody listens there any more
        client = make_client(papertrail_hostport=hostport, output_dir=str(tmp_path))
        client.metric("rows", 1)
        raise_and_record(client, ValueError("boom"))
        assert client.flush(timeout=10) is True
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (2, 0, 0)
        assert stats["dropped"] == {}
        assert stats["papertrail_sent"] + stats["papertrail_failed"] == 2
        assert len(local_records(tmp_path, "metric")) == 1

    def test_a_name_that_does_not_resolve_is_counted_and_logged_once(
        self, make_client, syslog, tmp_path, dns, caplog
    ):
        dns.failures = [socket.gaierror(socket.EAI_NONAME, "Name or service not known")] * 5
        client = forwarding_client(make_client, syslog, tmp_path)
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            for value in range(3):
                client.metric("rows", value)
            assert client.flush(timeout=10) is True  # Firehose's verdict: all delivered
        stats = client.stats()
        assert (stats["papertrail_failed"], stats["papertrail_sent"]) == (3, 0)
        assert (stats["delivered"], stats["failed"], stats["dropped"]) == (3, 0, {})
        warnings = [r.getMessage() for r in caplog.records if "Papertrail" in r.getMessage()]
        assert len(warnings) == 1 and "cannot reach Papertrail" in warnings[0]
        assert dns.calls == 1  # then it waits before trying again
        assert syslog.rest() == []

    def test_a_failed_send_is_counted_and_logged_not_printed(
        self, make_client, tmp_path, monkeypatch, caplog, capsys
    ):
        # Without SO_BROADCAST, sending to the broadcast address fails (EACCES).
        monkeypatch.setattr(papertrail, "_resolve", lambda host, port: ("255.255.255.255", 9))
        client = make_client(papertrail_hostport="papertrail.test:9", output_dir=str(tmp_path))
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            client.metric("rows", 1)
            raise_and_record(client, ValueError("boom"))
            assert client.flush(timeout=10) is True
        stats = client.stats()
        assert (stats["papertrail_failed"], stats["papertrail_sent"]) == (2, 0)
        assert [r.getMessage() for r in caplog.records
                if "could not send to Papertrail" in r.getMessage()]
        assert "Logging error" not in capsys.readouterr().err

    def test_it_tries_again_after_a_delay(self, make_client, syslog, tmp_path, dns):
        dns.failures = [OSError("network is down")]
        clock = ManualClock()
        client = forwarding_client(make_client, syslog, tmp_path, clock=clock)
        client.metric("rows", 0)
        assert client.flush(timeout=10)
        client.metric("rows", 1)  # within the delay: not even tried
        assert client.flush(timeout=10)
        assert dns.calls == 1
        assert client.stats()["papertrail_failed"] == 2
        clock.advance(1.0)  # the first delay is one second
        client.metric("rows", 2)
        assert client.flush(timeout=10)
        assert dns.calls == 2
        assert syslog.wait_for(1)[0].message.startswith("metric rows=2.0")
        stats = client.stats()
        assert {key: stats[key] for key in stats if key.startswith("papertrail_")} == {
            "papertrail_sent": 1, "papertrail_dropped": 0, "papertrail_failed": 2,
        }

    def test_it_resolves_again_every_ten_minutes_and_keeps_the_last_good_address(self, syslog):
        dns, now = _Lookups(syslog.hostport), [1000.0]
        sink = PapertrailSink(f"papertrail.test:{dns.port}", "unit", RateLimitedLog(),
                              timer=lambda: now[0], resolve=dns)
        try:
            lines = [finalize(body) for body in bodies(3)]
            assert sink.send(METRIC, lines[:1]) == DELIVERED
            now[0] += 599.0
            assert sink.send(METRIC, lines[1:2]) == DELIVERED and dns.calls == 1
            now[0] += 1.0  # ten minutes: looked up again, which fails; the old address stays
            dns.fail = True
            assert sink.send(METRIC, lines[2:]) == DELIVERED and dns.calls == 2
            assert [line.message.split()[1] for line in syslog.wait_for(3)] == [
                "rows=0.0", "rows=1.0", "rows=2.0",
            ]
        finally:
            sink.close()

    def test_a_full_queue_drops_and_counts(self, syslog, make_client, tmp_path, slow_dns,
                                           caplog):
        client = forwarding_client(make_client, syslog, tmp_path, sink=MemorySink(),
                                   use_async_requests=True)
        client.metric("rows", 0)
        assert slow_dns.entered.wait(10)  # the copies' thread holds record 0, queue empty
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            for value in range(1, 10_003):  # 10,000 fit; the last 2 do not
                client.metric("rows", value)
        assert client.stats()["papertrail_dropped"] == 2
        assert len([r for r in caplog.records if "queue is full" in r.getMessage()]) == 1
        slow_dns.opened.set()
        assert client.flush(timeout=30)
        values = [line.message.split()[1] for line in syslog.wait_for(4)]
        assert values == ["rows=0.0", "rows=1.0", "rows=2.0", "rows=3.0"]  # the rest as sent
        stats = client.stats()
        assert {key: stats[key] for key in stats if key.startswith("papertrail_")} == {
            "papertrail_sent": 10_001, "papertrail_dropped": 2, "papertrail_failed": 0,
        }
        assert stats["delivered"] == 10_003  # Firehose's copies are not affected


# -- flush, close, fork --------------------------------------------------------------


class TestFlushAndClose:
    """flush() waits for the copies within its timeout; close() is bounded and idempotent."""

    def test_flush_waits_for_the_copies_within_its_timeout(
        self, make_client, syslog, tmp_path, slow_dns
    ):
        client = forwarding_client(make_client, syslog, tmp_path, use_async_requests=True)
        client.metric("rows", 1)
        assert slow_dns.entered.wait(10)
        started = time.monotonic()
        assert client.flush(timeout=0.3) is True  # Firehose delivered; Papertrail never counts
        assert 0.25 <= time.monotonic() - started < 5
        assert syslog.rest() == []
        slow_dns.opened.set()
        assert client.flush(timeout=10) is True
        assert syslog.rest()[0].message.startswith("metric rows=1.0")  # there after the flush

    def test_close_sends_what_is_queued(self, make_client, syslog, tmp_path):
        client = forwarding_client(make_client, syslog, tmp_path, use_async_requests=True)
        for value in range(50):
            client.metric("rows", value)
        assert client.close(timeout=10) is True
        assert len(syslog.wait_for(50)) == 50
        assert client.stats()["papertrail_sent"] == 50

    def test_close_is_bounded_and_idempotent(self, make_client, syslog, tmp_path, slow_dns):
        client = forwarding_client(make_client, syslog, tmp_path, use_async_requests=True)
        for value in range(3):
            client.metric("rows", value)
        assert slow_dns.entered.wait(10)  # record 0 taken; 1 and 2 queued behind a hung lookup
        started = time.monotonic()
        client.close(timeout=0.3)
        assert time.monotonic() - started < 5
        started = time.monotonic()
        client.close(timeout=10)
        assert time.monotonic() - started < 0.5  # the second call returns at once
        stats = client.stats()
        assert stats["papertrail_dropped"] == 2
        assert stats["delivered"] == 3  # Firehose's copies are not affected

    @pytest.mark.parametrize("ending", ["flush", "close"])
    def test_when_no_thread_can_start_the_caller_sends(self, syslog, monkeypatch, ending):
        """As late in interpreter shutdown, when starting a thread raises RuntimeError."""

        def refuse(thread: threading.Thread) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

        pipeline = copy_pipeline(syslog.hostport)
        monkeypatch.setattr(threading.Thread, "start", refuse)
        for body in bodies(3):
            pipeline.put(METRIC, body, False)
        if ending == "flush":
            assert pipeline.flush(5) is True
        pipeline.close(5)
        monkeypatch.undo()
        values = [line.message.split()[1] for line in syslog.wait_for(3)]
        assert values == ["rows=0.0", "rows=1.0", "rows=2.0"]
        assert pipeline.stats()["papertrail_sent"] == 3

    def test_a_closed_copy_route_refuses_and_counts(self, syslog):
        pipeline = copy_pipeline(syslog.hostport)
        copies = pipeline.copies
        assert copies is not None
        copies.close(5)  # as the parent does once its own records are settled
        copies.close(5)
        pipeline.put(METRIC, bodies(1)[0], False)  # a record taken as the parent closes
        assert pipeline.flush(1) is True
        assert pipeline.stats()["papertrail_dropped"] == 1
        assert syslog.rest() == []
        pipeline.close(5)


class TestExit:
    """The exit flush sends the copies too, within its bound, in a real interpreter."""

    JOB = """
        import atexit, sys
        from dxtrack import DXTrack

        client = DXTrack()
        client.configure(stage="test", context="exit job", run_id="r1", output_dir=sys.argv[2],
                         papertrail_hostport=sys.argv[1], use_async_requests=True)
    """

    def run_job(self, syslog: Syslog, tmp_path: Any, body: str) -> None:
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(self.JOB) + textwrap.dedent(body))
        done = subprocess.run(
            [sys.executable, str(script), syslog.hostport, str(tmp_path / "out")],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""

    def test_what_is_queued_at_exit_is_sent(self, syslog, tmp_path):
        self.run_job(syslog, tmp_path, """
            for value in range(200):
                client.metric("rows", value)
        """)
        lines = syslog.wait_for(200)
        assert sorted(float(line.message.split()[1][5:]) for line in lines) == [
            float(v) for v in range(200)
        ]
        assert {line.tag for line in lines} == {"exit-job"}

    def test_a_record_made_in_an_atexit_hook_is_sent(self, syslog, tmp_path):
        self.run_job(syslog, tmp_path, """
            atexit.register(lambda: client.metric("at.exit", 1))
        """)
        assert syslog.wait_for(1)[0].message.startswith("metric at.exit=1.0 ")


class TestFork:
    """A forked child sends copies of its own records only, never the parent's queued ones."""

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_the_child_sends_its_own_lines_only(self, make_client, syslog, tmp_path, slow_dns):
        clock = ManualClock()
        client = forwarding_client(make_client, syslog, tmp_path, use_async_requests=True,
                                   clock=clock)
        copies = pipeline_of(client).copies
        assert copies is not None
        client.metric("parent.rows", 0)
        slow_dns.opened.set()
        assert client.flush(timeout=10)
        slow_dns.opened.clear()
        slow_dns.entered.clear()
        clock.advance(600.0)  # the next copy looks the name up again, and blocks there
        try:
            for value in range(1, 6):
                client.metric("parent.rows", value)
            assert slow_dns.entered.wait(10)
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    queued = copies.route.stats()["pending"]
                    slow_dns.opened.set()  # in the child only: its own lookup answers
                    client.metric("child.rows", 1)
                    sent = client.flush(timeout=10) and client.stats()["papertrail_sent"]
                    status = 0 if (queued, sent) == (0, 1) else 2
                finally:
                    os._exit(status)
        finally:
            slow_dns.opened.set()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.flush(timeout=10)
        lines = syslog.wait_for(7) + syslog.rest()
        by_child = [line.message.split()[1] for line in lines if line.pid == pid]
        by_parent = [line.message.split()[1] for line in lines if line.pid == os.getpid()]
        assert by_child == ["child.rows=1.0"]
        assert sorted(by_parent) == [f"parent.rows={v}.0" for v in range(6)]


# -- configuration -----------------------------------------------------------------------


class TestHostport:
    """A malformed papertrail_hostport is a ValueError at configure()."""

    @pytest.mark.parametrize(
        "value",
        [
            "logs.papertrailapp.com",        # no port
            "logs.papertrailapp.com:",       # empty port
            "logs.papertrailapp.com:0",
            "logs.papertrailapp.com:70000",
            "logs.papertrailapp.com:51x4",
            "logs.papertrailapp.com:-514",
            ":514",                          # no host
            514,
            b"logs.papertrailapp.com:514",
        ],
    )
    def test_malformed(self, value: Any) -> None:
        client = DXTrack()
        with pytest.raises(ValueError, match="papertrail_hostport") as raised:
            client.configure(stage="test", context="c", run_id="r", papertrail_hostport=value)
        assert isinstance(raised.value, ConfigurationError)
        assert client.config is None

    def test_well_formed(self, make_client: MakeClient, tmp_path: Any) -> None:
        client = make_client(papertrail_hostport="logs3.papertrailapp.com:12345",
                             output_dir=str(tmp_path))
        assert client.config is not None
        assert client.config.papertrail_hostport == "logs3.papertrailapp.com:12345"
