"""Peak RSS while emitting millions of metrics, endpoint healthy and endpoint stalled.

Each case runs in a fresh child interpreter (this file with ``--child``),
which reports:

- baseline: VmRSS with dxtrack imported;
- ready: VmRSS once configured, with its boto3 client created;
- peak: VmHWM (the high-water mark) at the end of the run.

The sink is the real FirehoseSink (packed, async mode) whose boto3 client
answers from a canned response (healthy), or whose request never returns
(stalled: the handler waits forever, like a hung endpoint). Healthy runs use
``on_full='block'`` so every record is delivered; stalled runs keep the
default ``'drop_newest'``. The claim to check: the peak depends on the buffer
settings, not on how many records were emitted, so 500,000 and 2,000,000
metrics peak at the same RSS, and a smaller ``max_buffer_records`` peaks lower.

The children do not call ``_common.steady_malloc()``: these are the RSS
figures a job sees with the default allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

import _common as c

MiB = 1024 * 1024


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``ru_maxrss`` for VmHWM elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, n: int, max_records: int) -> None:
    import dxtrack
    from dxtrack.records import RecordBuilder

    baseline = _status("VmRSS")
    dx = dxtrack.DXTrack()
    config = dx.configure(
        stage=c.STAGE,
        context=c.CONTEXT,
        run_id=c.RUN_ID,
        endpoint_url=c.UNUSED_ENDPOINT,
        region_name=c.REGION,
        use_async_requests=True,
        pack_records=True,
        max_buffer_records=max_records,
        on_full="block" if mode == "healthy" else "drop_newest",
        block_timeout=60.0,
        shutdown_timeout=0.1,
        **c.CREDENTIALS,
    )
    stall: threading.Event | None = threading.Event() if mode == "stalled" else None
    c.install_canned_firehose(dx.sink.client(), stall=stall)
    sample = RecordBuilder(config).metric(c.NAME, 123456, c.METADATA)
    held = min(max_records, config.max_buffer_bytes // len(sample))
    bound = held * (sys.getsizeof(sample) + 8)  # bytes objects + deque slots
    ready = _status("VmRSS")
    metric, name, md = dx.metric, c.NAME, c.METADATA
    start = time.perf_counter()
    for i in range(n):
        metric(name, i, md)
    ok = dx.flush_metrics_buffer(300) if mode == "healthy" else None
    elapsed = time.perf_counter() - start
    stats = dx.stats()
    print(
        json.dumps(
            {
                "baseline": baseline,
                "ready": ready,
                "peak": _status("VmHWM"),
                "bound": bound,
                "elapsed": elapsed,
                "flushed": ok,
                "delivered": stats["delivered"],
                "dropped": sum(stats["dropped"].values()),
                "pending": stats["pending"],
            }
        ),
        flush=True,
    )
    os._exit(0)  # a stalled worker must not hold up the exit


def measure(mode: str, n: int, max_records: int) -> Dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, str(n), str(max_records)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"memory child {mode} {n} failed:\n{out.stderr}")
    result: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> c.Report:
    report = c.Report("memory")
    small, large = (50_000, 200_000) if quick else (500_000, 2_000_000)
    default = 10_000 if quick else 100_000  # quick runs shrink the buffer with the counts
    reduced = default // 10
    cases = [
        ("healthy", small, default),
        ("healthy", large, default),
        ("stalled", small, default),
        ("stalled", large, default),
        ("stalled", large, reduced),
    ]
    results: List[Dict[str, Any]] = [measure(*case) for case in cases]

    table = c.Table(
        "Peak RSS, one child interpreter per row (MiB; FirehoseSink packed, async mode, "
        "botocore answering at before-send, or never)",
        [
            "endpoint, metrics, max_buffer_records",
            "baseline",
            "ready",
            "peak",
            "peak − ready",
            "buffer bound",
            "delivered",
            "dropped",
            "s",
        ],
    )
    for (mode, n, max_records), r in zip(cases, results):
        table.add(
            f"{mode}, {n:,}, {max_records:,}",
            f"{r['baseline'] / MiB:.1f}",
            f"{r['ready'] / MiB:.1f}",
            f"{r['peak'] / MiB:.1f}",
            f"{(r['peak'] - r['ready']) / MiB:.1f}",
            f"{r['bound'] / MiB:.1f}",
            f"{r['delivered']:,}",
            f"{r['dropped']:,}",
            f"{r['elapsed']:.1f}",
        )
    table.notes.append(
        "baseline = VmRSS with dxtrack imported; ready = configured, boto3 client "
        "created; peak = VmHWM"
    )
    table.notes.append(
        "buffer bound = records the buffer may hold × (bytes object + deque slot), "
        "from max_buffer_records and max_buffer_bytes (32 MiB)"
    )
    table.notes.append(
        "healthy: on_full='block', everything delivered; stalled: the default "
        "'drop_newest', the first batch hangs in the worker"
    )
    report.tables.append(table)

    growth = [r["peak"] - r["ready"] for r in results]
    # Same settings, 4x the records: the growth must not follow the record count.
    report.targets.append(
        c.Target(
            f"RSS healthy: growth {large:,} ÷ growth {small:,}", growth[1] / growth[0], 1.25, True
        )
    )
    report.targets.append(
        c.Target(
            f"RSS stalled: growth {large:,} ÷ growth {small:,}", growth[3] / growth[2], 1.25, True
        )
    )
    report.targets.append(
        c.Target("RSS stalled: growth ÷ buffer bound", growth[3] / results[3]["bound"], 1.5, True)
    )
    return report


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("run it through benchmarks/run.py memory")
