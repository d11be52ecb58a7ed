"""CPU per delivered metric: caller plus worker, packing on and off.

``time.process_time()`` (all threads of this process) over a whole run:
``n`` calls to ``metric()`` and the ``flush_metrics_buffer()`` that delivers
them. The sink is dxtrack's real FirehoseSink; its boto3 client answers from
a canned response at ``before-send`` (see ``_common.install_canned_firehose``),
so validation, base64, JSON, SigV4 signing and response parsing are all
counted and only the socket and the server are left out.

Baselines measured in the same rounds:

- the floor (dict + ``orjson.dumps`` + ``deque.append``), CPU per record;
- bare boto3: ``put_record_batch`` of pre-serialized 500-record batches through
  the same canned client, CPU per record: the unpacked path's ceiling.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import _common as c
import bench_caller

_cpu = time.process_time


def floor_cpu(n: int) -> float:
    start = _cpu()
    bench_caller.floor(n)
    return (_cpu() - start) / n


def firehose_client(**options: Any) -> Any:
    from dxtrack import DXTrack

    dx = DXTrack()
    dx.configure(
        stage=c.STAGE,
        context=c.CONTEXT,
        run_id=c.RUN_ID,
        endpoint_url=c.UNUSED_ENDPOINT,
        region_name=c.REGION,
        on_full="block",
        block_timeout=60.0,
        retry_deadline=5.0,
        **c.CREDENTIALS,
        **options,
    )
    c.install_canned_firehose(dx.sink.client())
    return dx


def dx_cpu(dx: Any, n: int) -> float:
    metric, name, md = dx.metric, c.NAME, c.METADATA
    before = dx.stats()["delivered"]
    start = _cpu()
    for i in range(n):
        metric(name, i, md)
    ok = dx.flush_metrics_buffer(120)
    elapsed = _cpu() - start
    delivered = dx.stats()["delivered"] - before
    if not ok or delivered != n:
        raise RuntimeError(f"delivered {delivered} of {n} metrics: {dx.stats()}")
    return elapsed / n


def bare_cpu(client: Any, batches: List[List[Dict[str, bytes]]]) -> float:
    name = f"dxtrack-metric-input-{c.STAGE}"
    put = client.put_record_batch
    start = _cpu()
    for records in batches:
        put(DeliveryStreamName=name, Records=records)
    return (_cpu() - start) / sum(len(b) for b in batches)


def run(quick: bool) -> c.Report:
    report = c.Report("cpu")
    n = 20_000 if quick else 100_000
    n_unpacked = 10_000 if quick else 40_000
    count = 2 if quick else 5
    packed = firehose_client(use_async_requests=True, pack_records=True)
    unpacked = firehose_client(use_async_requests=True, pack_records=False)
    buffered = firehose_client(buffer_metrics=True, pack_records=True)
    bare = c.bare_firehose_client(c.UNUSED_ENDPOINT)
    c.install_canned_firehose(bare)
    lines = c.sample_lines(n_unpacked)
    batches = [[{"Data": line} for line in lines[i : i + 500]] for i in range(0, len(lines), 500)]
    variants: Dict[str, Callable[[], float]] = {
        "floor": lambda: floor_cpu(n),
        "bare": lambda: bare_cpu(bare, batches),
        "packed": lambda: dx_cpu(packed, n),
        "buffered": lambda: dx_cpu(buffered, n),
        "unpacked": lambda: dx_cpu(unpacked, n_unpacked),
    }
    try:
        results = c.rounds(count, variants)
        calls = {
            key: dx.stats().get("put_record_batch_calls", 0)
            for key, dx in (("packed", packed), ("buffered", buffered), ("unpacked", unpacked))
        }
    finally:
        for dx in (packed, unpacked, buffered):
            dx.close(5)

    table = c.Table(
        f"CPU per delivered metric (µs, process_time of caller + worker incl. flush, median of "
        f"{count} rounds; {n:,} metrics per round, {n_unpacked:,} unpacked; FirehoseSink, "
        "botocore answering at before-send)",
        ["variant", "µs CPU/metric", "spread", "× floor", "÷ bare boto3"],
    )
    labels = {
        "floor": "floor: dict + orjson.dumps + deque.append (no delivery)",
        "bare": "bare boto3 put_record_batch, pre-serialized 500-record batches",
        "packed": "dxtrack async, pack_records=True",
        "buffered": "dxtrack buffered, pack_records=True",
        "unpacked": "dxtrack async, pack_records=False",
    }
    for key, label in labels.items():
        values = results[key]
        table.add(
            label,
            f"{c.median(values) * 1e6:.2f}",
            c.spread(values, 1e6),
            f"{c.median(c.paired_ratio(results, key, 'floor')):.2f}",
            f"{c.median(c.paired_ratio(results, key, 'bare')):.2f}",
        )
    table.notes.append(
        "PutRecordBatch calls over all rounds (incl. warm-up): "
        + ", ".join(f"{key} {value:,}" for key, value in calls.items())
    )
    table.notes.append(
        "on_full='block' so every metric is delivered; delivery is checked in stats()"
    )
    report.tables.append(table)
    report.targets.append(
        c.Target(
            "CPU per delivered metric, packed (async): × floor",
            c.median(c.paired_ratio(results, "packed", "floor")),
            3.0,
            True,
        )
    )
    report.targets.append(
        c.Target(
            "CPU per delivered metric, packed (buffered): × floor",
            c.median(c.paired_ratio(results, "buffered", "floor")),
            3.0,
            True,
        )
    )
    return report
