"""Records per second delivered to a moto server from one process.

moto runs as ``python -m moto.server`` in a separate process, so its CPU does
not share this process's GIL. The ceiling is bare boto3 ``put_record_batch``
of pre-serialized 500-record batches (one line per Firehose record) measured
in the same rounds. dxtrack runs in async mode with ``on_full='block'``
(nothing dropped): wall time from the first ``metric()`` to the end of the
``flush_metrics_buffer()`` that delivers the last one, and the lines that
landed in S3 are counted afterwards. The server is reset before every
measurement, so its memory (moto keeps every S3 object) does not grow.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import _common as c

_perf = time.perf_counter
_cpu = time.process_time


def bare(server: c.MotoServer, batches: List[List[Dict[str, bytes]]]) -> Tuple[float, float]:
    server.reset()
    client = c.bare_firehose_client(server.url)
    name = f"dxtrack-metric-input-{c.STAGE}"
    client.put_record_batch(DeliveryStreamName=name, Records=batches[0][:1])  # connect, untimed
    total = sum(len(b) for b in batches)
    start, cpu = _perf(), _cpu()
    for records in batches:
        response = client.put_record_batch(DeliveryStreamName=name, Records=records)
        assert not response["FailedPutCount"]
    elapsed, cpu = _perf() - start, _cpu() - cpu
    client.close()
    return total / elapsed, cpu / elapsed


def dxtrack_run(server: c.MotoServer, n: int, packed: bool) -> Tuple[float, float]:
    from dxtrack import DXTrack

    server.reset()
    dx = DXTrack()
    dx.configure(
        stage=c.STAGE,
        context=c.CONTEXT,
        run_id=c.RUN_ID,
        endpoint_url=server.url,
        region_name=c.REGION,
        use_async_requests=True,
        pack_records=packed,
        on_full="block",
        block_timeout=60.0,
        retry_deadline=5.0,
        **c.CREDENTIALS,
    )
    dx.sink.client()  # create the boto3 client untimed, as a long-running job would have
    metric, name, md = dx.metric, c.NAME, c.METADATA
    start, cpu = _perf(), _cpu()
    for i in range(n):
        metric(name, i, md)
    ok = dx.flush_metrics_buffer(300)
    elapsed, cpu = _perf() - start, _cpu() - cpu
    stats = dx.stats()
    dx.close(5)
    if not ok or stats["delivered"] != n:
        raise RuntimeError(f"delivered {stats['delivered']} of {n}: {stats}")
    landed = server.landed_lines("metric")
    if landed != n:
        raise RuntimeError(f"{landed} lines landed in S3, expected {n}")
    return n / elapsed, cpu / elapsed


def run(quick: bool) -> c.Report:
    report = c.Report("throughput")
    n_bare = 10_000 if quick else 40_000
    n = 10_000 if quick else 40_000
    n_packed = 20_000 if quick else 100_000
    count = 1 if quick else 3
    lines = c.sample_lines(max(n_bare, n, n_packed))
    batches = [[{"Data": line} for line in lines[i : i + 500]] for i in range(0, n_bare, 500)]
    server = c.MotoServer()
    cpu: Dict[str, List[float]] = {"bare": [], "unpacked": [], "packed": []}

    def measure(key: str, fn: Callable[[], Tuple[float, float]]) -> Callable[[], float]:
        def one() -> float:
            rate, busy = fn()
            cpu[key].append(busy)
            return rate

        return one

    variants = {
        "bare": measure("bare", lambda: bare(server, batches)),
        "unpacked": measure("unpacked", lambda: dxtrack_run(server, n, False)),
        "packed": measure("packed", lambda: dxtrack_run(server, n_packed, True)),
    }
    try:
        results = c.rounds(count, variants, warmup=not quick)
    finally:
        server.stop()

    table = c.Table(
        f"Throughput to a moto server in its own process, one client process (records/s, median of "
        f"{count} round(s); {n_bare:,} records bare, {n:,} unpacked, {n_packed:,} packed)",
        ["variant", "records/s", "spread", "÷ bare boto3", "client CPU"],
    )
    labels = {
        "bare": "bare boto3, pre-serialized 500-record batches (ceiling)",
        "unpacked": "dxtrack async, pack_records=False (500 lines per call)",
        "packed": "dxtrack async, pack_records=True",
    }
    for key, label in labels.items():
        values = results[key]
        table.add(
            label,
            c.fmt_int(c.median(values)),
            f"{c.fmt_int(min(values))}–{c.fmt_int(max(values))}",
            f"{c.median(c.paired_ratio(results, key, 'bare')):.2f}",
            f"{c.median(cpu[key][-count:]) * 100:.0f} %",
        )
    table.add("pool of 4 processes", "not measured yet", "", "", "")
    table.notes.append(
        "records = metrics (JSON lines) that landed in S3; every line counted after each run"
    )
    table.notes.append(
        "client CPU = process_time / wall time of the client process (100 % = one core)"
    )
    table.notes.append(
        "pool of 4 processes: belongs to the multiprocessing issue, not measured here"
    )
    report.tables.append(table)
    report.targets.append(
        c.Target(
            "throughput, one process, unpacked: ÷ bare boto3",
            c.median(c.paired_ratio(results, "unpacked", "bare")),
            0.8,
            False,
        )
    )
    report.targets.append(
        c.Target(
            "throughput, one process, packed: ÷ bare boto3",
            c.median(c.paired_ratio(results, "packed", "bare")),
            0.8,
            False,
        )
    )
    return report
