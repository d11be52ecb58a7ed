"""``make demo``: a scraper-like job reporting through dxtrack, end to end.

Stage ``dev`` (the default) starts an embedded moto server on 127.0.0.1 that
plays Amazon Data Firehose and S3, creates the bucket and both delivery
streams, runs the job against it, then reads the S3 objects back and compares
them with what the job emitted. No AWS account is involved and nothing leaves
the machine. Stage ``test`` runs the same job writing local JSON-lines files.

    python -m dxtrack.demo [--stage dev|test] [--shops N] [--pages N]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import orjson

from . import DXTrack

REGION = "eu-west-1"
BUCKET = "dxtrack-demo-landing"
CREDENTIALS = {"aws_access_key_id": "demo", "aws_secret_access_key": "demo"}


class ParseError(Exception):
    """What the demo scraper raises for a page it cannot read."""


def scrape(client: DXTrack, shops: int, pages: int, seed: int = 7) -> Dict[str, int]:
    """Pretend to scrape ``shops`` x ``pages`` pages; returns how many records it emitted."""
    rng = random.Random(seed)
    emitted = {"metric": 0, "error": 0}
    for shop_number in range(shops):
        shop = f"shop-{shop_number:03d}"
        started = time.monotonic()
        failures: List[Exception] = []
        for page in range(pages):
            client.metric("scrape.products", rng.randint(0, 48), metadata={"shop": shop, "page": page})
            emitted["metric"] += 1
            if rng.random() < 0.02:
                try:
                    raise ParseError(f"{shop}: no price on page {page}")
                except ParseError as exc:
                    failures.append(exc)
        if failures:
            client.errors(failures, metadata={"shop": shop})
            emitted["error"] += len(failures)
        try:
            if shop_number % 7 == 3:
                raise ConnectionError(f"{shop}: connection reset after {pages} pages")
        except ConnectionError:
            client.error(metadata={"shop": shop})
            emitted["error"] += 1
        client.metric("scrape.pages", pages, metadata={"shop": shop})
        client.metric("scrape.seconds", time.monotonic() - started, metadata={"shop": shop})
        emitted["metric"] += 2
    return emitted


def _start_firehose() -> Tuple[Any, str]:
    """An embedded moto server with the bucket and the two dev streams."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:  # pragma: no cover - depends on the install
        sys.exit("the dev demo needs moto's server: pip install 'dxtrack[demo]' (make demo does)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    options: Dict[str, Any] = dict(region_name=REGION, endpoint_url=url, **CREDENTIALS)
    boto3.client("s3", **options).create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    firehose = boto3.client("firehose", **options)
    for stream in ("metric", "error"):
        firehose.create_delivery_stream(
            DeliveryStreamName=f"dxtrack-{stream}-input-dev",
            DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": "arn:aws:iam::123456789012:role/dxtrack-demo",
                "BucketARN": f"arn:aws:s3:::{BUCKET}",
                "Prefix": f"{stream}/",
            },
        )
    return server, url


def _landed(url: str) -> Dict[str, List[bytes]]:
    """Every line in the demo bucket, per stream."""
    import boto3

    s3 = boto3.client("s3", region_name=REGION, endpoint_url=url, **CREDENTIALS)
    found: Dict[str, List[bytes]] = {"metric": [], "error": []}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            stream = item["Key"].split("/", 1)[0]
            body = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            found[stream].extend(body.splitlines())
    return found


def _local(output_dir: str) -> Dict[str, List[bytes]]:
    found: Dict[str, List[bytes]] = {}
    for stream in ("metric", "error"):
        path = os.path.join(output_dir, f"{stream}.jsonl")
        with open(path, "rb") as lines:
            found[stream] = lines.read().splitlines()
    return found


def run(stage: str = "dev", shops: int = 40, pages: int = 500, out: Any = None) -> bool:
    """Run the demo; prints a report and returns whether every record landed once."""
    out = out or sys.stdout
    server: Optional[Any] = None
    scratch = tempfile.mkdtemp(prefix="dxtrack-demo-")
    client = DXTrack()
    try:
        if stage == "dev":
            server, url = _start_firehose()
            client.configure(
                stage="dev", context="demo-scraper", run_id=time.strftime("%Y%m%dT%H%M%S"),
                default_metadata={"host": "demo"}, use_async_requests=True,
                endpoint_url=url, region_name=REGION, **CREDENTIALS,
            )
            where = f"an embedded Firehose (moto) at {url}"
        else:
            client.configure(
                stage="test", context="demo-scraper", run_id=time.strftime("%Y%m%dT%H%M%S"),
                default_metadata={"host": "demo"}, use_async_requests=True, output_dir=scratch,
            )
            where = f"local files in {scratch}"
        print(f"dxtrack demo: {shops} shops x {pages} pages, reporting to {where}", file=out)
        started = time.perf_counter()
        emitted = scrape(client, shops, pages)
        emit_seconds = time.perf_counter() - started
        delivered = client.flush_metrics_buffer(timeout=60)
        elapsed = time.perf_counter() - started
        stats = client.stats()
        found = _landed(url) if stage == "dev" else _local(scratch)
        ids = [orjson.loads(line)["id"] for lines in found.values() for line in lines]

        rows = [
            ("metrics emitted / found", f"{emitted['metric']:,} / {len(found['metric']):,}"),
            ("errors emitted / found", f"{emitted['error']:,} / {len(found['error']):,}"),
            ("duplicates (by id)", f"{len(ids) - len(set(ids)):,}"),
            ("dropped / failed", f"{sum(stats['dropped'].values()):,} / {stats['failed']:,}"),
            ("time in metric()/error() calls", f"{emit_seconds:.2f} s"),
            ("elapsed until delivered", f"{elapsed:.2f} s"),
        ]
        if stage == "dev":
            rows += [
                ("PutRecordBatch calls", f"{stats.get('put_record_batch_calls', 0):,}"),
                ("Firehose records (billed units)", f"{stats.get('firehose_records', 0):,}"),
                ("bytes sent", f"{stats.get('bytes_sent', 0):,}"),
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
            delivered
            and len(found["metric"]) == emitted["metric"]
            and len(found["error"]) == emitted["error"]
            and len(ids) == len(set(ids))
        )
        print("every record landed exactly once" if ok else "RECORDS MISSING OR DUPLICATED", file=out)
        return bool(ok)
    finally:
        client.close(timeout=10)
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dxtrack.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("dev", "test"), default="dev")
    parser.add_argument("--shops", type=int, default=40)
    parser.add_argument("--pages", type=int, default=500)
    args = parser.parse_args(argv)
    return 0 if run(args.stage, args.shops, args.pages) else 1


if __name__ == "__main__":
    sys.exit(main())
