"""StreamBuffer.put of this checkout against another checkout's, in one process, interleaved.

    .venv/bin/python benchmarks/compare_put.py /path/to/other/checkout

Loads the other checkout's ``dxtrack/buffer.py`` beside this one's and times
100,000 appends per round, alternating the two, 9 rounds; prints the medians
and the median of the per-round ratios (this ÷ other). Used for issue 11's
"what keeping the promise costs" in RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import timeit
from typing import Any, Dict, List

from dxtrack.buffer import StreamBuffer
from dxtrack.clock import SystemClock

ROUNDS, CALLS = 9, 100_000
BODY = b'{"x":1' * 40


def load_other(checkout: str) -> Any:
    path = os.path.join(checkout, "dxtrack", "buffer.py")
    spec = importlib.util.spec_from_file_location("dxtrack._other_buffer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its relative imports resolve inside this dxtrack
    spec.loader.exec_module(module)
    return getattr(module, "StreamBuffer", None) or module.RingBuffer  # before issue 12


def per_call_ns(cls: Any) -> float:
    buffer = cls(max_records=10**7, max_bytes=10**10, on_full="drop_newest", block_timeout=1,
                 flush_interval=3600, batch_lines=10**7, batch_bytes=10**10, clock=SystemClock())
    if hasattr(buffer, "worker_started"):  # no worker: only the append is timed
        buffer.worker_started()
    else:
        buffer.worker_running = True
    put = buffer.put
    seconds = timeit.timeit(lambda: [put("metric", BODY, False) for _ in range(CALLS)], number=1)
    return seconds / CALLS * 1e9


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    variants = {"this": StreamBuffer, "other": load_other(argv[0])}
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, cls in variants.items():
            times[name].append(per_call_ns(cls))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.0f} ns per put")
    ratios = [a / b for a, b in zip(times["this"], times["other"])]
    print(f"this ÷ other: {statistics.median(ratios):.2f} (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
