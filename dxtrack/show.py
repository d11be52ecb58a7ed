"""``dxtrack show``: one record found by its id, or a prefix of it, printed for reading.

The id is the sha256 of the record's line (docs/firehose.md), so a prefix of
:data:`MIN_PREFIX` hex digits almost always names one record. A record delivered twice (Firehose
delivers at least once) has one id and is shown once.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List

__all__ = ["MIN_PREFIX", "find", "id_prefix", "render", "summary"]

MIN_PREFIX = 8
#: Records listed when a prefix names several.
LISTED = 20
_ID = re.compile(r"[0-9a-f]{1,64}")
_LABEL = 10


def id_prefix(text: str) -> str:
    """A record id or prefix as given on the command line, checked and in lower case."""
    prefix = text.strip().lower()
    if not _ID.fullmatch(prefix):
        raise ValueError(f"{text!r} is not a record id (up to 64 hex digits)")
    if len(prefix) < MIN_PREFIX:
        raise ValueError(f"{text!r} is too short: give at least {MIN_PREFIX} hex digits of "
                         "the id")
    return prefix


def find(con: Any, prefix: str, limit: int = LISTED + 1) -> List[Dict[str, Any]]:
    """The records of the views ``metric`` and ``error`` whose id starts with ``prefix``, one
    per id, as dicts of their columns plus ``kind``; at most ``limit``."""
    found: Dict[str, Dict[str, Any]] = {}
    for kind in ("metric", "error"):
        cursor = con.execute(f"SELECT * FROM {kind} WHERE starts_with(id, ?) "
                             "ORDER BY \"timestamp\" LIMIT ?", [prefix, limit])
        names = [column[0] for column in cursor.description]
        for row in cursor.fetchall():
            record = {"kind": kind, **dict(zip(names, row))}
            found.setdefault(record["id"], record)
    return list(found.values())[:limit]


def summary(record: Dict[str, Any]) -> str:
    """One line naming a record: kind, id, time, and its metric name or exception type."""
    what = record.get("metric_name") if record["kind"] == "metric" else \
        (record.get("exception") or {}).get("type")
    return f"{record['kind']:<6}  {record['id']}  {_time(record.get('timestamp'))}  {what}"


def render(record: Dict[str, Any]) -> str:
    """The record for reading: its fields one a line, an error's traceback in full."""
    lines = [f"{record['kind']} {record['id']}"]
    if record["kind"] == "metric":
        fields = [("name", record.get("metric_name")), ("value", _number(record.get("value")))]
    else:
        exception = record.get("exception") or {}
        fields = [("type", exception.get("type")), ("value", exception.get("value"))]
    fields += [("context", record.get("context")), ("run_id", record.get("run_id")),
               ("stage", record.get("stage")), ("time", _time(record.get("timestamp"))),
               ("metadata", _metadata(record.get("metadata")))]
    for label, value in fields:
        text = "" if value is None else str(value)
        lines.append(f"  {label:<{_LABEL}}" + text.replace("\n", "\n" + " " * (_LABEL + 2)))
    if record["kind"] == "error":
        traceback = (record.get("exception") or {}).get("traceback") or "(none recorded)"
        lines += ["  traceback:", traceback.rstrip("\n")]
    return "\n".join(lines)


def _time(value: Any) -> str:
    return "(no time)" if value is None else f"{value.isoformat(sep=' ')} UTC"


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _metadata(value: Any) -> str:
    """Metadata as JSON: on one line if short, else indented."""
    if value is None:
        return "{}"
    try:
        decoded = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return str(value)
    text = json.dumps(decoded, ensure_ascii=False)
    return text if len(text) <= 70 else json.dumps(decoded, ensure_ascii=False, indent=2)
