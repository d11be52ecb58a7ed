"""``make demo``: a scraper-like job reporting through dxtrack, end to end.

Stage ``dev`` (the default) runs the job in a pool of worker processes against an embedded moto
server playing Firehose and S3 (no AWS account, nothing leaves the machine), then reads the S3
objects back and checks that every record landed once; stage ``test`` writes local files. The
job runs twice, a short earlier run and then the run, in which one shop refuses the scraper,
and the demo ends with ``dxtrack report`` of the run, which names that shop as missing, and
its HTML page. The workers use the ready-made ``dxtrack``, configured once in the parent
(children inherit it).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import orjson

from . import dxtrack

REGION = "eu-west-1"
CREDENTIALS: Dict[str, Any] = {"aws_access_key_id": "demo", "aws_secret_access_key": "demo"}


class ParseError(Exception):
    """What the demo scraper raises for a page it cannot read."""


def scrape(shops: List[int], pages: int, blocked: Tuple[int, ...] = ()) -> Dict[str, int]:
    """Pretend to scrape ``pages`` pages of each shop (a ``blocked`` shop refuses the first
    page); returns how many records it emitted."""
    emitted = {"metric": 0, "error": 0}
    for shop_number in shops:
        rng = random.Random(shop_number)
        shop = f"shop-{shop_number:03d}"
        if shop_number in blocked:
            try:
                raise PermissionError(f"{shop}: 403 Forbidden on page 0")
            except PermissionError:
                dxtrack.error(metadata={"shop": shop})
                emitted["error"] += 1
            continue
        failures: List[Exception] = []
        for page in range(pages):
            products = rng.randint(0, 48)
            dxtrack.metric("scrape.products", products, metadata={"shop": shop, "page": page})
            emitted["metric"] += 1
            if rng.random() < 0.02:
                try:
                    raise ParseError(f"{shop}: no price on page {page}")
                except ParseError as exc:
                    failures.append(exc)
        if failures:
            dxtrack.errors(failures, metadata={"shop": shop})
            emitted["error"] += len(failures)
        try:
            if shop_number % 7 == 3:
                raise ConnectionError(f"{shop}: connection reset after {pages} pages")
        except ConnectionError:
            dxtrack.error(metadata={"shop": shop})
            emitted["error"] += 1
        dxtrack.metric("scrape.pages", pages, metadata={"shop": shop})
        # Pretend seconds, as steady as the pages (a real clock's noise would make the
        # report's completeness section flag drops that are not there).
        dxtrack.metric("scrape.seconds", round(pages * rng.uniform(0.2, 0.3), 3),
                       metadata={"shop": shop})
        emitted["metric"] += 2
    return emitted


def _start_firehose() -> Tuple[Any, str]:
    """An embedded moto server, playing Firehose, S3, IAM and Glue."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - depends on the install
        sys.exit("the dev demo needs moto's server: pip install 'dxtrack[demo]' (make demo does)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    firehose_expands_timestamps()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def create_landing(url: str, *, stage: str = "dev", region: str = REGION,
                   credentials: Optional[Dict[str, Any]] = None, bucket: Optional[str] = None,
                   say: Callable[[str], None] = lambda line: None,
                   compression: str = "none") -> str:
    """Run ``dxtrack setup`` for ``stage`` against the moto server at ``url`` (the demo, the
    tests and the benchmarks all use it); returns the bucket."""
    from .config import Config
    from .provision import Setup

    keys = credentials or CREDENTIALS
    config = Config(stage=stage, context="demo", run_id="setup", endpoint_url=url,
                    region_name=region, compression=compression, **keys)
    session = _session(region, keys["aws_access_key_id"], keys["aws_secret_access_key"])
    setup = Setup(config, bucket=bucket, say=say, session=session)
    setup.run()
    return setup.landing.bucket


@functools.cache
def _session(region: str, key_id: str, secret: str) -> Any:
    """One boto3 session per region and keys: loading the services' models is most of what a
    new one costs, and the tests set up a stage a hundred times."""
    import boto3

    return boto3.session.Session(region_name=region, aws_access_key_id=key_id,
                                 aws_secret_access_key=secret)


_JAVA_TIME = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}


def firehose_expands_timestamps() -> None:
    """Make this process's moto Firehose name objects as Firehose does for a prefix with
    ``!{timestamp:...}`` expressions: the expressions expanded in UTC, and no ``YYYY/MM/DD/HH/``
    added (moto 5 copies them as they are). Prefixes without one are left to moto."""
    from moto.firehose.models import FirehoseBackend

    original = FirehoseBackend.__dict__["_format_s3_object_path"]
    if getattr(original, "dxtrack", False):
        return

    def name(delivery_stream_name: str, version_id: str, prefix: str) -> str:
        if "!{timestamp:" not in prefix:
            return str(original.__func__(delivery_stream_name, version_id, prefix))
        now = datetime.datetime.now(datetime.timezone.utc)
        expanded = re.sub(r"!\{timestamp:([^}]*)\}", lambda m: now.strftime(
            re.sub("|".join(_JAVA_TIME), lambda j: _JAVA_TIME[j.group()], m.group(1))), prefix)
        return (f"{expanded}{delivery_stream_name}-{version_id}-"
                f"{now:%Y-%m-%d-%H-%M-%S}-{uuid.uuid4()}")

    name.dxtrack = True  # type: ignore[attr-defined]
    FirehoseBackend._format_s3_object_path = staticmethod(name)  # type: ignore[method-assign]


def _landed(url: str, bucket: str) -> Dict[str, List[bytes]]:
    """Every line in the demo bucket, per stream."""
    import boto3

    from .sources import decompressed

    s3 = boto3.client("s3", region_name=REGION, endpoint_url=url, **CREDENTIALS)
    found: Dict[str, List[bytes]] = {"metric": [], "error": [], "objects": []}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            stream = item["Key"].split("/", 1)[0]
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[stream].extend(decompressed(body).splitlines())  # compression="gzip" too
            found["objects"].append(item["Key"].encode())
    return found


def _local(output_dir: str) -> Dict[str, List[bytes]]:
    """Every line in the output files, per stream (a small run may record no error at all)."""
    paths = {stream: Path(output_dir, f"{stream}.jsonl") for stream in ("metric", "error")}
    return {stream: p.read_bytes().splitlines() if p.exists() else []
            for stream, p in paths.items()}


#: Where the demo writes its HTML report, unless told otherwise.
HTML_REPORT = os.path.join(".dxtrack_demo", "report.html")
CONTEXT = "demo-scraper"


def run(stage: str = "dev", shops: int = 40, pages: int = 500, workers: int = 4,
        start_method: Optional[str] = None, out: Any = None,
        html: Optional[str] = HTML_REPORT) -> bool:
    """Run the demo: a short earlier run of the job, then the run itself, in which one shop
    refuses the scraper; prints what landed and ``dxtrack report`` of the run (which names
    that shop as missing), writes the report's HTML page to ``html``, and returns whether
    every record landed once."""
    out = out or sys.stdout
    server: Optional[Any] = None
    url = bucket = ""
    scratch = tempfile.mkdtemp(prefix="dxtrack-demo-")
    now = datetime.datetime.now(datetime.timezone.utc)
    run_id, previous_id = (f"{when:%Y%m%dT%H%M%S}" for when in (now, now - datetime.timedelta(1)))
    try:
        if stage == "dev":
            server, url = _start_firehose()
            bucket = create_landing(url, say=lambda line: print(line, file=out))
        where = _configure(stage, url, scratch, previous_id)
        context = multiprocessing.get_context(start_method)
        print(f"dxtrack demo: {shops} shops x {pages} pages in {workers} worker processes "
              f"({context.get_start_method()}), reporting to {where}", file=out)
        # An earlier run, shorter, for the report to compare this one with.
        earlier, _ = _scrape_in_pool(context, shops, max(pages // 10, 1), workers)
        _configure(stage, url, scratch, run_id)
        blocked = (13 % shops,) if shops > 1 else ()  # this run, one shop refuses the scraper
        emitted, elapsed = _scrape_in_pool(context, shops, pages, workers, blocked)
        emitted = {stream: earlier[stream] + emitted[stream] for stream in emitted}
        found = _landed(url, bucket) if stage == "dev" else _local(scratch)
        ok = _report(emitted, found, elapsed, out)
        _report_the_run(scratch, bucket, run_id, blocked, html, out)
        return ok
    finally:
        dxtrack.close(timeout=10)
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _configure(stage: str, url: str, scratch: str, run_id: str) -> str:
    """Configure the ready-made client for the job; returns where its records go."""
    settings: Dict[str, Any] = dict(context=CONTEXT, run_id=run_id,
                                    default_metadata={"host": "demo"}, use_async_requests=True)
    if stage != "dev":
        dxtrack.configure(stage="test", output_dir=scratch, **settings)
        return f"local files in {scratch}"
    # Credentials through the environment, where worker processes find them too
    # (explicit keys given to configure() are never passed to children).
    os.environ["AWS_ACCESS_KEY_ID"] = CREDENTIALS["aws_access_key_id"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = CREDENTIALS["aws_secret_access_key"]
    dxtrack.configure(stage="dev", endpoint_url=url, region_name=REGION, **settings)
    return f"an embedded Firehose (moto) at {url}"


def _scrape_in_pool(context: Any, shops: int, pages: int, workers: int,
                    blocked: Tuple[int, ...] = ()) -> Tuple[Dict[str, int], float]:
    """Scrape the shops in a pool of ``workers``; returns the records emitted and the seconds."""
    tasks = [(list(range(shops))[w::workers], pages, blocked) for w in range(workers)]
    started = time.perf_counter()
    # `with` ends the pool with terminate(): dxtrack flushes each worker on its way out.
    with context.Pool(workers) as pool:
        results = pool.starmap(scrape, tasks, chunksize=1)
    emitted = {stream: sum(r[stream] for r in results) for stream in ("metric", "error")}
    return emitted, time.perf_counter() - started


def _report(emitted: Dict[str, int], found: Dict[str, List[bytes]], elapsed: float,
            out: Any) -> bool:
    """Print what was emitted and found, and sample lines; returns whether all landed once."""
    s3_objects = found.pop("objects", None)  # only from S3 (stage dev)
    ids = [orjson.loads(line)["id"] for lines in found.values() for line in lines]
    rows = [
        ("metrics emitted / found", f"{emitted['metric']:,} / {len(found['metric']):,}"),
        ("errors emitted / found", f"{emitted['error']:,} / {len(found['error']):,}"),
        ("duplicates (by id)", f"{len(ids) - len(set(ids)):,}"),
        ("elapsed, pool start to all delivered", f"{elapsed:.2f} s"),
    ]
    if s3_objects is not None:
        data = sum(len(line) + 1 for lines in found.values() for line in lines)
        rows += [("PutRecordBatch calls (= S3 objects)", f"{len(s3_objects):,}"),
                 ("bytes landed in S3", f"{data:,}"),
                 ("Firehose records if unpacked", f"{len(ids):,}")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
    print("sample lines:", file=out)
    for line in found["metric"][:2] + found["error"][:2]:
        text = line.decode()
        print(f"  {text[:160]}{' ...' if len(text) > 160 else ''}", file=out)
    ok = len(ids) == len(set(ids)) and all(len(found[s]) == emitted[s] for s in emitted)
    print("every record landed exactly once" if ok else "RECORDS MISSING OR DUPLICATED", file=out)
    return ok


def _report_the_run(scratch: str, bucket: str, run_id: str, blocked: Tuple[int, ...],
                    html: Optional[str], out: Any) -> None:
    """Print ``dxtrack report`` of the demo's run, read back from where it landed (the
    bucket, through a cache, or the local files), and write its HTML page."""
    from . import query, report
    from .sources import Bucket

    config = dxtrack.config
    if config is None:
        return
    if config.stage == "test":
        files = query.local_files(scratch)
    else:
        landed = Bucket(config, cache_dir=os.path.join(scratch, "cache"), bucket=bucket)
        found = landed.files()
        files = (found.metric, found.error)
    con = query.connect(*files)
    try:
        summary = report.build(con, context=CONTEXT, run_id=run_id)
    finally:
        con.close()
    print(f"\n$ dxtrack report --stage {config.stage} --context {CONTEXT} --run-id {run_id}",
          file=out)
    print(summary.text(), end="", file=out)
    if summary.failed and blocked:
        print(f"(dxtrack report would exit 1 here, as a cron job's alert: shop-{blocked[0]:03d} "
              "refused the scraper in this run, on purpose)", file=out)
    if html:
        from .report_html import need_matplotlib, write

        try:
            need_matplotlib()
        except ImportError as exc:
            print(f"HTML report: not written: {exc}", file=out)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(html)), exist_ok=True)
            write(summary, html)
            print(f"HTML report: {os.path.abspath(html)}", file=out)


def main(argv: Optional[List[str]] = None, prog: str = "python -m dxtrack.demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--stage", choices=("dev", "test"), default="dev")
    parser.add_argument("--shops", type=int, default=40)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None,
                        help="how worker processes start (default: the platform's)")
    parser.add_argument("--html", default=HTML_REPORT, metavar="FILE",
                        help=f"where to write the run's HTML report (default {HTML_REPORT}); "
                             "'' for none")
    args = parser.parse_args(argv)
    ok = run(args.stage, args.shops, args.pages, args.workers, args.start_method,
             html=args.html or None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
