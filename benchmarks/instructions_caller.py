"""Instructions per call of the caller's path, counted by valgrind's callgrind.

    .venv/bin/python benchmarks/instructions_caller.py [--calls N] [VARIANT ...]

Wall and CPU time on a shared VM move by ±20 % between runs; instruction counts move by
well under 1 %, so they compare two versions of a micro-change. Each variant runs twice
under callgrind in a fresh interpreter, with N calls and with none (same imports and
set-up); the difference divided by N is what one call costs. Every variant makes its
calls from a one-line function, ``call(i)``, whose own cost is the ``empty`` row: subtract
it to compare with ``benchmarks/bench_caller.py``'s loops. Needs ``valgrind`` on PATH.

Variants: empty, floor (dict + orjson.dumps + deque.append, as bench_caller), build
(``RecordBuilder.metric``), put (``StreamBuffer.put``, the locked path), offer
(``StreamBuffer.offer``, the inbox), finalize (the worker's id),
async-caller / buffered-caller (``metric()`` with the worker held off: the caller's path
alone), async / buffered (``metric()`` with its worker, which delivers in the same process).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

VARIANTS = ("empty", "floor", "build", "put", "offer", "finalize", "async-caller",
            "buffered-caller", "async", "buffered")


def workload(variant: str, calls: int) -> None:
    """Set up ``variant``, warm it, make ``calls`` calls and leave without clean-up."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as c
    import orjson

    c.steady_malloc()
    from dxtrack import DXTrack
    from dxtrack.records import finalize

    md, name = c.METADATA, c.NAME
    queue: Any = collections.deque()
    dx = DXTrack()
    mode = {"use_async_requests": True} if variant.startswith("async") \
        else {"buffer_metrics": True}
    held = variant in ("build", "put", "offer", "finalize") or variant.endswith("-caller")
    # Held off, the worker never takes: a batch as big as the buffer keeps the queue short of
    # "ready" for every call, as a worker that takes would.
    sink = c.DiscardSink(max_batch_lines=10**6) if held else c.DiscardSink()
    dx.configure(stage="test", context=c.CONTEXT, run_id=c.RUN_ID, sink=sink,
                 max_buffer_records=10**6, max_buffer_bytes=2**31, **mode)
    builder, pipeline = dx._state  # a benchmark may look inside
    if held:
        pipeline.buffer.worker_started()  # the worker must not run: only the caller is counted
    build, metric = builder.metric, dx.metric
    put, offer = pipeline.buffer.put, pipeline.buffer.offer
    body = build(name, 1, md)
    dumps, now = orjson.dumps, time.time
    context, stage, run_id = c.CONTEXT, c.STAGE, c.RUN_ID
    calls_of: Dict[str, Callable[[int], None]] = {
        "empty": lambda i: queue.append(i),
        "floor": lambda i: queue.append(dumps({
            "context": context, "metric_name": name, "value": i, "stage": stage,
            "metadata": md, "run_id": run_id, "timestamp": now()})),
        "build": lambda i: queue.append(build(name, i, md)),
        "put": lambda i: queue.append(put("metric", body, False)),
        "offer": lambda i: queue.append(offer(body)),
        "finalize": lambda i: queue.append(finalize(body)),
    }
    call = calls_of.get(variant, lambda i: metric(name, i, md))
    for i in range(200):
        call(i)
    queue.clear()
    for i in range(calls):
        call(i)
    if variant in ("async", "buffered"):
        dx.flush(60)  # the worker's share: ids and batching, in this process
    os._exit(0)  # no close(): the same exit for N calls and for none


def count(variant: str, calls: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         os.path.abspath(__file__), "--run", variant, "--calls", str(calls)],
        capture_output=True, text=True, check=True).stderr
    return int(re.findall(r"Collected : (\d+)", out)[-1])


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=", ".join(VARIANTS))
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        workload(args.run, args.calls)
        return
    for variant in args.variants or VARIANTS:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        per_call = (count(variant, args.calls) - count(variant, 0)) / args.calls
        print(f"{variant:16s} {per_call:8,.0f} instructions per call", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
