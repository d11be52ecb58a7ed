"""Where a stage's records are read from, for ``dxtrack query``, ``show`` and ``report``.

Stage ``test``: the files ``metric.jsonl`` and ``error.jsonl`` in the output directory. Stages
``dev`` and ``prod``: the stage's bucket as ``dxtrack setup`` lays it out
(:meth:`dxtrack.landing.Landing.prefix`), listed and fetched into a local cache. A cached file
is named by bucket, key and ETag, so an object is fetched once; it is written under a
temporary name and renamed when complete, so a half-written file is never read. Objects may be
plain, gzip, several gzip members one after the other (what a client compressing its own
records makes); the cache holds them decompressed, since DuckDB read only the first member of
such a file before mid-2025 and ``dxtrack[query]`` allows those versions.

A :class:`Window` limits the days listed: ``dt`` is the day Firehose received an object's
oldest record, so the days are widened by one on each side, and the records themselves are
filtered on ``timestamp`` (:func:`dxtrack.query.within`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import io
import os
import re
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import botocore.config
import botocore.exceptions

from .config import DEFAULT_REGION, Config
from .landing import DAY, STREAMS, Landing
from .query import local_files
from .sinks.firehose import session_for

__all__ = ["Bucket", "Files", "SourceError", "Window", "default_cache_dir", "local",
           "parse_duration", "parse_time"]

#: A call's connect and read timeouts (three attempts each), as ``setup``'s.
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 30.0
#: Objects fetched at a time.
WORKERS = 8
_DAY = _dt.timedelta(days=1)
_UTC = _dt.timezone.utc
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SINCE = re.compile(r"(\d+)([smhdw])")
_GZIP_MAGIC = b"\x1f\x8b"


class SourceError(Exception):
    """Records that cannot be listed or fetched: the bucket, the credentials, an object."""


@dataclass(frozen=True)
class Window:
    """The time records are wanted from: ``start`` inclusive, ``end`` exclusive, both naive
    UTC; ``None`` leaves that side open."""

    start: Optional[_dt.datetime] = None
    end: Optional[_dt.datetime] = None

    def days(self) -> Tuple[Optional[_dt.date], Optional[_dt.date]]:
        """The first and last ``dt`` partitions that can hold records of the window (a day
        beyond year 1 or 9999 leaves that side open)."""
        try:
            first = (self.start - _DAY).date() if self.start else None
        except OverflowError:
            first = None
        try:
            last = (self.end - _dt.timedelta(microseconds=1) + _DAY).date() if self.end else None
        except OverflowError:
            last = None
        return first, last


def parse_duration(text: str) -> _dt.timedelta:
    """``--since``: a number and a unit, ``90m``, ``24h``, ``7d`` (also ``s``, ``w``)."""
    match = _SINCE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90m, 24h or 7d")
    try:
        return _dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise ValueError(f"{text!r} is longer than the years a date can hold") from None


def parse_time(text: str, *, end: bool = False) -> _dt.datetime:
    """``--from`` or ``--to``: a date (``--to`` takes in the whole day) or an ISO 8601 time;
    without an offset, UTC. Returned naive, in UTC."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = _dt.datetime.combine(_dt.date.fromisoformat(text), _dt.time())
            if not end:
                return day
            return day + _DAY if day.date() < _dt.date.max else _dt.datetime.max
        when = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        if when.tzinfo:
            when = when.astimezone(_UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a date (2026-12-01) or a time "
                         "(2026-12-01T06:00, UTC unless it has an offset)") from None
    return when


@dataclass
class Files:
    """The JSON-lines files of each kind of record, and where they came from."""

    metric: List[str] = field(default_factory=list)
    error: List[str] = field(default_factory=list)
    #: The directory, or ``s3://bucket/prefix``.
    where: str = ""
    #: Objects listed, and how many of them (and how many bytes) were fetched, not cached.
    objects: int = 0
    fetched: int = 0
    fetched_bytes: int = 0


def local(output_dir: str) -> Files:
    """The files stage ``test`` wrote in ``output_dir``."""
    metric, error = local_files(output_dir)
    return Files(metric, error, where=os.path.abspath(output_dir))


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CACHE_HOME/dxtrack``, else ``~/.cache/dxtrack``."""
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dxtrack")


class Bucket:
    """A stage's bucket, as ``setup`` lays it out, read through a cache directory.

    ``bucket`` defaults to the one setup makes (``dxtrack-<stage>-<account>``, the account
    from STS); ``prefix`` is a folder holding ``metric/`` and ``error/``, if not the root.
    """

    def __init__(self, config: Config, *, cache_dir: str, bucket: Optional[str] = None,
                 prefix: str = "", session: Any = None, workers: int = WORKERS) -> None:
        try:
            session = session or session_for(config)
            region = session.region_name or DEFAULT_REGION
            settings = botocore.config.Config(
                connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                max_pool_connections=workers,
                retries={"mode": "standard", "total_max_attempts": 3})
            self.s3 = session.client("s3", region_name=region, endpoint_url=config.endpoint_url,
                                     config=settings)
            if bucket is None:
                sts = session.client("sts", region_name=region,
                                     endpoint_url=config.endpoint_url, config=settings)
                account = sts.get_caller_identity()["Account"]
                bucket = Landing.of(config, account, region).bucket
        except botocore.exceptions.ClientError as exc:
            raise SourceError(f"the stage's bucket: {_reason(exc)}; name it with --bucket"
                              ) from None
        except botocore.exceptions.BotoCoreError as exc:  # no credentials, a missing profile
            raise SourceError(f"{type(exc).__name__}: {exc}") from None
        self.bucket, self.workers = bucket, workers
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache_dir = cache_dir

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def files(self, window: Window = Window()) -> Files:
        """Every object of the window's days, fetched unless the cache has it."""
        listed = {kind: list(self.listing(kind, window)) for kind in STREAMS}
        found = Files(where=self.where, objects=sum(map(len, listed.values())))
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for kind, objects in listed.items():
                for path, fetched in pool.map(lambda item: self.cached(*item), objects):
                    if fetched is not None:
                        found.fetched += 1
                        found.fetched_bytes += fetched
                    if os.path.getsize(path):
                        getattr(found, kind).append(path)
        return found

    def listing(self, kind: str, window: Window = Window()) -> Iterator[Tuple[str, str]]:
        """The key and ETag of each object in the kind's folders of the window's days."""
        base = self.prefix + Landing.prefix(kind).split(DAY)[0]  # 'metric/dt='
        first, last = window.days()
        request: Dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
        if first is not None:  # keys sort by day: start just before the first one
            request["StartAfter"] = f"{base}{first.isoformat()}"
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(**request):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    day = _day(key[len(base):])
                    if day is None:
                        continue  # not in a day's folder: not setup's layout
                    if last is not None and day > last:
                        return
                    yield key, item["ETag"]
        except botocore.exceptions.ClientError as exc:
            advice = ("; name it with --bucket" if _code(exc) in ("NoSuchBucket", "404")
                      else "")
            raise SourceError(f"listing {self.where}: {_reason(exc)}{advice}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"listing {self.where}: {exc}") from None

    def path(self, key: str, etag: str) -> str:
        """Where the cache keeps an object's text: by bucket, key and ETag."""
        parts = [_segment(part) for part in key.split("/")]
        tag = re.sub(r"[^0-9A-Za-z-]", "_", etag.strip('"'))
        parts[-1] = f"{parts[-1]}.{tag}.jsonl"
        return os.path.join(self.cache_dir, "s3", _segment(self.bucket), *parts)

    def cached(self, key: str, etag: str) -> Tuple[str, Optional[int]]:
        """The object's text in the cache, fetched first if it is not there: returns its path
        and the bytes fetched (``None`` if the cache had it)."""
        path = self.path(key, etag)
        if os.path.exists(path):
            return path, None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out:
                answer = self.s3.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
                size = int(answer.get("ContentLength", 0))
                unpack(answer["Body"], out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
            _forget_older(path)
        except botocore.exceptions.ClientError as exc:
            advice = "; it changed while it was read, run again" if _code(exc) in (
                "PreconditionFailed", "412") else ""
            raise SourceError(f"fetching s3://{self.bucket}/{key}: {_reason(exc)}{advice}"
                              ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"fetching s3://{self.bucket}/{key}: {exc}") from None
        except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise SourceError(f"s3://{self.bucket}/{key}: {type(exc).__name__}: {exc}"
                              ) from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return path, size


def _forget_older(path: str) -> None:
    """Remove the cache's copies of the same object under other ETags (it was replaced)."""
    directory, name = os.path.split(path)
    stem = name[:-len(".jsonl")].rpartition(".")[0] + "."  # the key's last part, and a dot
    for other in os.listdir(directory):
        middle = other[len(stem):-len(".jsonl")]
        if other != name and other.startswith(stem) and other.endswith(".jsonl") \
                and middle and "." not in middle:  # an ETag holds no dot: the same key
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, other))


def decompressed(body: bytes) -> bytes:
    """An object's lines, from its whole body (:func:`unpack` on bytes in memory)."""
    out = io.BytesIO()
    unpack(io.BytesIO(body), out)
    return out.getvalue()


def unpack(body: Any, out: Any) -> None:
    """Copy an object's lines from ``body`` to ``out``: gzip members decompressed, one after
    the other, and plain lines as they are, in whatever mix. (A stage of gzip clients holds
    plain lines too when one producer was left without ``compression="gzip"``; JSON text
    never holds the byte 0x1f that starts a gzip member, so the two cannot be confused.)"""
    reader: Any = None  # the member being decompressed
    data = b""
    for chunk in iter(lambda: body.read(1 << 20), b""):
        data += chunk
        while data:
            if reader is not None:
                out.write(reader.decompress(data))
                data = reader.unused_data if reader.eof else b""
                reader = None if reader.eof else reader
            elif data.startswith(_GZIP_MAGIC):
                reader = zlib.decompressobj(31)
            elif data == _GZIP_MAGIC[:1]:
                break  # a member may start here: wait for the next byte
            else:
                cut = data.find(_GZIP_MAGIC[:1], 1)
                plain, data = (data, b"") if cut < 0 else (data[:cut], data[cut:])
                out.write(plain)
    if reader is not None or data:
        raise EOFError("the object ends in the middle of a gzip member")


def _day(text: str) -> Optional[_dt.date]:
    """The day of a ``YYYY-MM-DD/...`` folder name, if it is one."""
    if len(text) < 11 or text[10] != "/":
        return None
    try:
        return _dt.date.fromisoformat(text[:10])
    except ValueError:
        return None


def _segment(part: str) -> str:
    """A key's path segment as a file name: one-to-one, never ``.``, ``..`` or empty."""
    quoted = urllib.parse.quote(part, safe="=-_.")
    if quoted in ("", ".", ".."):
        return "%" + quoted.replace(".", "%2E")  # '%' alone is never quote()'s output
    return quoted


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reason(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', 'error')}: {error.get('Message') or exc}"
