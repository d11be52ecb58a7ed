"""``compression="gzip"``: each Firehose record one gzip member, limits on compressed bytes.

Against the moto server, with every call checked against Firehose's limits
(:class:`test_firehose.CallLog`; moto checks none) and failures injected
(:class:`test_firehose.FaultInjector`, which reads the lines inside gzip members).
"""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from conftest import CREDENTIALS, REGION, members
from test_firehose import (
    ERROR_STREAM,
    FAST_RETRY,
    MAX_RECORD_BYTES,
    METRIC_STREAM,
    TIMESTAMP,
    CallLog,
    FaultInjector,
    big_buffers,
    create_stream,
    landed,
    line_length_of,
    one_in,
    padded_metric,
    values_of,
)

from dxtrack import Config, ConfigurationError, DXTrack
from dxtrack.check import Report, check_aws
from dxtrack.cli import main
from dxtrack.sinks.packing import GZIP_MARGIN, Gzip, plan_calls

GZ_STREAM = "gz-metrics"


def random_text(rng: random.Random, length: int) -> str:
    """Printable ASCII that JSON leaves as it is and gzip barely shrinks."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-")
                   for _ in range(length))


class TestPacking:
    """The gzip packer on its own: lines in, gzip members within the limits out."""

    def test_members_hold_exactly_the_lines_in_order(self) -> None:
        rng = random.Random(7)
        lines = [b'{"n":%d,"t":"%s"}\n' % (n, random_text(rng, rng.randrange(0, 400)).encode())
                 for n in range(5_000)]
        lines += [b'{"same":%d}\n' % (n % 5) for n in range(20_000)]  # compress 10x and more
        packer = Gzip(20_000)
        records = [record for call in plan_calls(lines, packed=True, max_record_bytes=20_000,
                                                 gzip=packer) for record in call]
        assert b"".join(b"".join(carried) for _, carried in records) == b"".join(lines)
        for data, carried in records:
            assert members(data) == [b"".join(carried)]  # one complete member, whole lines
            assert len(data) <= 20_000
        assert packer.ratio > 5  # the last records, of repeated lines
        assert len(records) < sum(map(len, lines)) / 20_000  # several times fewer records

    def test_a_line_that_does_not_compress_fits_one_record(self) -> None:
        largest = os.urandom(MAX_RECORD_BYTES - GZIP_MARGIN - 1) + b"\n"
        for level in (1, 9):
            data = Gzip(1_000_000, level).compress(largest)
            assert len(largest) < len(data) <= MAX_RECORD_BYTES
        [[(data, carried)]] = plan_calls([largest], packed=True, gzip=Gzip(1_000_000))
        assert carried == [largest] and len(data) <= MAX_RECORD_BYTES
        with pytest.raises(ValueError, match="record limit"):
            list(plan_calls([largest + b"x"], packed=True, gzip=Gzip(1_000_000)))

    def test_a_guess_too_large_is_split_until_it_fits(self) -> None:
        packer = Gzip(10_000)
        packer.ratio = 50.0  # as if the last record were all repeats
        lines = [os.urandom(900).hex().encode() + b"\n" for _ in range(300)]  # about 2x
        records = list(packer.pack(lines))
        assert packer.splits > 0
        assert all(len(data) <= 10_000 for data, _ in records)
        assert b"".join(line for _, carried in records for line in carried) == b"".join(lines)

    def test_the_same_lines_give_the_same_bytes(self) -> None:
        lines = [b'{"n":%d}\n' % n for n in range(1_000)]
        first = [data for data, _ in Gzip(4096).pack(lines)]
        assert first == [data for data, _ in Gzip(4096).pack(lines)]

    def test_unpacked_each_line_is_its_own_member(self) -> None:
        lines = [b'{"n":%d}\n' % n for n in range(10)]
        records = list(Gzip(4096).pack(lines, packed=False))
        assert [gzip.decompress(data) for data, _ in records] == lines


class TestDelivery:
    """Through moto: what lands decompresses to what the uncompressed path lands."""

    def test_gzip_objects_hold_exactly_the_uncompressed_paths_lines(
        self, landing: Any, make_client: Any
    ) -> None:
        create_stream(landing, GZ_STREAM, "gz")
        base = line_length_of(0)
        largest = MAX_RECORD_BYTES - GZIP_MARGIN - base  # the longest line gzip takes
        rng = random.Random(16)
        corpus = [rng.randrange(0, 300) for _ in range(4_000)]
        corpus += [rng.randrange(1_000, 200_000) for _ in range(25)]
        corpus += [largest - rng.randrange(0, 40_000) for _ in range(5)] + [largest] * 3
        rng.shuffle(corpus)
        logs = {}
        for compression, stream in (("none", METRIC_STREAM), ("gzip", GZ_STREAM)):
            client = make_client(buffer_metrics=True, compression=compression,
                                 metric_stream=stream, **big_buffers(),
                                 **landing.client_options())
            logs[compression] = CallLog().attach(client.sink.client())
            rng = random.Random(3)  # random (barely compressible) pads, the same for both
            for n, pad in enumerate(corpus):
                text = random_text(rng, min(pad, 2_000)) + "x" * max(pad - 2_000, 0)
                client.metric("size", 1.0, metadata={"n": f"{n:07d}", "pad": text},
                              timestamp=TIMESTAMP)
            assert client.flush_metrics_buffer(timeout=60)
            assert client.stats()["failed"] == 0
            assert logs[compression].violations == []  # the limits, on every call

        plain_lines = sorted(landing.lines("metric"))
        assert len(plain_lines) == len(corpus)
        assert [len(line) + 1 for line in plain_lines if len(line) + 1 > largest + base - 1] == \
            [largest + base] * 3
        gz_objects = landing.objects("gz")
        assert gz_objects and all(body[:2] == b"\x1f\x8b" for body in gz_objects)
        assert sorted(line for body in gz_objects for line in gzip.decompress(body).splitlines()) \
            == plain_lines
        # Each Firehose record is one complete member of whole lines, within the record limit.
        sent = logs["gzip"].records(GZ_STREAM)
        for data in sent:
            [lines] = members(data)
            assert lines.endswith(b"\n")
            assert len(data) <= MAX_RECORD_BYTES
        assert sum(map(len, sent)) < sum(map(len, logs["none"].records(METRIC_STREAM))) / 1.5

    def test_the_default_record_limit_holds_on_compressed_bytes(
        self, landing: Any, make_client: Any
    ) -> None:
        # Buffered: full batches, whatever the worker's timing, so records hold several MB.
        client = make_client(buffer_metrics=True, compression="gzip", **big_buffers(),
                             **landing.client_options())
        log = CallLog().attach(client.sink.client())
        for n in range(150_000):
            client.metric("volume", n, metadata={"shop": f"shop-{n % 40}"})
        assert client.flush_metrics_buffer(timeout=120)
        assert log.violations == []
        records = log.records(METRIC_STREAM)
        assert max(map(len, records)) <= 1_000_000  # max_record_bytes, compressed
        assert sum(len(members(data)[0]) for data in records) > 1_000_000 * len(records) / 2
        stats = client.stats()
        assert (stats["delivered"], stats["failed"]) == (150_000, 0)
        assert stats["bytes_sent"] == sum(map(len, records))
        assert stats["line_bytes_sent"] > 4 * stats["bytes_sent"]
        assert values_of(landing) == list(range(150_000))

    def test_errors_at_the_limit_are_cut_to_fit_compressed(
        self, landing: Any, make_client: Any
    ) -> None:
        client = make_client(use_async_requests=True, compression="gzip",
                             **landing.client_options())
        log = CallLog().attach(client.sink.client())
        rng = random.Random(5)
        client.errors([ValueError(random_text(rng, 1_500_000)) for _ in range(3)]
                      + [ValueError("small")])
        assert client.flush_metrics_buffer(timeout=60)
        assert log.violations == []
        lines = landing.lines("error")
        most = MAX_RECORD_BYTES - GZIP_MARGIN  # the line limit with gzip
        assert all(most - 1_000 < length <= most
                   for length in sorted(len(line) + 1 for line in lines)[-3:])
        assert all("cut by dxtrack" in r["exception"]["value"]
                   for r in landed(landing, "error") if r["exception"]["value"] != "small")
        assert client.stats()["failed"] == 0

    def test_a_metric_over_the_gzip_line_limit_is_refused_at_the_call(
        self, landing: Any, make_client: Any
    ) -> None:
        largest = MAX_RECORD_BYTES - GZIP_MARGIN - line_length_of(0)
        client = make_client(compression="gzip", **landing.client_options())
        with pytest.raises(ValueError, match="record limit of 1,023,488 bytes"):
            padded_metric(client, 0, largest + 1)
        padded_metric(client, 1, largest)
        assert client.flush_metrics_buffer(timeout=30)
        assert [len(line) + 1 for line in landing.lines("metric")] == [largest + line_length_of(0)]

    def test_partial_failures_and_throttling_deliver_every_line_once(
        self, landing: Any, make_client: Any
    ) -> None:
        client = make_client(use_async_requests=True, compression="gzip", max_record_bytes=2048,
                             retry_deadline=30, retry=FAST_RETRY, **landing.client_options())
        sink_client = client.sink.client()
        log = CallLog().attach(sink_client)
        faults = FaultInjector(landing, one_in, throttle={0: 503, 2: 500}).attach(sink_client)
        for n in range(5_000):
            client.metric("retried", n, metadata={"page": n})
        for n in range(30):
            try:
                raise RuntimeError(f"boom {n}")
            except RuntimeError:
                client.error({"n": n})
        assert client.flush_metrics_buffer(timeout=60)
        assert log.violations == []
        assert faults.codes["InternalFailure"] and faults.codes["ServiceUnavailableException"]
        assert values_of(landing) == list(range(5_000))  # each once, every member complete
        assert sorted(r["metadata"]["n"] for r in landed(landing, "error")) == list(range(30))
        for body in landing.objects("metric") + landing.objects("error"):
            assert all(member.endswith(b"\n") for member in members(body))
        stats = client.stats()
        assert (stats["delivered"], stats["failed"], stats["pending"]) == (5_030, 0, 0)
        assert stats["retried"] >= faults.failed_lines > 0
        assert len(log.records(ERROR_STREAM)) >= 1


class TestSettings:
    def test_the_option_and_its_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert Config(stage="test", context="c", run_id="r").compression == "none"
        monkeypatch.setenv("DXTRACK_COMPRESSION", "gzip")
        client = DXTrack()
        client.configure(stage="test", context="c", run_id="r")
        assert client.config.compression == "gzip"
        client.close(1)
        with pytest.raises(ConfigurationError, match="compression"):
            Config(stage="test", context="c", run_id="r", compression="zstd")

    def test_setup_makes_streams_that_store_the_clients_gzip(
        self, moto_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        for key, value in CREDENTIALS.items():
            monkeypatch.setenv(key.upper(), value)
        where = ["--stage", "dev", "--endpoint-url", moto_url, "--region", REGION]
        assert main(["setup", *where, "--compression", "gzip"]) == 0
        said = capsys.readouterr().out
        assert "compression='gzip'" in said and "DXTRACK_COMPRESSION=gzip" in said
        config = Config(stage="dev", context="c", run_id="r", endpoint_url=moto_url,
                        region_name=REGION, compression="gzip", **CREDENTIALS)
        report = Report()
        check_aws(config, report)
        assert (report.passed, report.failed) == (3, 0), capsys.readouterr().out
        capsys.readouterr()
        # A client that does not compress, sending to these streams: check says what is wrong.
        plain = Config(stage="dev", context="c", run_id="r", endpoint_url=moto_url,
                       region_name=REGION, **CREDENTIALS)
        report = Report()
        check_aws(plain, report)
        out = capsys.readouterr().out
        assert report.failed == 2
        assert "made for clients that gzip" in out and "DXTRACK_COMPRESSION=gzip" in out
        # Setup without --compression reports the streams as different, and --update fixes it.
        assert main(["setup", *where]) == 1
        assert "CompressionFormat" in capsys.readouterr().out
        assert main(["setup", *where, "--update"]) == 0
        capsys.readouterr()
        report = Report()
        check_aws(config, report)
        out = capsys.readouterr().out
        assert report.failed == 2 and "compressed twice" in out

    def test_the_template_follows_the_setting(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "dxtrack", "setup", "--stage", "prod", "--template",
             "--compression", "gzip"], capture_output=True, text=True, check=True,
            env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}).stdout
        assert out.count('"CompressionFormat": "UNCOMPRESSED"') == 2
        assert out.count('"FileExtension": ".jsonl.gz"') == 2

