"""The disk spool: records that cannot be delivered in time wait on disk and are delivered
later, by this process, the next one or ``dxtrack replay``, once per line.

The segments are real files; outages are a :class:`FaultProxy` in front of the moto server
resetting every connection; claims are real ``flock`` locks held by real processes.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import orjson
import pytest
from faultproxy import FaultProxy, forward, reset
from test_pipeline import eventually

from dxtrack import DXTrack
from dxtrack.cli import main
from dxtrack.spool import ABANDONED_AFTER, Spool, replay_all

FAST = {"retry_deadline": 0.5, "shutdown_timeout": 2.0, "flush_interval": 0.05,
        "use_async_requests": True}


def line(n: int) -> bytes:
    return orjson.dumps({"metric_name": "m", "value": float(n), "id": f"id-{n}"}) + b"\n"


def landed_ids(landing: Any) -> List[str]:
    return [record["id"] for record in landing.records("metric")]


@pytest.fixture
def proxy(landing: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A proxy in front of the moto server; credentials in the environment for the command."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with FaultProxy(upstream=landing.url) as running:
        yield running


class TestSegments:
    def test_written_whole_private_and_read_back_oldest_first(self, tmp_path: Any) -> None:
        spool = Spool(tmp_path / "spool", "prod", 1 << 20)
        first = spool.write("metric", [line(1), line(2)]).path
        second = spool.write("error", [line(3)]).path
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o700
        for path in (first, second):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        claim = spool.claim_oldest()
        assert claim is not None and (claim.path, claim.stream) == (first, "metric")
        assert claim.lines == [line(1), line(2)]
        spool.done(claim)
        claim = spool.claim_oldest()
        assert claim is not None and (claim.stream, claim.lines) == ("error", [line(3)])
        spool.done(claim)
        assert spool.claim_oldest() is None and os.listdir(spool.path) == []
        assert spool.counts["spooled"] == 3

    def test_a_torn_last_line_and_garbage_are_counted_and_never_sent(
        self, tmp_path: Any
    ) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        path = spool.write("metric", [line(1), line(2)]).path
        with open(path, "ab") as f:  # what a crash in the middle of a write leaves
            f.write(b"\x00\x00garbage\n" + line(3)[:-9])
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(1), line(2)]
        assert spool.counts["spool_torn"] == 2
        spool.give_back(claim)  # not delivered: it comes back without what was torn
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(1), line(2)]
        assert spool.counts["spool_torn"] == 2

    def test_a_segment_a_dead_writer_left_is_taken_in(self, tmp_path: Any) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        spool.make_directory()
        partial = os.path.join(spool.path, "metric-00000000000000000001-99999-0.tmp")
        with open(partial, "wb") as f:
            f.write(line(1) + line(2)[:5])
        assert spool.claim_oldest() is None  # a writer may still be at work
        old = time.time() - ABANDONED_AFTER - 1
        os.utime(partial, (old, old))
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(1)]
        assert spool.counts["spool_torn"] == 1

    def test_over_the_limit_the_oldest_segments_go_first(self, tmp_path: Any) -> None:
        size = len(b"".join(line(10 + i) for i in range(10)))  # a segment of 10 lines
        spool = Spool(tmp_path, "prod", size * 3)
        for n in range(5):
            spool.write("metric", [line(n * 10 + i) for i in range(10)])
        claims = []
        while (claim := spool.claim_oldest()) is not None:
            claims.append(claim)
        assert [c.lines[0] for c in claims] == [line(20), line(30), line(40)]
        # Dropped from the spool are no longer counted as in it: 50 written, 20 dropped.
        assert (spool.counts["spool_full"], spool.counts["spooled"]) == (20, 30)

    def test_a_batch_larger_than_the_spool_keeps_its_newest_records(self, tmp_path: Any) -> None:
        spool = Spool(tmp_path, "prod", len(line(100)) * 10)
        assert spool.write("metric", [line(100 + n) for n in range(15)]).lines == 10
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(105 + n) for n in range(10)]
        assert (spool.counts["spool_full"], spool.counts["spooled"]) == (5, 10)

    def test_a_rewrite_a_crash_left_behind_is_deleted_not_replayed(self, tmp_path: Any) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        path = spool.write("metric", [line(1), line(2)]).path
        leftover = f"{path}.12345.replacing"  # what a crash inside a rewrite leaves
        with open(leftover, "wb") as f:
            f.write(line(2))
        old = time.time() - ABANDONED_AFTER - 1
        os.utime(leftover, (old, old))
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(1), line(2)]
        spool.done(claim)
        assert spool.claim_oldest() is None and os.listdir(spool.path) == []

    def test_a_claim_is_exclusive_and_passes_on_when_its_process_dies(
        self, tmp_path: Any
    ) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        spool.write("metric", [line(1)])
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from dxtrack.spool import Spool
            claim = Spool({str(tmp_path)!r}, "prod", 1 << 20).claim_oldest()
            print("held" if claim else "none", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            assert spool.claim_oldest() is None  # another process holds it
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            claim = spool.claim_oldest()
            assert claim is not None and claim.lines == [line(1)]
        finally:
            holder.kill()

    def test_replay_keeps_what_was_not_delivered(self, tmp_path: Any) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        spool.write("metric", [line(1), line(2), line(3)])
        sent: List[bytes] = []

        def send(stream: str, lines: List[bytes]) -> Tuple[List[bytes], int]:
            sent.extend(lines[:2])
            return lines[2:], 0

        assert [d for _, d in replay_all(spool, send)] == [2]
        claim = spool.claim_oldest()
        assert claim is not None and claim.lines == [line(3)]
        assert spool.counts["replayed"] == 2


class TestThroughAnOutage:
    def test_records_past_the_retry_deadline_are_spooled_then_replayed_once(
        self, landing: Any, proxy: FaultProxy, tmp_path: Any, make_client: Callable[..., DXTrack]
    ) -> None:
        options = dict(landing.client_options(), endpoint_url=proxy.url,
                       spool_dir=tmp_path / "spool", **FAST)
        proxy.always(reset())
        first = make_client(**options)
        for n in range(200):
            first.metric("outage.rows", n)
        assert not first.flush(timeout=10)  # spooled is not delivered
        stats = first.stats()
        assert (stats["spooled"], stats["failed"], stats["pending"]) == (200, 0, 0)
        assert landed_ids(landing) == []
        first.close(timeout=5)

        proxy.always(forward())
        # The endpoint is back: attempts get their usual time. (With FAST's retry_deadline an
        # attempt is cut at 1 s; on a loaded machine a forwarded one that moto had stored was
        # abandoned now and then, and retried, which lands a line twice: the duplicate
        # docs/firehose.md warns of, not a replay's.)
        second = make_client(**dict(options, retry_deadline=30.0))
        second.metric("after.rows", 1)  # a delivery, then the worker looks at the spool
        assert eventually(lambda: second.stats()["replayed"] >= 200, timeout=30)
        assert second.stats()["replayed"] == 200
        ids = landed_ids(landing)
        assert len(ids) == len(set(ids)) == 201
        assert os.listdir(tmp_path / "spool" / "dev") == []

    def test_close_in_an_outage_spools_what_is_queued_and_in_flight(
        self, landing: Any, proxy: FaultProxy, tmp_path: Any, make_client: Callable[..., DXTrack]
    ) -> None:
        options = dict(landing.client_options(), endpoint_url=proxy.url,
                       spool_dir=tmp_path / "spool", **dict(FAST, retry_deadline=60.0))
        proxy.always(reset())
        client = make_client(**options)
        for n in range(300):
            client.metric("outage.rows", n)
        assert not client.close(timeout=1.0)
        stats = client.stats()
        assert stats["failed"] == 0 and stats["spooled"] == 300, stats
        proxy.always(forward())
        status = main(["replay", "--stage", "dev", "--spool-dir", str(tmp_path / "spool"),
                       "--endpoint-url", landing.url, "--region", "eu-west-1"])
        assert status == 0
        ids = landed_ids(landing)
        assert len(ids) == len(set(ids)) == 300

    def test_a_full_buffer_spills_to_the_spool(
        self, landing: Any, proxy: FaultProxy, tmp_path: Any, make_client: Callable[..., DXTrack]
    ) -> None:
        options = dict(landing.client_options(), endpoint_url=proxy.url,
                       spool_dir=tmp_path / "spool", on_full="spool", max_buffer_records=50,
                       **dict(FAST, retry_deadline=60.0))
        proxy.always(reset())
        client = make_client(**options)
        for n in range(500):
            client.metric("burst.rows", n)
        stats = client.stats()
        assert stats["dropped"].get("buffer_full", 0) == 0
        assert not client.close(timeout=1.0)
        stats = client.stats()
        assert stats["spooled"] == 500 and stats["failed"] == 0, stats
        assert main(["replay", "--stage", "dev", "--spool-dir", str(tmp_path / "spool"),
                     "--endpoint-url", landing.url]) == 0
        ids = landed_ids(landing)
        assert len(ids) == len(set(ids)) == 500


def _env(**extra: str) -> Dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DXTRACK_")}, **extra}


class TestRefusedForNow:
    def test_a_missing_stream_spools_and_its_records_land_once_it_exists(
        self, landing: Any, tmp_path: Any, make_client: Callable[..., DXTrack],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        landing.firehose.delete_delivery_stream(DeliveryStreamName="dxtrack-metric-input-dev")
        options = dict(landing.client_options(), spool_dir=tmp_path / "spool", **FAST)
        first = make_client(**options)
        for n in range(50):
            first.metric("early.rows", n)
        assert not first.flush(timeout=10)
        assert (first.stats()["spooled"], first.stats()["failed"]) == (50, 0)
        first.close(timeout=5)
        landing.create()  # `dxtrack setup` makes the missing stream
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        assert main(["replay", "--stage", "dev", "--spool-dir", str(tmp_path / "spool"),
                     "--endpoint-url", landing.url]) == 0
        ids = landed_ids(landing)
        assert len(ids) == len(set(ids)) == 50


JOB = """
import os, sys, time
from dxtrack import dxtrack
dxtrack.configure(stage="dev", context="spool-job", run_id="run-1", use_async_requests=True,
                  retry_deadline=60, shutdown_timeout=1, region_name="eu-west-1")
for n in range(int(sys.argv[1])):
    dxtrack.metric("job.rows", n)
print("recorded", flush=True)
time.sleep(60)
"""


class TestSigtermInAnOutage:
    def test_what_a_terminated_job_could_not_send_is_replayed_once(
        self, landing: Any, proxy: FaultProxy, tmp_path: Any,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        proxy.always(reset())
        spool_dir = tmp_path / "spool"
        env = _env(DXTRACK_SPOOL_DIR=str(spool_dir), DXTRACK_ENDPOINT_URL=proxy.url,
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        job = subprocess.Popen([sys.executable, "-c", JOB, "400"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert job.stdout is not None and job.stdout.readline().strip() == "recorded"
            assert proxy.wait(1)  # the worker's first attempt met the outage
            job.send_signal(signal.SIGTERM)
            assert job.wait(15) == 143
        finally:
            job.kill()
        assert job.stderr is not None and "safe in the spool" in job.stderr.read()
        proxy.always(forward())
        assert main(["replay", "--stage", "dev", "--spool-dir", str(spool_dir),
                     "--endpoint-url", proxy.url]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith(
            f"the spool {spool_dir / 'dev'} is empty (400 records delivered now)")
        ids = landed_ids(landing)
        assert len(ids) == len(set(ids)) == 400


class TestSettings:
    def test_on_full_spool_needs_a_spool_dir(self, make_client: Callable[..., DXTrack]) -> None:
        from dxtrack import ConfigurationError

        with pytest.raises(ConfigurationError, match="on_full='spool' needs a spool_dir"):
            make_client(on_full="spool")

    def test_check_says_what_the_spool_holds(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        spool = Spool(tmp_path, "test", 1 << 20)
        spool.write("metric", [line(1), line(2)])
        monkeypatch.setenv("DXTRACK_SPOOL_DIR", str(tmp_path))
        monkeypatch.setenv("DXTRACK_OUTPUT_DIR", str(tmp_path / "out"))
        assert main(["check", "--stage", "test"]) == 0
        [said] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("spool ")]
        assert said.startswith(f"spool {tmp_path / 'test'}: ok (holds 2 records in 1 segment (")


class TestTheBatchInFlightAtClose:
    """close() out of time while an attempt is under way: the batch goes to the spool, held
    by this process until the attempt answers. Deterministic: the sink waits on a gate."""

    def spool_of(self, tmp_path: Any) -> Spool:
        return Spool(tmp_path / "spool", "test", 1 << 20)

    def closed_with_a_batch_in_flight(self, sink: Any, make_client: Callable[..., DXTrack],
                                      tmp_path: Any) -> DXTrack:
        """Ten metrics in one batch the sink holds at its gate, and close() out of time."""
        client = make_client(sink=sink, spool_dir=tmp_path / "spool", buffer_metrics=True)
        for n in range(10):
            client.metric("inflight.rows", n)
        assert not client.flush(timeout=0)  # the ten go out in one batch, which waits
        assert sink.entered.wait(5)
        assert not client.close(timeout=0.2)
        return client

    def test_it_is_deleted_when_the_attempt_lands_after_all(
        self, make_client: Callable[..., DXTrack], tmp_path: Any
    ) -> None:
        from sinks_for_tests import GateSink

        sink = GateSink()
        client = self.closed_with_a_batch_in_flight(sink, make_client, tmp_path)
        spool = self.spool_of(tmp_path)
        assert spool.contents()[:2] == (1, 10)
        assert spool.claim_oldest() is None  # held: the attempt may still deliver
        sink.release()
        assert eventually(lambda: spool.contents()[0] == 0)
        assert spool.contents()[:2] == (0, 0)
        assert len(sink.records("metric")) == 10
        assert client.stats()["spooled"] == 0

    def test_it_stays_when_the_attempt_fails(
        self, make_client: Callable[..., DXTrack], tmp_path: Any
    ) -> None:
        from sinks_for_tests import GateSink

        from dxtrack import SendResult

        class GateThenDown(GateSink):
            def deliver(self, stream: str, lines: Any) -> SendResult:
                return SendResult(retry=lines, error="down (injected)")

        sink = GateThenDown()
        client = self.closed_with_a_batch_in_flight(sink, make_client, tmp_path)
        sink.release()
        spool = self.spool_of(tmp_path)
        claims: List[Any] = []  # the segment is free once the worker has its answer
        assert eventually(lambda: claims.append(spool.claim_oldest()) or claims[-1] is not None)
        claim = claims[-1]
        assert claim is not None and len(claim.lines) == 10
        assert [orjson.loads(x)["value"] for x in claim.lines] == [float(n) for n in range(10)]
        assert sink.records("metric") == []
        assert client.stats()["spooled"] == 10


class TestAfterTheReview:
    def test_a_forked_child_does_not_keep_a_claim_its_parent_gives_back(
        self, tmp_path: Any
    ) -> None:
        spool = Spool(tmp_path, "prod", 1 << 20)
        spool.write("metric", [line(1)])
        claim = spool.claim_oldest()
        assert claim is not None
        ready, said = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what a fork pool's worker does at its start
            spool.after_fork_in_child()
            os.write(said, b"x")
            time.sleep(3)
            os._exit(0)
        try:
            assert os.read(ready, 1) == b"x"
            spool.give_back(claim)
            again = spool.claim_oldest()
            assert again is not None and again.lines == [line(1)]
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    def test_a_spool_directory_that_is_a_link_is_refused(self, tmp_path: Any) -> None:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "spool").mkdir()
        os.symlink(tmp_path / "elsewhere", tmp_path / "spool" / "prod")
        with pytest.raises(OSError, match="not a link"):
            Spool(tmp_path / "spool", "prod", 1 << 20).write("metric", [line(1)])

    def test_live_records_are_not_held_up_by_a_large_spool(
        self, make_client: Callable[..., DXTrack], tmp_path: Any
    ) -> None:
        from dxtrack.testing import MemorySink

        spool = Spool(tmp_path / "spool", "test", 1 << 30)
        for segment in range(200):
            spool.write("metric", [line(segment * 50 + n) for n in range(50)])
        sink = MemorySink()
        client = make_client(sink=sink, spool_dir=tmp_path / "spool", use_async_requests=True)
        started = time.monotonic()
        for n in range(100):
            client.metric("live.rows", n)
            time.sleep(0.01)
        assert client.flush(timeout=10)
        assert time.monotonic() - started < 8
        live = [r for r in sink.records("metric") if r.get("metric_name") == "live.rows"]
        assert len(live) == 100
        assert eventually(lambda: client.stats()["replayed"] >= 10_000, timeout=60)
        assert client.stats()["replayed"] == 10_000

    def test_a_line_that_can_never_be_delivered_is_counted_not_replayed(
        self, make_client: Callable[..., DXTrack], tmp_path: Any
    ) -> None:
        from dxtrack import SendResult
        from dxtrack.testing import MemorySink

        class RefusesOld(MemorySink):
            def send(self, stream: str, lines: Any) -> SendResult:
                old = [x for x in lines if b'"id-' in x]
                super().send(stream, [x for x in lines if b'"id-' not in x])
                return SendResult(failed=len(old), error="too large (injected)")

        spool = Spool(tmp_path / "spool", "test", 1 << 20)
        spool.write("metric", [line(n) for n in range(10)])
        client = make_client(sink=RefusesOld(), spool_dir=tmp_path / "spool",
                             use_async_requests=True)
        client.metric("live.rows", 1)
        assert eventually(lambda: bool(client.stats()["dropped"].get("spool_failed")),
                          timeout=20)
        stats = client.stats()
        assert (stats["replayed"], stats["dropped"].get("spool_failed")) == (0, 10)
        assert spool.contents()[:2] == (0, 0)

    def test_what_spills_is_written_at_close_and_every_record_is_accounted_for(
        self, make_client: Callable[..., DXTrack], tmp_path: Any
    ) -> None:
        from sinks_for_tests import GateSink

        sink = GateSink()  # never answers: nothing is delivered
        client = make_client(sink=sink, spool_dir=tmp_path / "spool", on_full="spool",
                             max_buffer_records=100, use_async_requests=True)
        for n in range(3_000):
            client.metric("burst.rows", n)
        assert not client.flush(timeout=0.2)
        client.close(timeout=0.5)
        stats = client.stats()
        dropped = sum(stats["dropped"].values())
        assert stats["enqueued"] == 3_000
        assert (stats["delivered"], stats["failed"], stats["pending"], dropped) == (0, 0, 0, 0)
        assert stats["spooled"] == 3_000
        assert Spool(tmp_path / "spool", "test", 1 << 30).contents()[1] == 3_000
        sink.release()
