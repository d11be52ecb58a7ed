"""Shared fixtures: a moto server on 127.0.0.1, Firehose streams into S3, clients."""

from __future__ import annotations

import concurrent.futures
import os
import urllib.request
import zlib
from typing import Any, Callable, Dict, Iterator, List

import boto3
import orjson
import pytest

from dxtrack import DXTrack
from dxtrack.demo import create_landing, firehose_expands_timestamps
from dxtrack.sources import decompressed

REGION = "eu-west-1"
BUCKET = "dxtrack-landing"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full-counts", action="store_true", default=False,
        help="run the process-pool matrix with 5,000 metrics per worker in every mode "
             "(about an hour against moto; `make test-full`)",
    )


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No test may find real credentials or configuration on the machine."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "DXTRACK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto server for the whole session; each test using ``firehose`` resets it."""
    from moto.server import ThreadedMotoServer

    firehose_expands_timestamps()  # as Firehose names objects; moto 5 leaves them as they are
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def plain(body: bytes) -> bytes:
    """An S3 object's lines: a gzip body (one member per Firehose record) decompressed."""
    return decompressed(body)


def members(data: bytes) -> List[bytes]:
    """The decompressed members of a gzip body, one by one (each must be complete)."""
    found = []
    while data:
        reader = zlib.decompressobj(31)
        found.append(reader.decompress(data))
        assert reader.eof, "a gzip member is cut short"
        data = reader.unused_data
    return found


class Landing:
    """The S3 side of the moto server: what Firehose delivered, per stream."""

    def __init__(self, url: str, stage: str = "dev") -> None:
        self.url = url
        self.stage = stage
        kwargs: Dict[str, Any] = dict(region_name=REGION, endpoint_url=url, **CREDENTIALS)
        self.s3 = boto3.client("s3", **kwargs)
        self.firehose = boto3.client("firehose", **kwargs)

    def create(self) -> None:
        """What ``dxtrack setup`` makes: the bucket, the role, both streams, the tables."""
        create_landing(self.url, bucket=BUCKET, stage=self.stage, region=REGION,
                       credentials=CREDENTIALS)

    def objects(self, stream: str) -> List[bytes]:
        """Every S3 object body under the stream's prefix (one per PutRecordBatch call)."""
        keys = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET, Prefix=f"{stream}/"):
            keys.extend(item["Key"] for item in page.get("Contents", []))

        def read(key: str) -> bytes:
            return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(read, keys))

    def lines(self, stream: str) -> List[bytes]:
        """The lines of every object; gzip objects (``compression="gzip"``) decompressed."""
        return [line for body in self.objects(stream) for line in plain(body).splitlines()]

    def records(self, stream: str) -> List[Dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines(stream)]

    def client_options(self) -> Dict[str, Any]:
        """What ``configure()`` needs to send to this server."""
        return dict(stage=self.stage, endpoint_url=self.url, region_name=REGION, **CREDENTIALS)


@pytest.fixture
def landing(moto_url: str) -> Landing:
    """A clean moto server with the bucket and both dev streams created."""
    request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    result = Landing(moto_url)
    result.create()
    return result


@pytest.fixture
def make_client() -> Iterator[Callable[..., DXTrack]]:
    """Configured DXTrack instances, closed after the test."""
    made: List[DXTrack] = []

    def make(**options: Any) -> DXTrack:
        client = DXTrack(clock=options.pop("clock", None), retry=options.pop("retry", None))
        options.setdefault("context", "tests")
        options.setdefault("run_id", "run-1")
        options.setdefault("stage", "test")
        client.configure(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(timeout=5)
