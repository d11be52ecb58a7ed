"""SQL over landed records: the DuckDB views ``metric`` and ``error``.

DuckDB is an optional extra (``pip install 'dxtrack[query]'``); this module imports it only
when a connection is made. The views have the records' columns with ``timestamp`` as a
``TIMESTAMP`` (UTC) whichever format the job wrote (unix seconds or the ``datetime`` text)
and ``metadata`` as ``JSON``.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import duckdb

__all__ = ["ERROR_COLUMNS", "METRIC_COLUMNS", "connect", "local_files", "torn", "within"]

_COMMON = {"id": "VARCHAR", "context": "VARCHAR", "stage": "VARCHAR", "run_id": "VARCHAR"}
#: The columns read from metric lines; ``timestamp`` is read as text, then converted.
METRIC_COLUMNS: Dict[str, str] = {
    **_COMMON, "metric_name": "VARCHAR", "value": "DOUBLE", "metadata": "JSON",
    "timestamp": "VARCHAR",
}
#: The columns read from error lines.
ERROR_COLUMNS: Dict[str, str] = {
    **_COMMON, "exception": "STRUCT(type VARCHAR, value VARCHAR, traceback VARCHAR)",
    "metadata": "JSON", "timestamp": "VARCHAR",
}
# Unix seconds (the default) or 'YYYY-mm-dd HH:MM:SS.ffffff' (timestamp_format='datetime').
_TIMESTAMP = ("coalesce(try_cast(\"timestamp\" AS TIMESTAMP), "
              "make_timestamp(CAST(try_cast(\"timestamp\" AS DOUBLE) * 1e6 AS BIGINT)))")


def need_duckdb() -> Any:
    """Import DuckDB, or raise an ImportError saying how to install it."""
    try:
        import duckdb
    except ImportError:
        raise ImportError("this needs DuckDB: pip install 'dxtrack[query]'") from None
    return duckdb


def connect(metric_files: Sequence[str], error_files: Sequence[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views ``metric`` and ``error`` over JSON-lines
    files (plain or ``.gz``); an empty list gives an empty view with the same columns."""
    con: duckdb.DuckDBPyConnection = need_duckdb().connect(":memory:")
    _view(con, "metric", metric_files, METRIC_COLUMNS)
    _view(con, "error", error_files, ERROR_COLUMNS)
    return con


def local_files(output_dir: str) -> Tuple[List[str], List[str]]:
    """The metric and error files stage ``test`` wrote in ``output_dir``."""
    found: Dict[str, List[str]] = {"metric": [], "error": []}
    for kind in found:
        path = os.path.join(output_dir, f"{kind}.jsonl")
        if os.path.isfile(path) and os.path.getsize(path):
            found[kind].append(path)
    return found["metric"], found["error"]


def torn(files: Sequence[str]) -> List[str]:
    """Those of ``files`` (plain JSON lines) whose last line is cut off: no newline at the
    end, as a writer that stopped mid-line leaves it. The views skip that line."""
    found = []
    for path in files:
        try:
            with open(path, "rb") as lines:
                lines.seek(-1, os.SEEK_END)
                if lines.read(1) != b"\n":
                    found.append(path)
        except OSError:  # empty or gone: read_json says so, if it matters
            continue
    return found


def within(con: duckdb.DuckDBPyConnection, start: Optional[datetime.datetime] = None,
           end: Optional[datetime.datetime] = None) -> None:
    """Narrow the views ``metric`` and ``error`` of ``con`` to records from ``start``
    (inclusive) to ``end`` (exclusive), naive UTC; ``None`` leaves that side open. The whole
    views stay as ``metric_all`` and ``error_all``."""
    limits = [f'"timestamp" {op} TIMESTAMP {_literal(when.isoformat(sep=" "))}'
              for op, when in ((">=", start), ("<", end)) if when is not None]
    if not limits:
        return
    for name in ("metric", "error"):
        con.execute(f"ALTER VIEW {name} RENAME TO {name}_all")
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {name}_all WHERE "
                    + " AND ".join(limits))


def _view(con: Any, name: str, files: Sequence[str], columns: Dict[str, str]) -> None:
    selected = ", ".join(
        f"{_TIMESTAMP} AS \"timestamp\"" if column == "timestamp" else f'"{column}"'
        for column in columns)
    if files:
        spec = "{" + ", ".join(f"'{c}': '{t}'" for c, t in columns.items()) + "}"
        listed = "[" + ", ".join(_literal(f) for f in files) + "]"
        # A line that is not a record (the cut-off last line a crashed writer leaves) is
        # skipped, not fatal: DuckDB reads what it can of it, and a record's id comes last.
        # :func:`torn` names the files that end in one.
        source = (f"read_json({listed}, format='newline_delimited', columns={spec}, "
                  "compression='auto_detect', ignore_errors=true) WHERE id IS NOT NULL")
    else:
        source = ("(SELECT " + ", ".join(f"NULL::{t} AS \"{c}\"" for c, t in columns.items())
                  + " WHERE false)")
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {selected} FROM {source}")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
