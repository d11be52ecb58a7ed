"""A large corpus of metric lines, in the library's exact format, for the query and report
benchmarks: several jobs (contexts) and runs, several metric names, metadata with shop and page,
timestamps spread over the last days, and each line's id as the library computes it.

    lines = corpus_lines(1_000_000)            # a list of bytes, one line each ('\\n' ended)
    path = write_corpus(directory, 1_000_000)  # directory/metric.jsonl, as stage test writes it
    objects = gzip_objects(lines, 24)          # (day, body) pairs: Firehose-like .jsonl.gz

Made with orjson directly (about a second per 200,000 lines), not through ``metric()``.
"""

from __future__ import annotations

import datetime
import gzip
import os
import random
from typing import List, Optional, Sequence, Tuple

import orjson

from dxtrack.records import finalize

CONTEXTS = ("shop-scraper", "price-export", "image-sync")
NAMES = ("scrape.products", "scrape.pages", "scrape.seconds", "export.rows", "image.bytes")
SHOPS = tuple(f"shop-{n:03d}" for n in range(40))
RUNS_PER_CONTEXT = 4


def corpus_lines(count: int, *, days: float = 2.0, seed: int = 6,
                 end: Optional[datetime.datetime] = None) -> List[bytes]:
    """``count`` metric lines, oldest first, over the ``days`` before ``end`` (default now)."""
    rng = random.Random(seed)
    end = end or datetime.datetime.now(datetime.timezone.utc)
    last = end.timestamp()
    step = days * 86400.0 / max(count, 1)
    first = last - days * 86400.0
    runs = [(context, (end - datetime.timedelta(hours=12 * r)).strftime("%Y-%m-%dT%H:00:00"))
            for context in CONTEXTS for r in range(RUNS_PER_CONTEXT)]
    dumps, randint, choice = orjson.dumps, rng.randint, rng.choice
    lines = []
    for n in range(count):
        context, run_id = runs[n % len(runs)]
        name = NAMES[n % len(NAMES)]
        value = float(randint(0, 48)) if name != "scrape.seconds" else rng.random() * 30
        record = {"context": context, "metric_name": name, "value": value, "stage": "dev",
                  "metadata": {"shop": choice(SHOPS), "page": n % 50}, "run_id": run_id,
                  "timestamp": first + n * step}
        lines.append(finalize(dumps(record)[:-1]))  # the open body, closed with its id
    return lines


def write_corpus(directory: str, count: int, **options: object) -> str:
    """Write ``count`` lines to ``directory/metric.jsonl`` (as stage test does); its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "metric.jsonl")
    with open(path, "wb") as out:
        out.writelines(corpus_lines(count, **options))  # type: ignore[arg-type]
    return path


def gzip_objects(lines: Sequence[bytes], objects: int,
                 level: int = 1) -> List[Tuple[datetime.date, bytes]]:
    """The lines cut into ``objects`` gzip bodies, each with the UTC day of its first line (its
    ``dt`` partition, as Firehose names it)."""
    size = -(-len(lines) // objects)
    out = []
    for start in range(0, len(lines), size):
        chunk = lines[start:start + size]
        when = orjson.loads(chunk[0])["timestamp"]
        day = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).date()
        out.append((day, gzip.compress(b"".join(chunk), compresslevel=level)))
    return out
