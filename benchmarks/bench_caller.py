"""Caller cost of ``metric()`` and ``error()`` in each mode, against the floor and 0.6.

Per call, for a loop of calls with the same inputs everywhere (name, an int
value, a three-key metadata dict), two clocks:

- wall time (``perf_counter``): what the job waits. The worker thread shares
  the GIL, so its work (ids, batching) is in here too, as it would be in a job;
  so is any CPU that other processes take from this one.
- caller CPU (``thread_time`` of the calling thread): the caller's own path,
  steadier when the machine is busy.

Baselines, timed the same way in the same rounds:

- floor: build the record dict, ``orjson.dumps``, ``deque.append``;
- 0.6 approach: ``copy.deepcopy`` of the metadata, ``datetime.utcnow().strftime``,
  ``json.dumps``, sha256 of the JSON as the id, append the record to a list.

Memory is kept steady so page faults do not pollute the numbers: the
baselines' containers are cleared every ``CHUNK`` appends, dxtrack's buffer is
drained by its worker and flushed (untimed) after every measurement, the sink
discards, and a warm-up round runs first.
"""

from __future__ import annotations

import collections
import copy
import datetime
import hashlib
import json
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Tuple

import _common as c
import orjson

# dxtrack 0.6 used utcnow(); Python 3.12+ warns about it on every call.
warnings.filterwarnings("ignore", category=DeprecationWarning)

CHUNK = 2_000
_perf = time.perf_counter
_cpu = time.thread_time
PerCall = Tuple[float, float]  # (wall, caller CPU) seconds per call


def floor(n: int) -> PerCall:
    queue: Any = collections.deque()
    dumps, now, md = orjson.dumps, time.time, c.METADATA
    context, name, stage, run_id = c.CONTEXT, c.NAME, c.STAGE, c.RUN_ID
    wall, cpu = _perf(), _cpu()
    for base in range(0, n, CHUNK):
        for i in range(base, base + CHUNK):
            queue.append(
                dumps(
                    {
                        "context": context,
                        "metric_name": name,
                        "value": i,
                        "stage": stage,
                        "metadata": md,
                        "run_id": run_id,
                        "timestamp": now(),
                    }
                )
            )
        queue.clear()
    return (_perf() - wall) / n, (_cpu() - cpu) / n


_FORMAT_06 = "%Y-%m-%d %H:%M:%S.%f"


def v06(n: int) -> PerCall:
    buffer: List[Dict[str, Any]] = []
    md = c.METADATA
    context, name, stage, run_id = c.CONTEXT, c.NAME, c.STAGE, c.RUN_ID
    deepcopy, utcnow, dumps, sha256 = (
        copy.deepcopy,
        datetime.datetime.utcnow,
        json.dumps,
        hashlib.sha256,
    )
    wall, cpu = _perf(), _cpu()
    for base in range(0, n, CHUNK):
        for i in range(base, base + CHUNK):
            float(i)  # 0.6 checked the value with float() (and then stored the original)
            record = {
                "context": context,
                "metric_name": name,
                "value": i,
                "stage": stage,
                "metadata": deepcopy(md),
                "run_id": run_id,
                "timestamp": utcnow().strftime(_FORMAT_06),
            }
            record["id"] = sha256(dumps(record).encode()).hexdigest()
            buffer.append(record)
        buffer.clear()
    return (_perf() - wall) / n, (_cpu() - cpu) / n


def _fail() -> None:
    raise ValueError("page 3 of example-shop returned no products")


def raise_only(n: int) -> PerCall:
    wall, cpu = _perf(), _cpu()
    for _ in range(n):
        try:
            _fail()
        except ValueError:
            pass
    return (_perf() - wall) / n, (_cpu() - cpu) / n


def v06_error(n: int) -> PerCall:
    buffer: List[Dict[str, Any]] = []
    md = c.METADATA
    wall, cpu = _perf(), _cpu()
    for base in range(0, n, CHUNK):
        for _ in range(min(CHUNK, n - base)):
            try:
                _fail()
            except ValueError:
                exc_type, exc, tb = sys.exc_info()
                record = {
                    "context": c.CONTEXT,
                    "exception": {
                        "type": exc_type.__name__,  # type: ignore[union-attr]
                        "value": str(exc),
                        "traceback": "".join(traceback.format_tb(tb)),
                    },
                    "stage": c.STAGE,
                    "metadata": copy.deepcopy(md),
                    "timestamp": datetime.datetime.utcnow().strftime(_FORMAT_06),
                    "run_id": c.RUN_ID,
                }
                record["id"] = hashlib.sha256(json.dumps(record).encode()).hexdigest()
                buffer.append(record)
        buffer.clear()
    return (_perf() - wall) / n, (_cpu() - cpu) / n


def client(**options: Any) -> Any:
    from dxtrack import DXTrack

    dx = DXTrack()
    dx.configure(stage="test", context=c.CONTEXT, run_id=c.RUN_ID, sink=c.DiscardSink(), **options)
    return dx


def dx_metric(dx: Any, n: int) -> PerCall:
    metric, name, md = dx.metric, c.NAME, c.METADATA
    wall, cpu = _perf(), _cpu()
    for i in range(n):
        metric(name, i, md)
    wall, cpu = _perf() - wall, _cpu() - cpu
    dx.flush_metrics_buffer(60)  # untimed: the next measurement starts with an empty buffer
    return wall / n, cpu / n


def dx_error(dx: Any, n: int) -> PerCall:
    error, md = dx.error, c.METADATA
    wall, cpu = _perf(), _cpu()
    for _ in range(n):
        try:
            _fail()
        except ValueError:
            error(md)
    wall, cpu = _perf() - wall, _cpu() - cpu
    dx.flush_metrics_buffer(60)
    return wall / n, cpu / n


LABELS = {
    "floor": "floor: dict + orjson.dumps + deque.append",
    "0.6": "0.6 approach (deepcopy, strftime, json.dumps, sha256, list)",
    "async": "metric(), use_async_requests=True",
    "buffered": "metric(), buffer_metrics=True",
    "default": "metric(), default mode (waits for delivery)",
    "raise": "raise + except alone (reference for the error rows)",
    "0.6 error": "0.6 error approach (format_tb, deepcopy, strftime, json, sha256)",
    "error async": "error() in except, use_async_requests=True",
    "error default": "error() in except, default mode (waits for delivery)",
}


def run(quick: bool) -> c.Report:
    report = c.Report("caller")
    # Calls per round: each variant takes roughly 0.1 to 0.6 s of a round.
    n = 25_000 if quick else 100_000
    n06 = 5_000 if quick else 20_000
    n_sync = 1_000 if quick else 5_000
    n_err = 1_000 if quick else 3_000
    count = 3 if quick else 5
    sync, asyn, buffered = client(), client(use_async_requests=True), client(buffer_metrics=True)
    variants: Dict[str, Callable[[], Any]] = {
        "floor": lambda: floor(n),
        "0.6": lambda: v06(n06),
        "async": lambda: dx_metric(asyn, n),
        "buffered": lambda: dx_metric(buffered, n),
        "default": lambda: dx_metric(sync, n_sync),
        "raise": lambda: raise_only(n_err),
        "0.6 error": lambda: v06_error(n_err),
        "error async": lambda: dx_error(asyn, n_err),
        "error default": lambda: dx_error(sync, n_err // 3),
    }
    try:
        results = c.rounds(count, variants)
        for dx in (sync, asyn, buffered):
            if dx.stats()["dropped"]:
                raise RuntimeError(f"records were dropped: {dx.stats()}")
    finally:
        for dx in (sync, asyn, buffered):
            dx.close(5)
    wall = {key: [w for w, _ in values] for key, values in results.items()}
    cpu = {key: [t for _, t in values] for key, values in results.items()}

    table = c.Table(
        f"Caller cost per call (µs; median of {count} rounds; calls per round: {n:,} metric(), "
        f"{n06:,} 0.6, {n_sync:,} default mode, {n_err:,} error)",
        ["variant", "wall µs", "spread", "× floor", "0.6 ÷ this", "caller CPU µs", "× floor (CPU)"],
    )
    for key, label in LABELS.items():
        base06 = "0.6 error" if "error" in key else "0.6"
        vs06 = (
            ""
            if key in ("floor", "raise", "0.6", "0.6 error")
            else f"{c.median(c.paired_ratio(wall, base06, key)):.1f}"
        )
        table.add(
            label,
            f"{c.median(wall[key]) * 1e6:.2f}",
            c.spread(wall[key], 1e6),
            f"{c.median(c.paired_ratio(wall, key, 'floor')):.2f}",
            vs06,
            f"{c.median(cpu[key]) * 1e6:.2f}",
            f"{c.median(c.paired_ratio(cpu, key, 'floor')):.2f}",
        )
    table.notes.append(
        "ratios are medians of per-round ratios (both sides measured in the same round)"
    )
    table.notes.append(
        "sink: discards (10,000 lines / 8 MiB per batch); stage 'test'; no default_metadata"
    )
    table.notes.append(
        "caller CPU leaves out the worker's share (ids, batching), which wall time includes"
    )
    report.tables.append(table)
    for key in ("async", "buffered"):
        report.targets.append(
            c.Target(
                f"metric() {key}: wall × floor",
                c.median(c.paired_ratio(wall, key, "floor")),
                2.0,
                True,
            )
        )
        report.targets.append(
            c.Target(
                f"metric() {key}: caller CPU × floor",
                c.median(c.paired_ratio(cpu, key, "floor")),
                2.0,
                True,
            )
        )
        report.targets.append(
            c.Target(
                f"metric() {key}: 0.6 wall ÷ this",
                c.median(c.paired_ratio(wall, "0.6", key)),
                8.0,
                False,
            )
        )
    return report
