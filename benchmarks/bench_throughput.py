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


_pool_client = None  # one client per pool worker, made by _pool_init


def _pool_init(url: str, packed: bool) -> None:
    global _pool_client
    from dxtrack import DXTrack

    _pool_client = DXTrack()
    _pool_client.configure(
        stage=c.STAGE, context=c.CONTEXT, run_id=c.RUN_ID, endpoint_url=url,
        region_name=c.REGION, use_async_requests=True, pack_records=packed, on_full="block",
        block_timeout=60.0, retry_deadline=5.0, **c.CREDENTIALS,
    )
    _pool_client.sink.client()  # untimed, as in the one-process run


def _pool_job(span: Tuple[int, int]) -> int:
    assert _pool_client is not None
    metric, name, md = _pool_client.metric, c.NAME, c.METADATA
    for i in range(*span):
        metric(name, i, md)
    if not _pool_client.flush_metrics_buffer(300):
        raise RuntimeError(f"a pool worker could not deliver: {_pool_client.stats()}")
    return span[1] - span[0]


def pool_run(server: c.MotoServer, n: int, packed: bool, workers: int = 4) -> Tuple[float, float]:
    """The same n records from a pool of ``workers`` processes (started untimed)."""
    import multiprocessing

    server.reset()
    step = n // workers
    spans = [(w * step, n if w == workers - 1 else (w + 1) * step) for w in range(workers)]
    pool = multiprocessing.get_context("fork").Pool(
        workers, initializer=_pool_init, initargs=(server.url, packed)
    )
    try:
        pool.map(abs, range(workers), chunksize=1)  # every worker up and configured
        start = _perf()
        sent = sum(pool.map(_pool_job, spans, chunksize=1))
        elapsed = _perf() - start
    finally:
        pool.close()
        pool.join()
    landed = server.landed_lines("metric")
    if sent != n or landed != n:
        raise RuntimeError(f"pool: {sent} sent, {landed} landed in S3, expected {n}")
    return n / elapsed, float("nan")


def run(quick: bool) -> c.Report:
    report = c.Report("throughput")
    n_bare = 10_000 if quick else 40_000
    n = 10_000 if quick else 40_000
    n_packed = 20_000 if quick else 100_000
    count = 1 if quick else 3
    lines = c.sample_lines(max(n_bare, n, n_packed))
    batches = [[{"Data": line} for line in lines[i : i + 500]] for i in range(0, n_bare, 500)]
    server = c.MotoServer()
    cpu: Dict[str, List[float]] = {
        "bare": [], "unpacked": [], "packed": [], "pool-unpacked": [], "pool-packed": [],
    }

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
        "pool-unpacked": measure("pool-unpacked", lambda: pool_run(server, n, False)),
        "pool-packed": measure("pool-packed", lambda: pool_run(server, n_packed, True)),
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
        "pool-unpacked": "pool of 4 processes, pack_records=False",
        "pool-packed": "pool of 4 processes, pack_records=True",
    }
    for key, label in labels.items():
        values = results[key]
        busy = c.median(cpu[key][-count:])
        table.add(
            label,
            c.fmt_int(c.median(values)),
            f"{c.fmt_int(min(values))}–{c.fmt_int(max(values))}",
            f"{c.median(c.paired_ratio(results, key, 'bare')):.2f}",
            "" if busy != busy else f"{busy * 100:.0f} %",  # NaN: not measured across processes
        )
    pool_vs_one = {
        packing: c.median(c.paired_ratio(results, f"pool-{packing}", packing))
        for packing in ("unpacked", "packed")
    }
    table.notes.append(
        "records = metrics (JSON lines) that landed in S3; every line counted after each run"
    )
    table.notes.append(
        "client CPU = process_time / wall time of the client process (100 % = one core)"
    )
    table.notes.append(
        "pool: 4 forked workers, each with its own client, sending a quarter of the same records; "
        "timed from the first metric() to the last worker's flush (pool start-up untimed); "
        f"pool ÷ one process: unpacked {pool_vs_one['unpacked']:.2f}, "
        f"packed {pool_vs_one['packed']:.2f} (2 cores, moto's server included)"
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
