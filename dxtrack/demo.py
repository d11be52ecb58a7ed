"""``make demo``: a scraper-like job reporting through dxtrack, end to end.

Stage ``dev`` (the default) starts an embedded moto server on 127.0.0.1 that
plays Amazon Data Firehose and S3, creates the bucket and both delivery
streams, runs the job in a pool of worker processes against it, then reads the
S3 objects back and compares them with what the workers emitted. No AWS
account is involved and nothing leaves the machine. Stage ``test`` runs the
same job writing local JSON-lines files.

The workers use the ready-made ``dxtrack`` client, configured once in the
parent: forked children inherit it, spawned ones adopt its settings, and each
worker's records are flushed when the pool ends it.

    python -m dxtrack.demo [--stage dev|test] [--shops N] [--pages N] [--workers N]
                           [--start-method fork|spawn|forkserver]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import orjson

from . import dxtrack

REGION = "eu-west-1"
BUCKET = "dxtrack-demo-landing"
CREDENTIALS: Dict[str, Any] = {"aws_access_key_id": "demo", "aws_secret_access_key": "demo"}


class ParseError(Exception):
    """What the demo scraper raises for a page it cannot read."""


def scrape(shops: List[int], pages: int) -> Dict[str, int]:
    """Pretend to scrape ``pages`` pages of each shop; returns how many records it emitted."""
    emitted = {"metric": 0, "error": 0}
    for shop_number in shops:
        rng = random.Random(shop_number)
        shop = f"shop-{shop_number:03d}"
        started = time.monotonic()
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
        dxtrack.metric("scrape.seconds", time.monotonic() - started, metadata={"shop": shop})
        emitted["metric"] += 2
    return emitted


def _scrape_task(task: Tuple[List[int], int]) -> Dict[str, int]:
    return scrape(*task)


def _start_firehose() -> Tuple[Any, str]:
    """An embedded moto server with the bucket and the two dev streams."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - depends on the install
        sys.exit("the dev demo needs moto's server: pip install 'dxtrack[demo]' (make demo does)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    create_landing(url)
    return server, url


def create_landing(
    url: str,
    *,
    bucket: str = BUCKET,
    stage: str = "dev",
    region: str = REGION,
    credentials: Optional[Dict[str, Any]] = None,
    streams: Sequence[str] = ("metric", "error"),
) -> None:
    """Create ``bucket`` and the stage's delivery streams into it (prefix ``<stream>/``).

    For a moto server at ``url``: the demo, the tests and the benchmarks all use it.
    """
    import boto3

    options: Dict[str, Any] = dict(
        region_name=region, endpoint_url=url, **(credentials or CREDENTIALS)
    )
    boto3.client("s3", **options).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
    )
    firehose = boto3.client("firehose", **options)
    for stream in streams:
        firehose.create_delivery_stream(
            DeliveryStreamName=f"dxtrack-{stream}-input-{stage}",
            DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": "arn:aws:iam::123456789012:role/dxtrack",
                "BucketARN": f"arn:aws:s3:::{bucket}",
                "Prefix": f"{stream}/",
            },
        )


def _landed(url: str) -> Dict[str, List[bytes]]:
    """Every line in the demo bucket, per stream."""
    import boto3

    s3 = boto3.client("s3", region_name=REGION, endpoint_url=url, **CREDENTIALS)
    found: Dict[str, List[bytes]] = {"metric": [], "error": [], "objects": []}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            stream = item["Key"].split("/", 1)[0]
            body = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            found[stream].extend(body.splitlines())
            found["objects"].append(item["Key"].encode())
    return found


def _local(output_dir: str) -> Dict[str, List[bytes]]:
    found: Dict[str, List[bytes]] = {}
    for stream in ("metric", "error"):
        path = os.path.join(output_dir, f"{stream}.jsonl")
        try:
            with open(path, "rb") as lines:
                found[stream] = lines.read().splitlines()
        except FileNotFoundError:  # a small run may record no error at all
            found[stream] = []
    return found


def run(stage: str = "dev", shops: int = 40, pages: int = 500, workers: int = 4,
        start_method: Optional[str] = None, out: Any = None) -> bool:
    """Run the demo; prints a report and returns whether every record landed once."""
    out = out or sys.stdout
    server: Optional[Any] = None
    scratch = tempfile.mkdtemp(prefix="dxtrack-demo-")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    try:
        if stage == "dev":
            server, url = _start_firehose()
            # Credentials through the environment, where worker processes find them too
            # (explicit keys given to configure() are never passed to children).
            os.environ["AWS_ACCESS_KEY_ID"] = CREDENTIALS["aws_access_key_id"]
            os.environ["AWS_SECRET_ACCESS_KEY"] = CREDENTIALS["aws_secret_access_key"]
            dxtrack.configure(
                stage="dev", context="demo-scraper", run_id=run_id,
                default_metadata={"host": "demo"}, use_async_requests=True,
                endpoint_url=url, region_name=REGION,
            )
            where = f"an embedded Firehose (moto) at {url}"
        else:
            dxtrack.configure(
                stage="test", context="demo-scraper", run_id=run_id,
                default_metadata={"host": "demo"}, use_async_requests=True, output_dir=scratch,
            )
            where = f"local files in {scratch}"
        context = multiprocessing.get_context(start_method)
        method = context.get_start_method()
        print(f"dxtrack demo: {shops} shops x {pages} pages in {workers} worker processes "
              f"({method}), reporting to {where}", file=out)
        tasks = [(list(range(shops))[w::workers], pages) for w in range(workers)]
        started = time.perf_counter()
        # `with` ends the pool with terminate(): dxtrack flushes each worker on its way out.
        with context.Pool(workers) as pool:
            results = pool.map(_scrape_task, tasks, chunksize=1)
        emitted = {stream: sum(r[stream] for r in results) for stream in ("metric", "error")}
        elapsed = time.perf_counter() - started
        found = _landed(url) if stage == "dev" else _local(scratch)
        s3_objects = found.pop("objects", [])
        ids = [orjson.loads(line)["id"] for lines in found.values() for line in lines]

        rows = [
            ("metrics emitted / found", f"{emitted['metric']:,} / {len(found['metric']):,}"),
            ("errors emitted / found", f"{emitted['error']:,} / {len(found['error']):,}"),
            ("duplicates (by id)", f"{len(ids) - len(set(ids)):,}"),
            ("elapsed, pool start to all delivered", f"{elapsed:.2f} s"),
        ]
        if stage == "dev":
            data = sum(len(line) + 1 for lines in found.values() for line in lines)
            rows += [
                ("PutRecordBatch calls (= S3 objects)", f"{len(s3_objects):,}"),
                ("bytes landed in S3", f"{data:,}"),
                ("Firehose records if unpacked", f"{len(ids):,}"),
            ]
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"  {label:<{width}}  {value}", file=out)
        print("sample lines:", file=out)
        for stream in ("metric", "error"):
            for line in found[stream][:2]:
                text = line.decode()
                print(f"  {text[:160]}{' ...' if len(text) > 160 else ''}", file=out)
        ok = (
            len(found["metric"]) == emitted["metric"]
            and len(found["error"]) == emitted["error"]
            and len(ids) == len(set(ids))
        )
        verdict = "every record landed exactly once" if ok else "RECORDS MISSING OR DUPLICATED"
        print(verdict, file=out)
        return ok
    finally:
        dxtrack.close(timeout=10)
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Optional[List[str]] = None, prog: str = "python -m dxtrack.demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--stage", choices=("dev", "test"), default="dev")
    parser.add_argument("--shops", type=int, default=40)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None,
                        help="how worker processes start (default: the platform's)")
    args = parser.parse_args(argv)
    ok = run(args.stage, args.shops, args.pages, args.workers, args.start_method)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
