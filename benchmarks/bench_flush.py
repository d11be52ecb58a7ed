"""Flush latency: ``flush_metrics_buffer()`` with 10,000 and 100,000 metrics pending.

Buffered mode (``buffer_metrics=True``, a one-hour ``flush_interval``). The
sink is wrapped in a gate that holds its ``send`` shut while the metrics are
recorded: the worker takes the first full batch and waits at the gate, the
rest pile up in the buffer. Then the gate opens and ``flush_metrics_buffer()``
is timed: it returns once every recorded metric is delivered. The sinks keep
their own batch sizes (10,000 lines / 8 MiB).

- discarding sink: the pipeline's own cost (ids, batching, hand-over);
- FileSink: appends to ``metric.jsonl`` in a temporary directory (removed
  between rounds).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List

import _common as c

_perf = time.perf_counter


def flush_once(
    dx: Any, gate: c.GatedSink, n: int, pending: List[int], cleanup: Callable[[], None]
) -> float:
    metric, name, md = dx.metric, c.NAME, c.METADATA
    gate.shut()
    for i in range(n):
        metric(name, i, md)
    pending.append(dx.stats()["pending"])
    gate.open()
    start = _perf()
    ok = dx.flush_metrics_buffer(120)
    elapsed = _perf() - start
    if not ok:
        raise RuntimeError(f"flush failed: {dx.stats()}")
    cleanup()
    return elapsed


def run(quick: bool) -> c.Report:
    from dxtrack import DXTrack, FileSink

    report = c.Report("flush")
    sizes = (10_000, 100_000)
    count = 2 if quick else 5
    directory = tempfile.mkdtemp(prefix="dxtrack-bench-")
    file_sink = FileSink(directory)

    def remove_output() -> None:
        try:
            os.remove(file_sink.path("metric"))
        except FileNotFoundError:
            pass

    clients: Dict[str, Any] = {}
    gates: Dict[str, c.GatedSink] = {}
    for key, inner in (("discard", c.DiscardSink()), ("file", file_sink)):
        gates[key] = gate = c.GatedSink(inner)
        clients[key] = dx = DXTrack()
        dx.configure(
            stage="test",
            context=c.CONTEXT,
            run_id=c.RUN_ID,
            sink=gate,
            buffer_metrics=True,
            flush_interval=3600.0,
            max_buffer_records=max(sizes) + 1,
        )
    pending: Dict[str, List[int]] = {}
    variants: Dict[str, Callable[[], float]] = {}
    for key in clients:
        for n in sizes:
            label = f"{key} {n}"
            pending[label] = []
            variants[label] = lambda key=key, n=n, label=label: flush_once(
                clients[key], gates[key], n, pending[label], remove_output
            )

    def flush_empty() -> float:
        start = _perf()
        clients["discard"].flush_metrics_buffer(10)
        return _perf() - start

    variants["empty"] = flush_empty
    try:
        results = c.rounds(count, variants)
    finally:
        for dx in clients.values():
            dx.close(5)
        shutil.rmtree(directory, ignore_errors=True)

    table = c.Table(
        f"Flush latency, buffered mode (ms, median of {count} rounds)",
        ["sink, metrics recorded", "pending at flush", "flush ms", "spread", "µs per metric"],
    )
    for key, label in (("discard", "discarding sink"), ("file", "FileSink")):
        for n in sizes:
            values = results[f"{key} {n}"]
            table.add(
                f"{label}, {n:,}",
                c.fmt_int(c.median(pending[f"{key} {n}"])),
                f"{c.median(values) * 1e3:.1f}",
                c.spread(values, 1e3, 1),
                f"{c.median(values) / n * 1e6:.2f}",
            )
    values = results["empty"]
    table.add("nothing pending", "0", f"{c.median(values) * 1e3:.3f}", c.spread(values, 1e3, 3), "")
    table.notes.append(
        "the first 10,000-line batch is already in the worker's hands (held at the "
        "gate) when the flush starts; it is delivered inside the timed flush too"
    )
    report.tables.append(table)
    return report
