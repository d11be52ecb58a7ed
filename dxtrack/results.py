"""The rows a query answers, from DuckDB or Athena, and how ``dxtrack query`` prints them.

Formats: ``table``, aligned columns for reading (long cells cut, newlines shown as ``\\n``);
``csv``, with a header line; ``json``, one JSON object a line (JSON Lines), times in ISO 8601,
``JSON`` columns such as ``metadata`` as objects.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, TextIO

__all__ = ["FORMATS", "Result", "from_duckdb", "write"]

FORMATS = ("table", "csv", "json")
#: A table cell longer than this is cut (csv and json keep everything).
CELL_WIDTH = 80


@dataclass
class Result:
    """Column names, their types as the engine names them (lower case), and the rows."""

    columns: List[str]
    types: List[str] = field(default_factory=list)
    rows: List[Sequence[Any]] = field(default_factory=list)


def from_duckdb(con: Any, sql: str) -> Result:
    """Run ``sql`` on a DuckDB connection; its errors are DuckDB's own."""
    cursor = con.execute(sql)
    description = cursor.description or []
    rows = cursor.fetchall() if description else []
    return Result([column[0] for column in description],
                  [str(column[1]).lower() for column in description], rows)


def write(result: Result, form: str, out: TextIO) -> None:
    """Print ``result`` to ``out`` as ``table``, ``csv`` or ``json``."""
    writers: Dict[str, Callable[[Result, TextIO], None]] = {
        "table": _table, "csv": _csv, "json": _json_lines}
    writers[form](result, out)


def _json_lines(result: Result, out: TextIO) -> None:
    is_json = [kind == "json" for kind in result.types] + [False] * len(result.columns)
    names = _unique(result.columns)
    for row in result.rows:
        record = {name: _decoded(value) if is_json[index] else _finite(value)
                  for index, (name, value) in enumerate(zip(names, row))}
        out.write(json.dumps(record, ensure_ascii=False, default=_plain, allow_nan=False)
                  + "\n")


def _unique(names: Sequence[str]) -> List[str]:
    """Column names as JSON keys: a name met again becomes ``name_2``, ``name_3``, ..."""
    seen: Dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        candidate = name if seen[name] == 1 else f"{name}_{seen[name]}"
        while candidate in seen and candidate != name:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
        seen.setdefault(candidate, 1)
        unique.append(candidate)
    return unique


def _finite(value: Any) -> Any:
    """NaN and the infinities, which JSON has no words for, as null (in lists, structs and
    maps too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def _csv(result: Result, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if value is None else _text(value) for value in row])


def _table(result: Result, out: TextIO) -> None:
    cells = [[_cell(value) for value in row] for row in result.rows]
    numeric = [all(_is_number(row[i]) for row in result.rows if row[i] is not None)
               for i in range(len(result.columns))]
    widths = [max([len(name)] + [len(row[i]) for row in cells])
              for i, name in enumerate(result.columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    if result.columns:
        out.write(line(result.columns) + "\n")
        out.write(line(["-" * width for width in widths]) + "\n")
    for row in cells:
        out.write(line(row) + "\n")
    out.write(f"({len(cells)} row{'' if len(cells) == 1 else 's'})\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    text = "NULL" if value is None else _text(value).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 1] + "…"


def _text(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_plain)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _decoded(value: Any) -> Any:
    """A ``JSON`` column's text as the value it holds."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _plain(value: Any) -> Any:
    """What JSON cannot hold as it is: times as ISO 8601, decimals as numbers."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)
