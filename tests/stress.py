"""``make stress``: does dxtrack keep its promise under load and interruption?

The promise: nothing lost quietly, nothing hung, nothing stalled. Unit tests
check each path once; the defects that break this promise are races (a signal
landing between two lines, a pool terminating a worker mid-flush, a handler
re-entering the buffer), so this harness repeats three scenarios hundreds of
times, each run in a fresh process writing to a fresh output directory (stage
``test``: ``metric.jsonl`` / ``error.jsonl``), while two busy processes keep
both cores loaded so that threads get preempted at awkward moments.

* ``pool``: the ``make demo`` job (``dxtrack.demo.scrape``) in a
  ``with multiprocessing.Pool(...)`` block, whose exit SIGTERMs the workers;
  fork, spawn and forkserver, in async, buffered and default modes.
* ``ctrl-c``: an async-mode child records in a tight loop and gets SIGINT at a
  random moment; it must unwind, flush at exit within ``shutdown_timeout``,
  and every ``metric()`` call that returned must have landed.
* ``signal``: ``metric()`` from a SIGALRM handler (``setitimer``), or from a
  ``__del__`` that the garbage collector runs in the middle of other calls,
  while the main thread records too; default, async and buffered modes.

For each run the parent compares what the child says it recorded with the
lines that landed: duplicated (an ``id`` or a whole line seen twice), lost
(recorded but not landed), hung (no exit within ``--timeout``, or a process of
the run still alive after it), broken (a crash or an unreadable line). The
exit status is 1 if any of these is not zero. Stalled (a run that finished
but took more than ``--stall`` seconds) is shown, not failed. Every failing
or stalled run is printed with the command that repeats it.

    python tests/stress.py [--scenario pool|ctrl-c|signal] [--runs-pool N]
        [--runs-ctrl-c N] [--runs-signal N] [--jobs N] [--timeout S] [--stall S]
        [--seed N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import itertools
import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from dxtrack import dxtrack

MODES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "async": {"use_async_requests": True},
    "buffered": {"buffer_metrics": True},
}
START_METHODS = ("fork", "fork", "spawn", "forkserver")
COUNTS = ("emitted", "landed", "duplicated", "lost", "hung", "broken", "stalled")
FAILURES = ("duplicated", "lost", "hung", "broken")


# -- child programs (python tests/stress.py --child NAME ...) ---------------------------------
def _configure(out: str, mode: str) -> None:
    dxtrack.configure(stage="test", context="stress", run_id=os.path.basename(out),
                      output_dir=out, **MODES[mode])


def _scrape(task: Tuple[List[int], int]) -> Dict[str, int]:
    from dxtrack.demo import scrape  # module level, so spawned workers can import it
    return scrape(*task)


def child_pool(out: str, method: str, mode: str, workers: str, shops: str, pages: str) -> None:
    """The demo's pool, ended by the ``with`` block's terminate()."""
    _configure(out, mode)
    n = int(workers)
    tasks = [(list(range(int(shops)))[w::n], int(pages)) for w in range(n)]
    with multiprocessing.get_context(method).Pool(n) as pool:
        results = pool.map(_scrape, tasks, chunksize=1)
    dxtrack.close(timeout=10)
    print(json.dumps({kind: sum(r[kind] for r in results) for kind in ("metric", "error")}))


def child_ctrl_c(out: str) -> None:
    """Record until SIGINT; report how many metric() calls returned."""
    _configure(out, "async")
    returned = 0
    try:
        print("ready", flush=True)
        for i in itertools.count():
            dxtrack.metric("stress.ctrl_c", i)
            returned = i + 1
    except KeyboardInterrupt:
        pass
    finally:  # the exit flush (atexit) runs after this
        print(json.dumps({"stress.ctrl_c": returned}), flush=True)


def child_signal(out: str, mode: str, variant: str, interval: str) -> None:
    """metric() re-entered from a SIGALRM handler or a __del__, for about 0.3 s."""
    _configure(out, mode)
    done: Dict[str, List[int]] = {"stress.main": [], "stress.alarm": [], "stress.del": []}
    numbers = {name: itertools.count() for name in done}
    recording = True

    def record(name: str) -> None:
        value = next(numbers[name])  # atomic, whichever thread gc picks for __del__
        dxtrack.metric(name, value)
        done[name].append(value)

    class Litter:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

        def __del__(self) -> None:
            if recording:
                record("stress.del")

    if variant == "alarm":
        signal.signal(signal.SIGALRM, lambda signum, frame: record("stress.alarm"))
        signal.setitimer(signal.ITIMER_REAL, float(interval), float(interval))
    else:
        gc.set_threshold(int(float(interval) * 1e5), 5, 5)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        record("stress.main")
        if variant == "del":
            Litter()
    signal.setitimer(signal.ITIMER_REAL, 0)
    gc.collect()
    recording = False
    flushed = dxtrack.flush_metrics_buffer(timeout=10)
    print(json.dumps({**{name: len(values) for name, values in done.items()},
                      "flushed": flushed, "dropped": dxtrack.stats()["dropped"]}), flush=True)


CHILDREN: Dict[str, Callable[..., None]] = {
    "pool": child_pool, "ctrl-c": child_ctrl_c, "signal": child_signal,
}


# -- running one child and counting --------------------------------------------------------------
def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is alive (zombies excluded: PID 1 may never reap them)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


RUNNING: Dict[int, subprocess.Popen[str]] = {}
STOPPING = threading.Event()  # the harness is being interrupted: its last runs count for nothing


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_child(args: List[str], timeout: float, sigint: Optional[float] = None) -> Dict[str, Any]:
    """Run a child in its own process group; its summary, status, stderr and whether it hung."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    RUNNING[proc.pid] = proc
    deadline = time.monotonic() + timeout
    hung = False
    try:
        if sigint is not None:  # wait for "ready", then interrupt
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], timeout)[0]
            if ready and proc.stdout.readline().strip() == "ready":
                time.sleep(sigint)
                proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            _kill(proc)
            stdout, stderr = proc.communicate()
        leftover_deadline = time.monotonic() + 3
        while _group_alive(proc.pid):  # a pool worker or a forkserver outliving the run
            if time.monotonic() > leftover_deadline:
                hung = True
                _kill(proc)
                break
            time.sleep(0.05)
    finally:
        RUNNING.pop(proc.pid, None)
    lines = stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, ValueError):
        summary = None
    return {"summary": summary, "status": proc.returncode, "stderr": stderr, "hung": hung}


def read_landed(out: str) -> Tuple[Dict[str, List[float]], int, int]:
    """Values landed per metric name ("error" for errors), duplicates, unreadable lines."""
    landed: Dict[str, List[float]] = {}
    ids, whole, bad = set(), set(), 0
    duplicated = 0
    for stream in ("metric", "error"):
        try:
            with open(os.path.join(out, f"{stream}.jsonl"), "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            duplicated += record.get("id") in ids or line in whole
            ids.add(record.get("id"))
            whole.add(line)
            name = record.get("metric_name", "error")
            landed.setdefault(name, []).append(record.get("value"))
    return landed, duplicated, bad


def one_run(scenario: str, index: int, seed: int, timeout: float,
            stall: float) -> Dict[str, Any]:
    rng = random.Random(seed * 100003 + index)
    out = tempfile.mkdtemp(prefix=f"dxtrack-stress-{scenario}-")
    sigint = None
    if scenario == "pool":
        params = [START_METHODS[index % 4], ("async", "buffered", "default")[index // 4 % 3],
                  str(rng.choice((2, 3, 4))), "8", "20"]
    elif scenario == "ctrl-c":
        params, sigint = [], rng.uniform(0, 0.2)
    else:
        params = [("default", "async", "buffered")[index % 3], ("alarm", "del")[index // 3 % 2],
                  f"{rng.uniform(0.0005, 0.005):.4f}"]
    args = [scenario, out, *params]
    started = time.monotonic()
    result = run_child(args, timeout, sigint)
    if STOPPING.is_set():
        shutil.rmtree(out, ignore_errors=True)
        return dict.fromkeys((*COUNTS, "seconds"), 0)
    counts: Dict[str, Any] = dict.fromkeys(COUNTS, 0)
    counts["seconds"] = time.monotonic() - started
    landed, counts["duplicated"], bad = read_landed(out)
    summary = result["summary"]
    counts["hung"] = int(result["hung"])
    crashed = summary is None or result["status"] != 0  # a hung run was killed: not a crash
    counts["broken"] = bad + int(crashed and not result["hung"])
    counts["landed"] = sum(len(values) for values in landed.values())
    notes = []
    if isinstance(summary, dict):
        for name, emitted in summary.items():
            if not isinstance(emitted, int) or isinstance(emitted, bool):
                continue
            counts["emitted"] += emitted
            if scenario == "pool":  # the demo's records are counted per stream
                got = sum(len(v) for k, v in landed.items() if (k == "error") == (name == "error"))
                counts["lost"] += max(0, emitted - got)
            else:  # values are 0, 1, ... per name: each one that returned must be there
                values = {int(v) for v in landed.get(name, [])}
                counts["lost"] += sum(1 for v in range(emitted) if v not in values)
                extra = len(values - set(range(emitted)))
                if extra > (scenario == "ctrl-c"):  # the call Ctrl-C interrupted may land
                    notes.append(f"{extra} {name} landed that were never recorded")
                    counts["broken"] += 1
        if summary.get("flushed") is False or any(summary.get("dropped", {}).values()):
            notes.append(f"flushed={summary.get('flushed')} dropped={summary.get('dropped')}")
    counts["stalled"] = int(counts["seconds"] > stall and not counts["hung"])
    failed = any(counts[k] for k in FAILURES)
    if failed or counts["stalled"]:
        tail = [line for line in result["stderr"].splitlines() if line.strip()][-2:]
        found = ", ".join(f"{k}={counts[k]}" for k in COUNTS)
        print(f"  {'FAIL' if failed else 'SLOW'} {scenario} #{index}: {found}"
              f", exit {result['status']}, {counts['seconds']:.1f} s; {'; '.join(notes)}\n"
              f"    repeat: {sys.executable} tests/stress.py --child {' '.join(args)}"
              + (" (then Ctrl-C it)" if scenario == "ctrl-c" else "")
              + "".join(f"\n    stderr: {line[:200]}" for line in tail), flush=True)
    if not failed:
        shutil.rmtree(out, ignore_errors=True)
    return counts


# -- the run as a whole ---------------------------------------------------------------------
def spin(parent: int) -> None:
    """Keep one core busy until the harness goes away, however it goes."""
    while os.getppid() == parent:
        for _ in range(100000):
            pass


def run_scenario(scenario: str, runs: int, args: argparse.Namespace) -> Dict[str, Any]:
    total: Dict[str, Any] = dict.fromkeys(COUNTS, 0)
    total.update(runs=0, slowest=0.0, busy=0.0)
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        futures = [pool.submit(one_run, scenario, i, args.seed, args.timeout, args.stall)
                   for i in range(runs)]
        for future in concurrent.futures.as_completed(futures):
            counts = future.result()
            for key in COUNTS:
                total[key] += counts[key]
            total["runs"] += 1
            total["busy"] += counts["seconds"]
            total["slowest"] = max(total["slowest"], counts["seconds"])
            if total["runs"] % 50 == 0 or total["runs"] == runs:
                print(f"{scenario}: {total['runs']}/{runs} runs, lost {total['lost']}, "
                      f"duplicated {total['duplicated']}, hung {total['hung']}, broken "
                      f"{total['broken']} ({time.monotonic() - started:.0f} s)", flush=True)
    finally:  # on Ctrl-C, start nothing more
        pool.shutdown(wait=False, cancel_futures=True)
    total["wall"] = time.monotonic() - started
    return total


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        CHILDREN[sys.argv[2]](*sys.argv[3:])
        return 0
    if sys.argv[1:2] == ["--spin"]:
        spin(int(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenario", choices=("pool", "ctrl-c", "signal"), action="append",
                        help="run only this scenario (may be repeated)")
    parser.add_argument("--runs-pool", type=int, default=300)
    parser.add_argument("--runs-ctrl-c", type=int, default=100)
    parser.add_argument("--runs-signal", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run hung")
    parser.add_argument("--stall", type=float, default=5.0,
                        help="seconds after which a run that finished counts as stalled")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = {"pool": args.runs_pool, "ctrl-c": args.runs_ctrl_c, "signal": args.runs_signal}
    # SIGTERM unwinds like Ctrl-C, so the finally below always stops what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    spinners = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--spin",
                                  str(os.getpid())]) for _ in range(2)]
    results: Dict[str, Dict[str, Any]] = {}
    started = time.monotonic()
    interrupted = False
    try:
        for scenario in args.scenario or list(runs):
            results[scenario] = run_scenario(scenario, runs[scenario], args)
    except KeyboardInterrupt:
        print("interrupted: the table shows the scenarios that finished")
        interrupted = True
    finally:
        STOPPING.set()
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        for proc in list(RUNNING.values()):
            _kill(proc)
    header = ("scenario", "runs", *COUNTS, "s/run", "slowest s", "wall s")
    rows = [header] + [
        (name, str(t["runs"]), *(f"{t[k]:,}" for k in COUNTS),
         f"{t['busy'] / max(1, t['runs']):.2f}", f"{t['slowest']:.1f}", f"{t['wall']:.0f}")
        for name, t in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"\ndxtrack stress, {args.jobs} runs at a time, 2 busy processes, "
          f"{time.monotonic() - started:.0f} s in all")
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    bad = any(t[k] for t in results.values() for k in FAILURES)
    print("FAILED: records lost, duplicated or hung" if bad else "every record landed once")
    return 130 if interrupted else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
