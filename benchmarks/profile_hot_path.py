"""Where the CPU of a metric goes, and what proposed changes would save.

    .venv/bin/python benchmarks/profile_hot_path.py [--rounds N]

Not part of ``make bench``: a tool for working on the hot path. It times each
piece on the calling thread's CPU clock (``time.thread_time``, which load from
other processes inflates less than wall time), with the worker kept out of the
way, and next to each piece a variant with one change (labelled P1, P2, ...).
The variants are copies of the library's code as of this script, changed in
one place; the library itself is not modified. Figures are ns per record,
medians of interleaved rounds.

P1 to P4 have since been applied to the library: for those, the "current"
copies here show the code as it was before them, which is what RESULTS.md's
before/after figures compare. The end-to-end part (in-process patches) only
means something for the proposals not applied yet (P5 on).

Since issue 16, ``RecordBuilder.metric`` joins pre-serialized parts instead of dumping
the whole record dict: ``metric_p1`` and ``metric_p1_p2`` below are the dict-building
method as it was, so patching them in now measures a step back, not forward. The
instruction counts of the current caller's path are ``instructions_caller.py``'s.
"""

from __future__ import annotations

import argparse
import binascii
import bisect
import collections
import hashlib
import itertools
import os
import statistics
import sys
import time
import timeit
import traceback
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c
import orjson

N = 50_000
CHUNK = 2_000
ERROR_ROWS = ("RecordBuilder.error", "  P6")  # these rows make N // 50 calls
BATCH = 18_000  # lines in one packed 4 MiB batch of these records
_clock = time.thread_time
_dumps = orjson.dumps
_time = time.time
_sha256 = hashlib.sha256
_hexlify = binascii.hexlify


# -- P1: RecordBuilder.metric with a plain-dict fast path --
def metric_p1(
    self: Any, name: str, value: Any, metadata: Any = None, timestamp: Any = None
) -> bytes:
    """As the library's, but a plain dict skips ``isinstance(metadata, typing.Mapping)``
    (and the ``_merge`` call) when there is no default metadata."""
    if type(name) is not str or not name:
        raise ValueError(name)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(value) from None
    if number - number != 0.0:
        raise ValueError(value)
    if metadata is None:
        metadata = self._default
    elif type(metadata) is not dict or self._default:
        metadata = self._merge(metadata)
    record = {
        "context": self._context,
        "metric_name": name,
        "value": number,
        "stage": self._stage,
        "metadata": metadata,
        "run_id": self._run_id,
        "timestamp": _time()
        if timestamp is None and not self._datetime_format
        else self._timestamp(timestamp),
    }
    body = _dumps(record)
    if len(body) > 1_000_000:
        raise ValueError(name)
    return body


# -- P2: exact-size bodies; P3: finalize with one format --
def metric_p1_p2(
    self: Any, name: str, value: Any, metadata: Any = None, timestamp: Any = None
) -> bytes:
    """P1, and the body kept without its closing brace: ``body[:-1]`` is an exact-size
    copy, so orjson's over-allocated buffer is freed at once (finalize adds the brace)."""
    if type(name) is not str or not name:
        raise ValueError(name)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(value) from None
    if number - number != 0.0:
        raise ValueError(value)
    if metadata is None:
        metadata = self._default
    elif type(metadata) is not dict or self._default:
        metadata = self._merge(metadata)
    record = {
        "context": self._context,
        "metric_name": name,
        "value": number,
        "stage": self._stage,
        "metadata": metadata,
        "run_id": self._run_id,
        "timestamp": _time()
        if timestamp is None and not self._datetime_format
        else self._timestamp(timestamp),
    }
    body = _dumps(record)
    if len(body) > 1_000_000:
        raise ValueError(name)
    return body[:-1]


def finalize_current(body: bytes) -> bytes:
    digest = _sha256(body).hexdigest().encode()
    return body[:-1] + b',"id":"' + digest + b'"}\n'


def finalize_p3(body: bytes) -> bytes:
    """One bytes %-format instead of three concatenations; hexlify gives bytes directly."""
    return b'%b,"id":"%b"}\n' % (body[:-1], _hexlify(_sha256(body).digest()))


def finalize_p2_p3(open_body: bytes) -> bytes:
    """The same for a body stored without its closing brace (P2): the id is unchanged."""
    digest = _sha256(open_body)
    digest.update(b"}")
    return b'%b,"id":"%b"}\n' % (open_body, _hexlify(digest.digest()))


# -- P4: StreamBuffer._take_batch takes the whole queue when it fits --
def take_current(queue: Any, limit_lines: int, limit_bytes: int, overhead: int) -> List[bytes]:
    batch: List[bytes] = []
    size = 0
    while queue and len(batch) < limit_lines:
        line_size = len(queue[0]) + overhead
        if batch and size + line_size > limit_bytes:
            break
        batch.append(queue.popleft())
        size += line_size
    return batch


def take_p4(
    queue: Any, limit_lines: int, limit_bytes: int, overhead: int, queued: int
) -> List[bytes]:
    if len(queue) <= limit_lines and queued + overhead * len(queue) <= limit_bytes:
        batch = list(queue)
        queue.clear()
        return batch
    return take_current(queue, limit_lines, limit_bytes, overhead)


# -- P5: the sink's per-line checks and packing in C-level loops --
MAX_RECORD = 1_024_000
Record = Tuple[bytes, Sequence[bytes]]


def checks_current(lines: Sequence[bytes]) -> int:
    """FirehoseSink.send's oversize count, then plan_calls' own check: two Python loops."""
    oversize = sum(1 for line in lines if len(line) > MAX_RECORD)
    for line in lines:
        if len(line) > MAX_RECORD:
            raise ValueError
    return oversize


def checks_p5(lines: Sequence[bytes]) -> int:
    """One ``max(map(len, lines))``; count only when something is over."""
    if lines and max(map(len, lines)) > MAX_RECORD:
        return sum(1 for line in lines if len(line) > MAX_RECORD)
    return 0


def pack_current(lines: Sequence[bytes], max_record_bytes: int) -> Iterator[Record]:
    group: List[bytes] = []
    size = 0
    for line in lines:
        if group and size + len(line) > max_record_bytes:
            yield b"".join(group), group
            group, size = [], 0
        group.append(line)
        size += len(line)
    if group:
        yield b"".join(group), group


def pack_p5(lines: Sequence[bytes], max_record_bytes: int) -> Iterator[Record]:
    """Running totals by ``itertools.accumulate``, record boundaries by ``bisect``."""
    ends = list(itertools.accumulate(map(len, lines)))
    start, done, count = 0, 0, len(ends)
    while start < count:
        stop = max(bisect.bisect_right(ends, done + max_record_bytes, start), start + 1)
        group = lines[start:stop]
        yield b"".join(group), group
        done, start = ends[stop - 1], stop


# -- P6: tracebacks without the 3.11+ caret lines --
def format_traceback_p6(exc: BaseException) -> str:
    """The traceback as Python 3.10 printed it, chained exceptions included.

    Python 3.11+ ``format_exception`` compiles each source line to place its
    ``^^^^`` markers; that is most of what ``error()`` costs.
    """
    chain: List[BaseException] = []
    seen = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    out: List[str] = []
    for index, item in enumerate(reversed(chain)):
        if index:
            out.append(
                traceback._cause_message  # type: ignore[attr-defined]
                if chain[len(chain) - index].__cause__ is not None
                else traceback._context_message  # type: ignore[attr-defined]
            )
        if item.__traceback__ is not None:
            out.append("Traceback (most recent call last):\n")
            for frame in traceback.extract_tb(item.__traceback__):
                out.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
                if frame.line:
                    out.append(f"    {frame.line.strip()}\n")
        out.extend(traceback.format_exception_only(type(item), item))
    return "".join(out)


# -- applying proposals in-process, for end-to-end what-ifs --
def take_batch_p4(self: Any, s: Any, now: float) -> Tuple[str, List[bytes], int]:
    """StreamBuffer._take_batch with P4: the whole queue in one C call when it fits."""
    from dxtrack.records import ID_OVERHEAD

    queue = s.queue
    count = len(queue)
    if count <= self.batch_lines and s.bytes + ID_OVERHEAD * count <= self.batch_bytes:
        batch = list(queue)
        queue.clear()
        size = s.bytes + ID_OVERHEAD * count
    else:
        batch = take_current(queue, self.batch_lines, self.batch_bytes, ID_OVERHEAD)
        size = sum(map(len, batch)) + ID_OVERHEAD * len(batch)
    first = s.taken + 1
    s.taken += len(batch)
    s.bytes -= size - ID_OVERHEAD * len(batch)
    s.in_flight = True
    if not queue:
        s.urgent = False
    elif not s.urgent:
        s.due = now + self.flush_interval
    self.progress.notify_all()
    return s.name, batch, first


def patched(proposals: str) -> Callable[[], None]:
    """Apply proposals ('P1', 'P2', 'P3', 'P4'); returns a function that undoes them."""
    from dxtrack import buffer, records, worker

    saved = [
        (records.RecordBuilder, "metric", records.RecordBuilder.metric),
        (worker, "finalize", worker.finalize),
        (buffer.StreamBuffer, "_take_batch", buffer.StreamBuffer._take_batch),
    ]
    if "P1" in proposals:
        records.RecordBuilder.metric = metric_p1  # type: ignore[method-assign]
    if "P2" in proposals:  # P2 comes with P1 here: one copy of the method, no wrapper
        records.RecordBuilder.metric = metric_p1_p2  # type: ignore[method-assign]
        worker.finalize = finalize_p2_p3
    elif "P3" in proposals:
        worker.finalize = finalize_p3
    if "P4" in proposals:
        buffer.StreamBuffer._take_batch = take_batch_p4  # type: ignore[method-assign]

    def undo() -> None:
        for owner, attribute, value in saved:
            setattr(owner, attribute, value)

    return undo


def end_to_end(rounds: int) -> None:
    """metric() wall and caller CPU, and CPU per delivered metric, with proposals applied."""
    import bench_caller
    import bench_cpu

    n = 50_000
    variants = ("none", "P1", "P1+P2+P3", "P1+P2+P3+P4")
    clients = {
        "async": bench_caller.client(use_async_requests=True),
        "buffered": bench_caller.client(buffer_metrics=True),
    }
    firehose = bench_cpu.firehose_client(use_async_requests=True, pack_records=True)
    results: Dict[str, List[Tuple[float, float]]] = {}

    def one(key: str) -> None:
        if key == "floor":
            results.setdefault(key, []).append(bench_caller.floor(n))
            return
        mode, proposals = key.split(" ", 1)
        undo = patched(proposals)
        try:
            if mode == "cpu":
                cpu = bench_cpu.dx_cpu(firehose, n)
                results.setdefault(key, []).append((cpu, cpu))
            else:
                results.setdefault(key, []).append(bench_caller.dx_metric(clients[mode], n))
        finally:
            undo()

    keys = ["floor"] + [f"{m} {v}" for m in ("async", "buffered", "cpu") for v in variants]
    for key in keys:  # warm-up
        one(key)
    results.clear()
    for _ in range(rounds):
        for key in keys:
            one(key)
    for dx in clients.values():
        dx.close(5)
    firehose.close(5)

    def med(key: str, index: int) -> float:
        return statistics.median(r[index] for r in results[key]) * 1e6

    floor_wall, floor_cpu = med("floor", 0), med("floor", 1)
    print(
        f"\nend to end, proposals applied in-process (µs; median of {rounds} rounds of {n:,}); "
        f"floor {floor_wall:.2f} wall, {floor_cpu:.2f} CPU; load average {c.loadavg()}"
    )
    print(f"{'':28s} {'wall':>7s} {'× floor':>8s} {'caller CPU':>11s} {'× floor':>8s}")
    for key in keys[1:]:
        if key.startswith("cpu"):
            continue
        wall, cpu = med(key, 0), med(key, 1)
        print(
            f"metric() {key:19s} {wall:7.2f} {wall / floor_wall:8.2f} {cpu:11.2f} "
            f"{cpu / floor_cpu:8.2f}"
        )
    print("CPU per delivered metric (FirehoseSink, canned, async, packed):")
    for key in keys[1:]:
        if key.startswith("cpu"):
            cpu = med(key, 0)
            print(f"  {key[4:]:26s} {cpu:7.2f} {cpu / floor_cpu:8.2f} × floor")


# -- measuring --
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-pieces", action="store_true", help="only the end-to-end what-ifs")
    args = parser.parse_args()
    rounds = args.rounds
    print(c.steady_malloc())
    if args.skip_pieces:
        end_to_end(rounds)
        return
    import bench_caller
    import bench_cpu

    from dxtrack import DXTrack
    from dxtrack.records import ID_OVERHEAD, RecordBuilder, finalize

    dx = DXTrack()
    dx.configure(
        stage="test", context=c.CONTEXT, run_id=c.RUN_ID, sink=c.DiscardSink(), buffer_metrics=True
    )
    builder, pipeline = dx._state
    buffer = pipeline.buffer
    stream = buffer._streams["metric"]  # a benchmark may look inside
    name, md = c.NAME, c.METADATA

    def reset_queue() -> None:
        with buffer._lock:
            stream.queue.clear()
            stream.bytes = 0
            stream.taken = stream.settled = stream.enqueued

    def caller(call: Callable[[int], Any]) -> Callable[[], None]:
        def run() -> None:
            q: Any = collections.deque()
            append = q.append
            for base in range(0, N, CHUNK):
                for i in range(base, base + CHUNK):
                    append(call(i))
                q.clear()
                reset_queue()

        return run

    # The worker must not run: pretend it does, and empty the queue by hand every CHUNK.
    buffer.worker_started()
    put, build = buffer.put, builder.metric
    bodies = [RecordBuilder(dx.config).metric(name, i, md) for i in range(N)]
    open_bodies = [body[:-1] for body in bodies]
    lines = [finalize(body) for body in bodies]

    def each(fn: Callable[[bytes], Any], source: List[bytes]) -> Callable[[], None]:
        def run() -> None:
            for item in source:
                fn(item)

        return run

    def errors(formatter: Any) -> Callable[[], None]:
        from dxtrack import records

        def run() -> None:
            saved = records.format_traceback
            if formatter is not None:
                records.format_traceback = formatter
            try:
                for _ in range(N // 50):  # a traceback costs ~100 µs: fewer calls, same scale
                    try:
                        raise ValueError("page 3 of example-shop returned no products")
                    except ValueError as exc:
                        builder.error(exc, md)
            finally:
                records.format_traceback = saved

        return run

    def take(bulk: bool) -> Callable[[], None]:
        def run() -> None:
            for base in range(0, N, 10_000):
                queue: Any = collections.deque(bodies[base : base + 10_000])
                if bulk:
                    take_p4(queue, 10_000, 8 << 20, ID_OVERHEAD, sum(map(len, queue)))
                else:
                    take_current(queue, 10_000, 8 << 20, ID_OVERHEAD)

        return run

    def batches(fn: Callable[[Sequence[bytes]], Any]) -> Callable[[], None]:
        def run() -> None:
            for base in range(0, N, BATCH):
                fn(lines[base : base + BATCH])

        return run

    firehose = bench_cpu.firehose_client(buffer_metrics=True, pack_records=True)
    sink, client = firehose.sink, firehose.sink.client()
    packed_records = [
        [{"Data": data} for data, _ in pack_current(lines[b : b + BATCH], 1_000_000)]
        for b in range(0, N, BATCH)
    ]

    def botocore_only() -> None:
        for records in packed_records:
            client.put_record_batch(DeliveryStreamName="dxtrack-metric-input-dev", Records=records)

    cases: Dict[str, Callable[[], None]] = {
        "floor (dict + orjson.dumps + deque.append)": lambda: bench_caller.floor(N),
        "RecordBuilder.metric": caller(lambda i: build(name, i, md)),
        "  P1: plain-dict fast path": caller(lambda i: metric_p1(builder, name, i, md)),
        "  P1 + P2: ... and an exact-size body": caller(
            lambda i: metric_p1_p2(builder, name, i, md)
        ),
        "RecordBuilder.metric + StreamBuffer.put": caller(
            lambda i: put("metric", build(name, i, md), False)
        ),
        "DXTrack.metric (buffered, worker held off)": caller(lambda i: dx.metric(name, i, md)),
        "RecordBuilder.error (in an except block)": errors(None),
        "  P6: traceback without caret lines": errors(format_traceback_p6),
        "worker: finalize": each(finalize_current, bodies),
        "  P3: finalize with one %-format + hexlify": each(finalize_p3, bodies),
        "  P2 + P3: finalize of an exact-size open body": each(finalize_p2_p3, open_bodies),
        "worker: _take_batch loop, 10,000-line batches": take(False),
        "  P4: take the whole queue when it fits": take(True),
        "sink: FirehoseSink.send, 18,000-line packed batches": batches(
            lambda b: sink.send("metric", b)
        ),
        "  of which botocore put_record_batch alone": botocore_only,
        "  of which the two oversize checks": batches(checks_current),
        "  P5: one max(map(len, lines))": batches(checks_p5),
        "  of which pack()": batches(lambda b: list(pack_current(b, 1_000_000))),
        "  P5: pack() by accumulate + bisect": batches(lambda b: list(pack_p5(b, 1_000_000))),
    }
    assert [r for r, _ in pack_p5(lines, 1_000_000)] == [
        r for r, _ in pack_current(lines, 1_000_000)
    ]
    assert (
        [finalize_p2_p3(o) for o in open_bodies[:100]]
        == lines[:100]
        == [finalize_p3(b) for b in bodies[:100]]
    )

    results: Dict[str, List[float]] = {label: [] for label in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for label, fn in cases.items():
            start = _clock()
            fn()
            calls = N // 50 if label.startswith(ERROR_ROWS) else N
            results[label].append((_clock() - start) / calls * 1e9)
    buffer.worker_ended()
    reset_queue()
    dx.close(1)
    firehose.close(1)
    print(
        f"ns per record, calling-thread CPU, median (min–max) of {rounds} rounds of {N:,}; "
        f"load average {c.loadavg()}"
    )
    for label, values in results.items():
        print(
            f"{label:58s} {statistics.median(values):7.0f}  ({min(values):.0f}–{max(values):.0f})"
        )
    print("\nthe metadata check in RecordBuilder._merge, one call:")
    import typing

    for stmt, where in (
        ("isinstance(md, typing.Mapping)", {"typing": typing}),
        ("isinstance(md, Mapping)  # collections.abc", {"Mapping": Mapping}),
        ("type(md) is dict", {}),
    ):
        best = min(
            timeit.repeat(
                stmt.split("  #")[0], globals={"md": md, **where}, number=200_000, repeat=5
            )
        )
        print(f"  {stmt:45s} {best / 200_000 * 1e9:.0f} ns")
    end_to_end(max(3, rounds // 2))


if __name__ == "__main__":
    main()
