"""Shared pieces of the benchmark suite: statistics, tables, sinks, canned AWS, a moto server.

Every benchmark module exposes ``run(quick: bool) -> Report``. A report holds
tables (printed as text, or as Markdown for RESULTS.md) and the issue-6
targets it can judge. Figures are medians over interleaved rounds: each round
measures every variant once, so a burst of load from another process hits a
round rather than one variant, and ratios are taken within a round.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence

# Nothing in the suite may find real AWS settings or reach beyond 127.0.0.1.
for _name in list(os.environ):
    if _name.startswith("AWS_"):
        del os.environ[_name]
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

REGION = "eu-west-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: An address nothing listens on: the canned-response client never gets that far.
UNUSED_ENDPOINT = "http://127.0.0.1:9"
BUCKET = "dxtrack-bench"
STAGE = "dev"

# The record every benchmark emits: a realistic scraper metric (~190 bytes of JSON).
CONTEXT = "shop-scraper"
RUN_ID = "2026-11-27T06:00:00"
NAME = "scrape.products"
METADATA = {"shop": "example-shop", "page": 3, "category": "groceries"}


# -- a steady heap ------------------------------------------------------------------------
def steady_malloc() -> str:
    """Keep freed memory in the process instead of handing it back to the OS.

    orjson builds each bytes object through glibc's malloc (it starts
    larger than pymalloc's 512-byte limit and is shrunk), so a loop that
    fills and clears a queue makes glibc trim the top of the heap and fault
    it back in, over and over. On these VMs a page fault is slow, and the
    same floor loop measured 0.8 or 4.5 µs depending only on heap layout
    (what happened to be imported first). A trim threshold of 256 MiB and a
    64 MiB top pad make every variant pay the same, small, allocation cost.
    Returns a description for the report.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc: default (no glibc mallopt here)"
    M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2
    if mallopt(M_TRIM_THRESHOLD, 256 << 20) and mallopt(M_TOP_PAD, 64 << 20):
        return (
            "malloc: glibc M_TRIM_THRESHOLD=256 MiB, M_TOP_PAD=64 MiB (see _common.steady_malloc)"
        )
    return "malloc: default (mallopt refused)"


# -- statistics ------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``min–max`` of the rounds, the spread the tables report."""
    return f"{min(values) * scale:.{digits}f}–{max(values) * scale:.{digits}f}"


def rounds(
    count: int, variants: Dict[str, Callable[[], float]], warmup: bool = True
) -> Dict[str, List[float]]:
    """Run every variant once per round, ``count`` rounds; returns each one's results.

    A warm-up round (not recorded) first touches every page the variants
    need: growing memory is slow the first time on these VMs.
    """
    if warmup:
        for fn in variants.values():
            fn()
    results: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(count):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def paired_ratio(results: Dict[str, List[float]], name: str, base: str) -> List[float]:
    """``name / base`` per round (both measured in the same round)."""
    return [a / b for a, b in zip(results[name], results[base])]


# -- reports -----------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    headers: List[str]
    rows: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(cell) for cell in cells])

    def text(self) -> str:
        widths = [
            max(len(row[i]) for row in [self.headers] + self.rows) for i in range(len(self.headers))
        ]

        def line(row: List[str]) -> str:
            return "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            )

        out = [self.title, line(self.headers), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in self.rows]
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [
            f"#### {self.title}",
            "",
            "| " + " | ".join(self.headers) + " |",
            "|" + "|".join([" --- "] + [" ---: "] * (len(self.headers) - 1)) + "|",
        ]
        out += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


@dataclass
class Target:
    """One issue-6 target: ``value`` compared with ``limit``."""

    name: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit is met; False: value >= limit
    unit: str = "×"

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def row(self) -> List[str]:
        sign = "≤" if self.at_most else "≥"
        return [
            self.name,
            f"{self.value:.2f}{self.unit}",
            f"{sign} {self.limit:g}{self.unit}",
            "met" if self.met else "MISSED",
        ]


@dataclass
class Report:
    name: str
    tables: List[Table] = field(default_factory=list)
    targets: List[Target] = field(default_factory=list)
    seconds: float = 0.0
    load: str = ""


def targets_table(targets: List[Target]) -> Table:
    table = Table("Issue-6 targets", ["target", "measured", "target", "verdict"])
    for target in targets:
        table.rows.append(target.row())
    return table


def machine() -> Dict[str, str]:
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


# -- sinks -------------------------------------------------------------------------------
class DiscardSink:
    """Accepts every batch and keeps nothing: the pipeline's cost alone."""

    def __init__(
        self, max_batch_lines: int = 10_000, max_batch_bytes: int = 8 * 1024 * 1024
    ) -> None:
        self.max_batch_lines = max_batch_lines
        self.max_batch_bytes = max_batch_bytes

    def send(self, stream: str, lines: Sequence[bytes]) -> Any:
        from dxtrack.sinks.base import DELIVERED

        return DELIVERED

    def close(self) -> None:
        pass


class GatedSink:
    """Wraps a sink; ``send`` waits until :meth:`open` (so records pile up in the buffer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.max_batch_lines = inner.max_batch_lines
        self.max_batch_bytes = inner.max_batch_bytes
        self.gate = threading.Event()

    def open(self) -> None:
        self.gate.set()

    def shut(self) -> None:
        self.gate.clear()

    def send(self, stream: str, lines: Sequence[bytes]) -> Any:
        self.gate.wait()
        return self.inner.send(stream, lines)

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


# -- botocore answering from a canned response -------------------------------------------------
class _CannedBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def install_canned_firehose(client: Any, stall: threading.Event | None = None) -> None:
    """Answer every PutRecordBatch of ``client`` with a canned 200, sized to the request.

    The answer is given at ``before-send``: botocore still validates,
    serializes (base64, JSON), signs (SigV4 hashes the body) and parses a
    response with one entry per record; only the socket and the server are
    left out. The record count is noted at ``before-parameter-build`` (from
    the call's own arguments), so the handler adds no per-record work. With
    ``stall`` the handler waits on that event first: an endpoint that never
    answers.
    """
    from botocore.awsrequest import AWSResponse

    cache: Dict[int, bytes] = {}
    pending = threading.local()

    def note(params: Dict[str, Any], **_: Any) -> None:
        pending.count = len(params.get("Records", ()))

    def answer(request: Any, **_: Any) -> Any:
        if stall is not None:
            stall.wait()
        count = getattr(pending, "count", 0)
        payload = cache.get(count)
        if payload is None:
            payload = cache[count] = json.dumps(
                {
                    "FailedPutCount": 0,
                    "Encrypted": False,
                    "RequestResponses": [{"RecordId": f"{i:056d}"} for i in range(count)],
                }
            ).encode()
        headers = {
            "x-amzn-RequestId": "bench",
            "Content-Type": "application/x-amz-json-1.1",
            "Content-Length": str(len(payload)),
        }
        return AWSResponse(request.url, 200, headers, _CannedBody(payload))

    events = client.meta.events
    events.register("before-parameter-build.firehose.PutRecordBatch", note)
    events.register("before-send.firehose.PutRecordBatch", answer)


def bare_firehose_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
        "firehose", region_name=REGION, endpoint_url=endpoint_url
    )


def sample_lines(count: int) -> List[bytes]:
    """Finished lines exactly as dxtrack sends them (records with ids), distinct values."""
    import orjson

    from dxtrack.records import finalize

    now = time.time()
    return [
        finalize(
            orjson.dumps(
                {
                    "context": CONTEXT,
                    "metric_name": NAME,
                    "value": float(i),
                    "stage": STAGE,
                    "metadata": METADATA,
                    "run_id": RUN_ID,
                    "timestamp": now,
                }
            )
        )
        for i in range(count)
    ]


# -- a moto server in its own process --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, in a separate process (its own GIL and CPU)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    def reset(self) -> None:
        """Drop all state (S3 objects too), then create the bucket and both streams."""
        from dxtrack.demo import create_landing

        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        create_landing(self.url, bucket=BUCKET, stage=STAGE, region=REGION,
                       credentials=CREDENTIALS)

    def landed_lines(self, stream: str) -> int:
        """Lines in the S3 objects under the stream's prefix."""
        import boto3

        s3 = boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
            "s3", endpoint_url=self.url
        )
        total = 0
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{stream}/"
        ):
            for item in page.get("Contents", []):
                total += s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().count(b"\n")
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
