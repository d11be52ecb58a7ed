"""``make chaos``: do records survive outages through the disk spool, landing once?

Each scenario is real processes against real sockets: a moto server (its own
process, or the test session's) plays Firehose and S3, a :class:`FaultProxy`
in front of it misbehaves on a timeline, and jobs run as subprocesses
(``python tests/chaos.py --child job SPEC``) configured with the proxy as
``endpoint_url``, a ``spool_dir``, ``retry_deadline=2`` and
``shutdown_timeout=2``. Every record carries ``{"job", "worker", "seq"}`` in
its metadata, and each job appends the key of every call that returned to a
file (one ``os.write`` each, so a SIGKILL loses none of them). The harness
reads what landed from the bucket (``metric/`` and ``error/``) and compares:

* emitted: keys the jobs wrote; landed: unique ids in the bucket;
* duplicates: lines whose id landed already, and keys that landed under two ids
  (an id must never change through the spool);
* lost: emitted keys that never landed (minus what the scenario declares
  unavoidable, shown separately); extra: landed keys no job emitted;
* spooled / replayed: the jobs' ``stats()``; swept: what ``dxtrack replay``
  took out of the spool (where a scenario runs it, and once the jobs ended if
  they left anything: a job lingers up to 20 s after it records, until all it
  emitted landed, so background replay had that long); in spool: lines left in
  the spool directory at the end;
* drain s: from the end of the outage until the last emitted record landed.

Scenarios (``--scenario NAME``, repeatable; ``--quick`` for smaller counts):

* ``outage``: refused connections for twice ``retry_deadline``, then recovery;
  the job records through it and keeps running: what passed its deadline is
  spooled and replayed once a delivery succeeds.
* ``exit-in-outage``: a job exits while the endpoint answers 503 (its exit
  flush runs out of time and spools), then a second job replays it.
* ``replay-command``: a job exits while connections are refused; ``dxtrack
  replay`` run during the outage must fail without losing anything, then
  drain the spool after recovery (exit 0), and again find it empty (exit 0).
* ``pool``: a ``with Pool(4)`` job whose workers record into reset
  connections and are SIGTERMed by the pool's exit while the outage lasts: each
  spools what is left, into one directory; the parent replays it all.
* ``replay-race``: a spool of many segments, then three ``dxtrack replay`` at
  once: a segment is claimed by one of them, so nothing is sent twice.
* ``sigkill``: a job killed with SIGKILL during an outage, after what passed
  ``retry_deadline`` was spooled and while more records are in memory: those
  are the unavoidable loss (its last ``stats()["pending"]`` before the kill is
  the bound); ``dxtrack replay`` delivers the rest.
* ``spool-full``: a spool of ``spool_max_bytes`` far below what the outage
  spools: the oldest segments are dropped and counted as
  ``dropped["spool_full"]``, and nothing else is lost.
* ``overflow``: ``on_full="spool"`` with a 100-record buffer through an outage:
  what does not fit in memory goes to the spool.
* ``throttle``: a storm of throttled calls, throttled entries (partial
  ``FailedPutCount``), empty 200s, 503s and slow answers, then recovery.

The exit status is 1 if any scenario lost, duplicated or broke anything beyond
what it declares unavoidable.

    python tests/chaos.py [--scenario NAME] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from faultproxy import (
    Behaviour,
    FaultProxy,
    empty,
    failure,
    forward,
    mixed,
    refuse,
    reset,
    slow,
    throttle_entries,
    throttled,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION = "eu-west-1"
STAGE = "dev"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: What every job sets: the spool's reason to exist is a deadline that passes.
RETRY_DEADLINE = 2.0
SHUTDOWN_TIMEOUT = 2.0
MODES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "async": {"use_async_requests": True},
    "buffered": {"buffer_metrics": True, "flush_interval": 0.5},
}
ERROR_EVERY = 25  # one record in 25 is an error(), so both streams go through the spool


# -- the job (python tests/chaos.py --child job SPEC) ------------------------------------
@dataclass
class Job:
    """What one job subprocess does; its files are ``<dir>/<name>.*``."""

    name: str
    count: int = 300            # records per worker
    seconds: float = 0.0        # spread over this long (0: as fast as it can)
    mode: str = "async"
    workers: int = 0            # > 0: ``with Pool(workers)`` records, the parent does not
    wait_spooled: float = 0.0   # then wait up to this long until all is spooled ...
    phase2: int = 0             # ... and record this many more
    linger: float = 0.0         # then wait up to this long for the harness's ``stop`` file
    hold: bool = False          # or stay until killed
    pad: int = 0                # characters of padding in each record's metadata
    options: Dict[str, Any] = field(default_factory=dict)  # more configure() options


class _JobFiles:
    def __init__(self, directory: str, name: str) -> None:
        self.base = os.path.join(directory, name)

    def __getattr__(self, suffix: str) -> str:
        return f"{self.base}.{suffix}"


def _write_json(path: str, data: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _record(name: str, worker: int, count: int, seconds: float, keys: str,
            first: int = 0, pad: int = 0) -> None:
    """Record ``count`` keyed records, paced over ``seconds``; append each key once returned."""
    from dxtrack import dxtrack

    fd = os.open(keys, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    started = time.monotonic()
    try:
        for seq in range(first, first + count):
            metadata: Dict[str, Any] = {"job": name, "worker": worker, "seq": seq}
            if pad:
                metadata["pad"] = "x" * pad
            if seq % ERROR_EVERY == ERROR_EVERY - 1:
                try:
                    raise RuntimeError(f"chaos {name}/{worker}/{seq}")
                except RuntimeError:
                    dxtrack.error(metadata=metadata)
            else:
                dxtrack.metric("chaos.value", seq, metadata=metadata)
            os.write(fd, f"{name}/{worker}/{seq}\n".encode())
            ahead = started + seconds * (seq - first + 1) / count - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        os.close(fd)


def _pool_task(args: Tuple[str, int, int, float, str]) -> Dict[str, Any]:
    from dxtrack import dxtrack

    name, worker, count, seconds, keys = args
    _record(name, worker, count, seconds, keys)
    return dxtrack.stats()


def child_job(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    job = Job(**spec["job"])
    files = _JobFiles(spec["dir"], job.name)
    worker_stats: List[Dict[str, Any]] = []

    def report() -> None:  # registered before dxtrack's exit flush, so it runs after it
        from dxtrack import dxtrack
        _write_json(files.result, {"stats": dxtrack.stats(), "workers": worker_stats})

    atexit.register(report)
    from dxtrack import dxtrack

    def status(phase: str) -> None:
        _write_json(files.status, {"phase": phase, "stats": dxtrack.stats(),
                                   "workers": worker_stats})

    options = dict(MODES[job.mode], **job.options)
    if spec["spool"]:
        options["spool_dir"] = spec["spool"]
    else:  # the baseline: the same job without a spool
        options.pop("spool_max_bytes", None)
        if options.get("on_full") == "spool":
            options["on_full"] = "drop_newest"
    dxtrack.configure(stage=STAGE, context="chaos", run_id=spec["run_id"],
                      endpoint_url=spec["endpoint"], region_name=REGION,
                      retry_deadline=RETRY_DEADLINE, shutdown_timeout=SHUTDOWN_TIMEOUT,
                      **options)
    status("started")
    if job.workers:
        import multiprocessing

        tasks = [(job.name, w, job.count, job.seconds, files.keys) for w in range(job.workers)]
        with multiprocessing.get_context("fork").Pool(job.workers) as pool:
            worker_stats.extend(pool.map(_pool_task, tasks, chunksize=1))
        # The parent records once too: a delivery of its own lets it replay what is left.
        _record(job.name, -1, 1, 0.0, files.keys)
    else:
        _record(job.name, 0, job.count, job.seconds, files.keys, pad=job.pad)
    if job.wait_spooled:
        deadline = time.monotonic() + job.wait_spooled
        while dxtrack.stats().get("spooled", 0) < job.count and time.monotonic() < deadline:
            status("waiting")
            time.sleep(0.05)
    if job.phase2:
        _record(job.name, 0, job.phase2, 0.0, files.keys, first=job.count)
    status("emitted")
    deadline = time.monotonic() + job.linger
    while job.hold or (time.monotonic() < deadline and not os.path.exists(files.stop)):
        status("holding" if job.hold else "lingering")
        time.sleep(0.05)
    status("exiting")


def child_moto() -> None:
    """A moto server on 127.0.0.1 naming objects as Firehose does; prints its URL, and stops
    when standard input closes (the harness went away, however it went)."""
    import logging

    from moto.server import ThreadedMotoServer

    from dxtrack.demo import firehose_expands_timestamps

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    firehose_expands_timestamps()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()
    server.stop()


# -- the harness ---------------------------------------------------------------------
def child_env() -> Dict[str, str]:
    """The environment of every subprocess: this checkout's dxtrack, moto's keys, no AWS
    settings from the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DXTRACK_"))}
    env.update(AWS_ACCESS_KEY_ID=CREDENTIALS["aws_access_key_id"],
               AWS_SECRET_ACCESS_KEY=CREDENTIALS["aws_secret_access_key"],
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return env


class MotoProcess:
    """``child_moto`` in a subprocess (its own GIL and CPU, as benchmarks/_common.MotoServer)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", "moto"], cwd=ROOT,
            env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            self.stop()
            raise RuntimeError("the moto server did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Landed:
    """What landed in the bucket: each object read once, as it appears."""

    def __init__(self, moto_url: str, bucket: str) -> None:
        import boto3

        self.bucket = bucket
        self.s3 = boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
            "s3", endpoint_url=moto_url)
        self.objects: Set[str] = set()
        self.ids: Dict[str, int] = {}                # id -> times landed
        self.keys: Dict[str, Set[str]] = {}          # job/worker/seq -> ids it landed under
        self.broken = 0                              # lines that are not a keyed record

    def refresh(self) -> None:
        for prefix in ("metric/", "error/"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"] not in self.objects:
                        self.objects.add(item["Key"])
                        body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])
                        self._take(body["Body"].read())

    def _take(self, body: bytes) -> None:
        for line in body.splitlines():
            try:
                record = json.loads(line)
                meta = record["metadata"]
                key, rid = f"{meta['job']}/{meta['worker']}/{meta['seq']}", record["id"]
            except (ValueError, KeyError, TypeError):
                self.broken += 1
                continue
            self.ids[rid] = self.ids.get(rid, 0) + 1
            self.keys.setdefault(key, set()).add(rid)

    def duplicates(self) -> int:
        """Lines whose id landed before, and keys landed under more than one id."""
        return (sum(self.ids.values()) - len(self.ids)
                + sum(len(ids) - 1 for ids in self.keys.values()))


@dataclass
class Outcome:
    """One scenario's row, and what failed in it."""

    scenario: str
    emitted: int = 0
    landed: int = 0
    duplicates: int = 0
    lost: int = 0
    unavoidable: int = 0   # of ``lost``: what the scenario declares it may lose
    extra: int = 0
    spooled: int = 0
    replayed: int = 0
    swept: int = 0         # records ``dxtrack replay`` had to deliver after the jobs ended
    in_spool: int = 0
    drain: Optional[float] = None
    seconds: float = 0.0
    dropped: Dict[str, int] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def report(self) -> str:
        return "\n".join([f"{self.scenario}: {json.dumps(asdict(self), default=str)}",
                          *(f"  FAIL {line}" for line in self.failures),
                          *(f"  note {line}" for line in self.notes)])


COLUMNS = ("scenario", "emitted", "landed", "dup", "lost", "unavoidable", "spooled",
           "replayed", "swept", "in spool", "drain s", "wall s", "verdict")


def row(outcome: Outcome) -> List[str]:
    drain = "-" if outcome.drain is None else f"{outcome.drain:.1f}"
    return [outcome.scenario, *(f"{getattr(outcome, k):,}" for k in (
        "emitted", "landed", "duplicates", "lost", "unavoidable", "spooled", "replayed",
        "swept", "in_spool")), drain, f"{outcome.seconds:.1f}", "ok" if outcome.passed else "FAIL"]


def table(outcomes: List[Outcome]) -> str:
    rows = [list(COLUMNS)] + [row(outcome) for outcome in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(r, widths))) for r in rows)


class Run:
    """One scenario: a clean bucket, a proxy, a spool directory and the jobs it starts."""

    def __init__(self, harness: Harness, scenario: str) -> None:
        from dxtrack.demo import create_landing

        self.scenario = scenario
        self.dir = tempfile.mkdtemp(prefix=f"chaos-{scenario}-", dir=harness.base)
        self.spool = os.path.join(self.dir, "spool")
        request = urllib.request.Request(f"{harness.moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        bucket = create_landing(harness.moto_url, stage=STAGE, region=REGION,
                                credentials=CREDENTIALS)
        self.landed = Landed(harness.moto_url, bucket)
        self.proxy = FaultProxy(upstream=harness.moto_url).__enter__()
        self.processes: Dict[str, subprocess.Popen[bytes]] = {}
        self.jobs: List[Job] = []
        self.recovered: Optional[float] = None
        self.outcome = Outcome(scenario)
        self.baseline = harness.baseline
        self.started = time.monotonic()

    # -- faults
    def outage(self, behaviour: Behaviour) -> None:
        self.proxy.always(behaviour)

    def recover(self, after: float = 0.0) -> None:
        """Forward everything, ``after`` seconds from now; the drain is timed from then."""
        self.proxy.timeline([(after, forward())])
        self.recovered = time.monotonic() + after

    # -- jobs
    def files(self, job: Job) -> _JobFiles:
        return _JobFiles(self.dir, job.name)

    def start(self, job: Job, ready: str = "started", timeout: float = 30.0) -> None:
        """Start ``job``; return once its status says ``ready`` (it has configured)."""
        self.jobs.append(job)
        spec = {"job": asdict(job), "dir": self.dir,
                "spool": None if self.baseline else self.spool,
                "endpoint": self.proxy.url, "run_id": f"chaos-{self.scenario}"}
        _write_json(self.files(job).spec, spec)
        with open(self.files(job).stderr, "wb") as stderr:
            self.processes[job.name] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", "job",
                 self.files(job).spec], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True)
        self.wait_status(job, ready, timeout)

    def status(self, job: Job) -> Dict[str, Any]:
        try:
            with open(self.files(job).status) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def wait_status(self, job: Job, phase: str, timeout: float) -> Dict[str, Any]:
        """Wait until the job's status reaches ``phase`` (or any later one)."""
        order = ("started", "waiting", "emitted", "holding", "lingering", "exiting")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(job)
            if status and order.index(status["phase"]) >= order.index(phase):
                return status
            if self.processes[job.name].poll() is not None:
                self.fail(f"{job.name} exited ({self.processes[job.name].returncode}) before "
                          f"'{phase}': {self.stderr_tail(job)}")
                return status
            time.sleep(0.05)
        self.fail(f"{job.name} did not reach '{phase}' in {timeout:.0f} s")
        return self.status(job)

    def finish(self, job: Job, timeout: float = 30.0, until_landed: bool = True) -> int:
        """Let ``job`` end: once everything emitted so far landed (when it lingers), tell it
        to stop; its exit status (-9 when it had to be killed)."""
        process = self.processes[job.name]
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if until_landed and self.status(job).get("phase") == "lingering" and self.drained():
                open(self.files(job).stop, "w").close()
            time.sleep(0.1)
        if process.poll() is None:
            self.fail(f"{job.name} still running after {timeout:.0f} s: killed")
            self.kill(job)
        elif process.returncode != 0:
            self.fail(f"{job.name} exited with status {process.returncode}: "
                      f"{self.stderr_tail(job)}")
        return int(process.returncode)

    def kill(self, job: Job) -> None:
        process = self.processes[job.name]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def replay(self, timeout: float = 30.0, count: bool = True) -> Tuple[Optional[int], str]:
        """``dxtrack replay`` through the proxy; its exit status (None: it hung and was
        killed) and its output. What it took out of the spool counts as swept (unless
        ``count`` is False: replays running at once would count each other's)."""
        command = [sys.executable, "-m", "dxtrack", "replay", "--stage", STAGE,
                   "--spool-dir", self.spool, "--endpoint-url", self.proxy.url,
                   "--region", REGION]
        env = dict(child_env(), DXTRACK_RETRY_DEADLINE=str(RETRY_DEADLINE),
                   DXTRACK_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT))
        before = self.in_spool()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.fail(f"dxtrack replay still running after {timeout:.0f} s")
            return None, str(exc.stdout or "") + str(exc.stderr or "")
        finally:
            if count:
                self.outcome.swept += max(0, before - self.in_spool())
        return done.returncode, (done.stdout + done.stderr).strip()

    def stderr_tail(self, job: Job, lines: int = 3) -> str:
        try:
            with open(self.files(job).stderr, errors="replace") as f:
                tail = [line.strip() for line in f if line.strip()][-lines:]
        except OSError:
            return ""
        return " | ".join(line[:300] for line in tail)

    # -- counting
    def emitted(self) -> Set[str]:
        keys: Set[str] = set()
        for job in self.jobs:
            try:
                with open(self.files(job).keys) as f:
                    keys.update(line.strip() for line in f if line.strip())
            except FileNotFoundError:
                pass
        return keys

    def drained(self) -> bool:
        """Whether everything emitted so far landed; times the drain the first time."""
        self.landed.refresh()
        done = self.emitted() <= set(self.landed.keys)
        if done and self.recovered is not None and self.outcome.drain is None:
            self.outcome.drain = max(0.0, time.monotonic() - self.recovered)
        return done

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def in_spool(self) -> int:
        """Lines in the spool's files, whole or not."""
        return len(self.spool_lines())

    def spool_lines(self) -> List[bytes]:
        lines: List[bytes] = []
        for folder, _, names in os.walk(self.spool):
            for name in names:
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        lines += f.read().splitlines()
                except FileNotFoundError:  # delivered meanwhile
                    continue
        return lines

    def spool_keys(self) -> Set[str]:
        keys = set()
        for line in self.spool_lines():
            try:
                meta = json.loads(line)["metadata"]
                keys.add(f"{meta['job']}/{meta['worker']}/{meta['seq']}")
            except (ValueError, KeyError, TypeError):
                continue
        return keys

    def sweep(self) -> None:
        """After the jobs: ``dxtrack replay`` sends what the spool still holds, if anything
        (counted as ``swept``: the jobs did not replay it themselves)."""
        before = self.in_spool()
        if not before:
            return
        status, output = self.replay(timeout=60)
        self.note(f"{before:,} lines left in the spool after the jobs; dxtrack replay exit "
                  f"{status}: {output[-200:]!r}")
        if status != 0:
            self.fail(f"dxtrack replay (the sweep) exited {status}: {output[-300:]}")
        self.drained()

    def stats(self, job: Job) -> Dict[str, Any]:
        """The job's ``stats()`` at exit (or at its last status), its pool workers' added."""
        found: Dict[str, Any] = {}
        for path in (self.files(job).result, self.files(job).status):
            try:
                with open(path) as f:
                    found = json.load(f)
                break
            except (OSError, ValueError):
                continue
        total: Dict[str, Any] = {"dropped": {}}
        for stats in [found.get("stats", {}), *found.get("workers", [])]:
            for key, value in stats.items():
                if key == "dropped":
                    for reason, count in value.items():
                        total["dropped"][reason] = total["dropped"].get(reason, 0) + count
                elif isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return total

    def fail(self, message: str) -> None:
        self.outcome.failures.append(message)

    def note(self, message: str) -> None:
        self.outcome.notes.append(message)

    def count(self, unavoidable: int = 0) -> Outcome:
        """Fill in the row; lost beyond ``unavoidable``, duplicates, extras and broken lines
        are failures."""
        for job in self.jobs:
            if self.processes[job.name].poll() is None:
                self.kill(job)
        self.landed.refresh()
        out = self.outcome
        emitted = self.emitted()
        landed_keys = set(self.landed.keys)
        out.emitted, out.landed = len(emitted), len(self.landed.ids)
        out.duplicates = self.landed.duplicates()
        out.lost = len(emitted - landed_keys)
        out.unavoidable = min(out.lost, unavoidable)
        out.extra = len(landed_keys - emitted)
        out.in_spool = self.in_spool()
        for job in self.jobs:
            stats = self.stats(job)
            out.spooled += stats.get("spooled", 0)
            out.replayed += stats.get("replayed", 0)
            for reason, n in stats["dropped"].items():
                out.dropped[reason] = out.dropped.get(reason, 0) + n
        if out.lost > unavoidable:
            missing = sorted(emitted - landed_keys)
            stuck = len(emitted & self.spool_keys() - landed_keys)
            self.fail(f"{out.lost - unavoidable:,} lost beyond the {unavoidable:,} declared "
                      f"unavoidable (e.g. {', '.join(missing[:3])}); {stuck:,} of them are "
                      "still in the spool")
        if out.duplicates:
            self.fail(f"{out.duplicates:,} duplicates")
        if out.extra:
            self.fail(f"{out.extra:,} landed that no job emitted")
        if self.landed.broken:
            self.fail(f"{self.landed.broken:,} landed lines are not chaos records")
        if out.dropped:
            self.note(f"dropped: {out.dropped}")
        out.seconds = time.monotonic() - self.started
        return out

    def close(self) -> None:
        for job in self.jobs:
            if self.processes[job.name].poll() is None:
                self.kill(job)
        self.proxy.close()


class Harness:
    """A moto server (started here unless ``moto_url`` is given) and a scratch folder."""

    def __init__(self, moto_url: Optional[str] = None, keep: bool = False,
                 baseline: bool = False) -> None:
        self.moto = None if moto_url else MotoProcess()
        self.moto_url = moto_url or self.moto.url  # type: ignore[union-attr]
        self.keep = keep
        #: Jobs configured without a spool: what the scenarios lose without one.
        self.baseline = baseline
        self.base = tempfile.mkdtemp(prefix="dxtrack-chaos-")

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.moto is not None:
            self.moto.stop()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


# -- the scenarios -----------------------------------------------------------------------
Scenario = Callable[[Run, bool], Outcome]
SCENARIOS: Dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn
    return register


@scenario("outage")
def outage(run: Run, quick: bool) -> Outcome:
    """Connections refused for twice retry_deadline while the job records; then recovery."""
    job = Job("outage", count=300 if quick else 800, seconds=5.0 if quick else 7.0,
              mode="default", linger=20.0)
    return _refused_then_recovered(run, job)


def _refused_then_recovered(run: Run, job: Job) -> Outcome:
    """``job`` runs while connections are refused for twice retry_deadline, then recovery."""
    run.outage(refuse())
    run.start(job)
    run.recover(after=2 * RETRY_DEADLINE)
    run.finish(job, timeout=60)
    run.sweep()
    return run.count()


@scenario("exit-in-outage")
def exit_in_outage(run: Run, quick: bool) -> Outcome:
    """A job exits while every call gets a 503; a second job replays its spool."""
    first = Job("first", count=300 if quick else 1000, seconds=0.5)
    run.outage(failure(503))
    run.start(first)
    run.finish(first, timeout=30, until_landed=False)
    if not run.stats(first).get("spooled"):
        run.fail("the job that exited in the outage spooled nothing")
    run.recover()
    second = Job("second", count=100 if quick else 300, seconds=1.0, linger=20.0)
    run.start(second)
    run.finish(second, timeout=60)
    run.sweep()
    if run.stats(second).get("replayed", 0) < run.stats(first).get("spooled", 0):
        run.note(f"second replayed {run.stats(second).get('replayed', 0):,} of the "
                 f"{run.stats(first).get('spooled', 0):,} the first spooled")
    return run.count()


@scenario("replay-command")
def replay_command(run: Run, quick: bool) -> Outcome:
    """A job exits while connections are refused; ``dxtrack replay`` fails during the outage
    (keeping everything), drains after it (exit 0), and finds nothing the time after."""
    job = Job("job", count=300 if quick else 1000, seconds=0.5)
    run.outage(refuse())
    run.start(job)
    run.finish(job, timeout=30, until_landed=False)
    before = run.in_spool()
    status, output = run.replay(timeout=30)
    if status == 0:
        run.fail(f"dxtrack replay exited 0 while the endpoint refused: {output[-300:]}")
    if run.in_spool() != before:
        run.fail(f"a failed replay changed the spool: {before:,} lines, then {run.in_spool():,}")
    run.recover()
    for attempt in ("drain", "empty"):
        status, output = run.replay(timeout=30)
        run.note(f"replay ({attempt}) exit {status}: {output[-200:]!r}")
        if status != 0:
            run.fail(f"dxtrack replay ({attempt}) exited {status}: {output[-300:]}")
        if attempt == "drain":
            run.drained()
    return run.count()


@scenario("pool")
def pool(run: Run, quick: bool) -> Outcome:
    """Four pool workers record for 1.5 s into reset connections; the ``with`` block's
    terminate() SIGTERMs them while the outage lasts, so each spools what is left into the
    one directory; after recovery the parent's own delivery lets it replay them all."""
    job = Job("pool", workers=4, count=150 if quick else 400, seconds=1.5, linger=20.0)
    run.outage(reset())
    run.start(job)
    run.recover(after=2 * RETRY_DEADLINE)
    run.finish(job, timeout=60)
    run.sweep()
    run.note("spooled counts the workers' stats() when their task returned, before the "
             "SIGTERM that spools; replayed is the parent's")
    return run.count()


@scenario("replay-race")
def replay_race(run: Run, quick: bool) -> Outcome:
    """Many segments (on_full='spool', a 100-record buffer, a job exiting in an outage),
    then three ``dxtrack replay`` at once: each segment is claimed by one of them."""
    job = Job("many", count=600 if quick else 2000, seconds=2.0,
              options={"on_full": "spool", "max_buffer_records": 100})
    run.outage(refuse())
    run.start(job)
    run.finish(job, timeout=30, until_landed=False)
    run.note(f"{len(os.listdir(os.path.join(run.spool, STAGE)))} files in the spool")
    run.recover()
    results: List[Tuple[Optional[int], str]] = []
    racers = [threading.Thread(target=lambda: results.append(run.replay(60, count=False)))
              for _ in range(3)]
    before = run.in_spool()
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    run.outcome.swept += before - run.in_spool()
    statuses = [status for status, _ in results]
    run.note(f"racing replays exited {statuses}")
    if any(status not in (0, 1) for status in statuses):
        run.fail(f"a racing dxtrack replay exited {statuses}: {results}")
    status, output = run.replay(timeout=30)
    if status != 0:
        run.fail(f"dxtrack replay after the race exited {status}: {output[-300:]}")
    run.drained()
    return run.count()


@scenario("sigkill")
def sigkill(run: Run, quick: bool) -> Outcome:
    """SIGKILL during an outage: what was spooled survives, what was in memory is lost."""
    first, more = (200, 50) if quick else (1000, 200)
    job = Job("killed", count=first, wait_spooled=5 * RETRY_DEADLINE, phase2=more, hold=True)
    run.outage(refuse())
    run.start(job)
    status = run.wait_status(job, "holding", timeout=30)
    run.kill(job)
    stats = status.get("stats", {})
    pending, spooled = stats.get("pending", 0), stats.get("spooled", 0)
    run.note(f"at the kill: spooled {spooled:,}, pending (in memory) {pending:,}")
    if spooled < first:
        run.fail(f"only {spooled:,} of the {first:,} records past retry_deadline were spooled "
                 "before the kill")
    run.recover()
    status_code, output = run.replay(timeout=30)
    if status_code != 0:
        run.fail(f"dxtrack replay exited {status_code}: {output[-300:]}")
    elif run.recovered is not None:  # all that can land did (drained() waits for the rest)
        run.outcome.drain = time.monotonic() - run.recovered
    run.note(f"replay: {output[-200:]!r}")
    # The kill cannot be handled: records in memory then are the bound on what may be lost.
    return run.count(unavoidable=pending)


@scenario("spool-full")
def spool_full(run: Run, quick: bool) -> Outcome:
    """A 1 MiB spool (the least allowed) through an outage that spools twice that: the oldest
    segments go, counted as spool_full, and nothing else is lost (the job records in order,
    so every record dropped is older than every record kept of its stream)."""
    # ~2.2 KB a record at ~100 a second: each segment (what passed a deadline, then what the
    # exit flush had left) holds well under the limit, and together they are twice as much.
    job = Job("full", count=800 if quick else 1200, seconds=8.0 if quick else 12.0,
              pad=2000, options={"spool_max_bytes": 1 << 20})
    run.outage(failure(500))
    run.start(job)
    run.finish(job, timeout=40, until_landed=False)
    run.recover()
    status, output = run.replay(timeout=30)
    if status != 0:
        run.fail(f"dxtrack replay exited {status}: {output[-300:]}")
    run.drained()
    full = run.stats(job)["dropped"].get("spool_full", 0)
    if not full:
        run.fail("nothing was counted as dropped['spool_full']")
    outcome = run.count(unavoidable=full)
    if outcome.lost != full:
        run.fail(f"lost {outcome.lost:,}, but dropped['spool_full'] says {full:,}")
    for stream, errors in (("metric", False), ("error", True)):  # each stream its segments
        def seqs(keys: Set[str], errors: bool = errors) -> List[int]:
            numbers = (int(key.rsplit("/", 1)[1]) for key in keys)
            return sorted(n for n in numbers if (n % ERROR_EVERY == ERROR_EVERY - 1) == errors)

        lost, kept = seqs(run.emitted() - set(run.landed.keys)), seqs(set(run.landed.keys))
        if lost and kept and max(lost) > min(kept):
            run.fail(f"not only the oldest {stream}s were dropped: lost up to seq {max(lost)}, "
                     f"kept from seq {min(kept)}")
    return outcome


@scenario("overflow")
def overflow(run: Run, quick: bool) -> Outcome:
    """on_full='spool' with room for 100 records: the rest of an outage goes to the spool."""
    job = Job("overflow", count=600 if quick else 2000, seconds=2.0, linger=20.0,
              options={"on_full": "spool", "max_buffer_records": 100})
    return _refused_then_recovered(run, job)


@scenario("throttle")
def throttle(run: Run, quick: bool) -> Outcome:
    """A storm: half the calls throttled, a quarter with 80 % of their entries throttled,
    empty 200s, 503s, slow answers; one call in 17 forwarded as it is."""
    storm = mixed((8, throttled()), (4, throttle_entries(0.8, seed=3)), (1, empty()),
                  (1, empty(b'{"FailedPutCount": 0}')), (1, failure(503)), (1, slow(0.3)),
                  (1, forward()), seed=5)
    job = Job("storm", count=500 if quick else 1500, seconds=6.0, linger=20.0)
    run.outage(storm)
    run.start(job)
    run.recover(after=3 * RETRY_DEADLINE)
    run.finish(job, timeout=60)
    run.sweep()
    return run.count()


def run_scenario(harness: Harness, name: str, quick: bool = False) -> Outcome:
    """Run one scenario; its outcome (never raises for what dxtrack did)."""
    run = Run(harness, name)
    try:
        return SCENARIOS[name](run, quick)
    except Exception as exc:  # the harness's own trouble: shown as a failed row
        run.fail(f"harness error: {type(exc).__name__}: {exc}")
        return run.count()
    finally:
        run.close()


def iter_outcomes(names: List[str], quick: bool, keep: bool,
                  baseline: bool = False) -> Iterator[Outcome]:
    with Harness(keep=keep, baseline=baseline) as harness:
        if keep:
            print(f"scenario folders in {harness.base}", flush=True)
        for name in names:
            yield run_scenario(harness, name, quick)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        {"job": child_job, "moto": child_moto}[sys.argv[2]](*sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                        help="run only this scenario (may be repeated)")
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--keep", action="store_true",
                        help="keep each scenario's folder (spool, keys, stderr)")
    parser.add_argument("--baseline", action="store_true",
                        help="configure the jobs without a spool (what it saves; fails)")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the moto server and the jobs are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    started = time.monotonic()
    outcomes: List[Outcome] = []
    names = args.scenario or list(SCENARIOS)
    for outcome in iter_outcomes(names, args.quick, args.keep, args.baseline):
        outcomes.append(outcome)
        print(outcome.report() if outcome.failures or outcome.notes else outcome.scenario,
              flush=True)
    print(f"\ndxtrack chaos ({'quick' if args.quick else 'full'}"
          f"{', baseline: no spool' if args.baseline else ''}), "
          f"{time.monotonic() - started:.0f} s in all; retry_deadline {RETRY_DEADLINE:g} s, "
          f"shutdown_timeout {SHUTDOWN_TIMEOUT:g} s")
    print(table(outcomes))
    bad = [outcome.scenario for outcome in outcomes if not outcome.passed]
    print(f"FAILED: {', '.join(bad)}" if bad else "every record landed once, or was declared")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
