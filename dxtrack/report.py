"""The run report of ``dxtrack report``: what one run of a context recorded, its errors in
groups, and what went missing or dropped since the run before.

This module owns the questions the report asks of the DuckDB views ``metric`` and ``error``
(:mod:`dxtrack.query`), the :class:`Report` they answer, and its text and JSON forms; the HTML
page is :mod:`dxtrack.report_html`, the error groups' rule :mod:`dxtrack.fingerprint`. Every
aggregation runs in DuckDB; only the distinct tracebacks of the run come into Python.
docs/report.md describes the report and its rules.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .fingerprint import fingerprint

if TYPE_CHECKING:
    import duckdb

__all__ = ["DEFAULT_DROP", "DEFAULT_RUNS", "Completeness", "ErrorGroup", "Gap", "MetricSummary",
           "NothingToReport", "Report", "Run", "build", "gap_cells", "metric_cells",
           "number_text", "parse_drop"]

#: A combination's sum may fall by this fraction before the report calls it dropped.
DEFAULT_DROP = 0.5
#: How many recent runs the history (the HTML page's charts) covers, this one included.
DEFAULT_RUNS = 10
_WINDOW = "dxtrack_report_window"  # a temporary table: the window's metric records, read once


class NothingToReport(LookupError):
    """There are no records at all to report on."""


@dataclass(frozen=True)
class Run:
    """One run of the context: its first and last record and how many of each kind."""

    run_id: str
    first: dt.datetime
    last: dt.datetime
    metrics: int
    errors: int


@dataclass(frozen=True)
class MetricSummary:
    """The records of one metric name in the run; ``last`` is the value recorded last."""

    name: str
    count: int
    sum: float
    min: float
    max: float
    last: float


@dataclass(frozen=True)
class ErrorGroup:
    """Errors of the run with one fingerprint; the example is the first of them."""

    fingerprint: str
    type: str
    value: str
    count: int
    first_seen: dt.datetime
    last_seen: dt.datetime
    example_id: str
    traceback: str
    frames: str  # the normalised text the fingerprint hashes


@dataclass(frozen=True)
class Gap:
    """A combination of a metric's name and metadata that went missing (``now`` is None) or
    whose sum fell by more than the drop allowed."""

    metric_name: str
    metadata: Dict[str, Any]
    before: float
    now: Optional[float]

    @property
    def kind(self) -> str:
        return "missing" if self.now is None else "dropped"

    @property
    def change(self) -> Optional[float]:
        """The relative change of the sum (-0.6 for a fall by 60%), if it can be said."""
        if self.now is None or not self.before:
            return None
        return (self.now - self.before) / abs(self.before)


@dataclass(frozen=True)
class Completeness:
    """This run against the previous one: ``by`` names the metadata keys each metric of the
    previous run was grouped by; ``compared`` counts the combinations compared."""

    previous: Optional[Run]
    drop: float
    by: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    by_option: Optional[Tuple[str, ...]] = None
    compared: int = 0
    gaps: Tuple[Gap, ...] = ()

    @property
    def missing(self) -> List[Gap]:
        return [gap for gap in self.gaps if gap.kind == "missing"]

    @property
    def dropped(self) -> List[Gap]:
        return [gap for gap in self.gaps if gap.kind == "dropped"]


@dataclass(frozen=True)
class Report:
    """The report of one run; ``history`` is the recent runs, oldest first, this one last, and
    ``sums`` each metric's sum per run of the history (None: not recorded in that run)."""

    context: str
    run: Run
    metrics: Tuple[MetricSummary, ...]
    errors: Tuple[ErrorGroup, ...]
    completeness: Completeness
    history: Tuple[Run, ...]
    sums: Dict[str, Tuple[Optional[float], ...]]

    @property
    def failed(self) -> bool:
        """Something went missing or dropped: ``dxtrack report`` exits with status 1."""
        return bool(self.completeness.gaps)

    def to_dict(self) -> Dict[str, Any]:
        """The report as JSON-ready data (``--format json``); times are ISO 8601, UTC."""
        done = self.completeness
        return {
            "context": self.context,
            "run": _run_dict(self.run),
            "metrics": [vars(m) for m in self.metrics],
            "errors": [{**{k: v for k, v in vars(g).items() if k != "frames"},
                        "first_seen": _iso(g.first_seen), "last_seen": _iso(g.last_seen)}
                       for g in self.errors],
            "completeness": {
                "previous_run": done.previous and _run_dict(done.previous),
                "drop": done.drop,
                "by": {name: list(keys) for name, keys in done.by.items()},
                "compared": done.compared,
                "missing": [_gap_dict(g) for g in done.missing],
                "dropped": [_gap_dict(g) for g in done.dropped],
            },
            "history": [{"run_id": run.run_id, "last": _iso(run.last)} for run in self.history],
            "sums": {name: list(sums) for name, sums in self.sums.items()},
            "failed": self.failed,
        }

    def text(self) -> str:
        """The report as aligned plain-text sections, for a terminal or a cron mail."""
        run = self.run
        lines = [f"dxtrack report: context {self.context!r}, run {run.run_id!r}",
                 f"  {_when(run.first)} to {_when(run.last)}, "
                 f"{_count(run.metrics, 'metric record')}, {_count(run.errors, 'error')}", ""]
        lines.append(f"Metrics ({_count(len(self.metrics), 'name')})")
        lines += _table(METRIC_HEADER, [metric_cells(m) for m in self.metrics]) or ["  none"]
        lines += ["", f"Errors ({_count(sum(g.count for g in self.errors), 'error')} in "
                      f"{_count(len(self.errors), 'group')})"]
        lines += _table(["fingerprint", "count", "first seen", "last seen", "example id",
                         "error"],
                        [[g.fingerprint, f"{g.count:,}", _when(g.first_seen), _when(g.last_seen),
                          g.example_id[:12], _one_line(f"{g.type}: {g.value}", 60)]
                         for g in self.errors]) or ["  none"]
        lines += ["", *self._completeness_text()]
        return "\n".join(lines) + "\n"

    def _completeness_text(self) -> List[str]:
        done = self.completeness
        if done.previous is None:
            return ["Completeness: no previous run of this context to compare with"]
        lines = [f"Completeness against run {done.previous.run_id!r} (ended "
                 f"{_when(done.previous.last)}): {_count(done.compared, 'combination')} "
                 f"compared, {len(done.missing)} missing, {len(done.dropped)} dropped by more "
                 f"than {done.drop:.0%}"]
        if done.by_option is not None:
            lines.append(f"  grouped by --by {','.join(done.by_option)}")
        else:
            lines += [f"  {name} by {', '.join(keys) or '(name only)'}"
                      for name, keys in done.by.items()]
        lines += _table(GAP_HEADER, [gap_cells(g) for g in done.gaps])
        return lines


def build(con: duckdb.DuckDBPyConnection, context: Optional[str] = None,
          run_id: Optional[str] = None, drop: float = DEFAULT_DROP,
          by: Optional[Sequence[str]] = None, runs: int = DEFAULT_RUNS) -> Report:
    """The report of ``run_id`` (default: the latest run) of ``context`` (default: the only
    context there is) over a connection with the views ``metric`` and ``error``.

    Raises :class:`NothingToReport` when there are no records, and ``ValueError`` naming the
    choices when the context is not given and there are several, or is not there, or the run
    is not a run of that context. ``by`` names the metadata keys every metric is grouped by
    for completeness, instead of each metric's own (docs/report.md).
    """
    if not 0 <= drop <= 1:
        raise ValueError(f"drop must be a fraction between 0 and 1, not {drop!r}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs!r}")
    runs_of = _runs(con)
    context = _context(list(runs_of), context)
    all_runs = runs_of[context]
    if run_id is None:
        run = all_runs[-1]
    else:
        known = {r.run_id: r for r in all_runs}
        if run_id not in known:
            raise ValueError(f"context {context!r} has no run {run_id!r}; the latest runs: "
                             + ", ".join(repr(r.run_id) for r in all_runs[-5:][::-1]))
        run = known[run_id]
    position = all_runs.index(run)
    previous = all_runs[position - 1] if position else None
    history = tuple(all_runs[max(0, position + 1 - runs):position + 1])
    ids = [r.run_id for r in history]
    read = ids + [previous.run_id] if previous and previous not in history else ids
    # Firehose delivers at least once: a record that landed twice (the same id) counts once.
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_WINDOW} AS SELECT DISTINCT ON (id) "
                f"metric_name, run_id, value, metadata, \"timestamp\" FROM metric "
                f"WHERE context = ? AND run_id IN (SELECT unnest(?::VARCHAR[]))", [context, read])
    try:
        # The runs' metric counts without duplicates (cheaper here than over every run).
        counted = dict(con.execute(f"SELECT run_id, count(*) FROM {_WINDOW} GROUP BY run_id")
                       .fetchall())
        run = replace(run, metrics=counted.get(run.run_id, 0))
        if previous is not None:
            previous = replace(previous, metrics=counted.get(previous.run_id, 0))
        history = tuple(replace(r, metrics=counted.get(r.run_id, 0)) for r in history)
        return Report(
            context=context, run=run, metrics=_metrics(con, run.run_id),
            errors=_errors(con, context, run.run_id),
            completeness=_completeness(con, run, previous, drop, by),
            history=history, sums=_sums(con, ids),
        )
    finally:
        con.execute(f"DROP TABLE IF EXISTS {_WINDOW}")


def parse_drop(text: str) -> float:
    """``--drop``: ``50%`` and ``50`` are 50 percent, ``0.5`` is the same as a fraction (a
    number without ``%`` is a fraction below 1, a percentage from 1 on: ``1`` is 1%)."""
    number = text.strip()
    percent = number.endswith("%")
    try:
        value = float(number.rstrip("%").strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage (50%, 50 or 0.5)") from None
    if percent or value >= 1:
        value /= 100
    if not 0 <= value <= 1:
        raise ValueError(f"{text!r} is not between 0% and 100%")
    return value


def _context(contexts: List[str], context: Optional[str]) -> str:
    if not contexts:
        raise NothingToReport("there are no records to report on")
    if context is None and len(contexts) == 1:
        return str(contexts[0])
    if context is not None and context in contexts:
        return context
    listed = ", ".join(repr(c) for c in contexts)
    if context is None:
        raise ValueError(f"there are records of {len(contexts)} contexts; name one with "
                         f"--context: {listed}")
    raise ValueError(f"there are no records of context {context!r}; the contexts: {listed}")


def _runs(con: Any) -> Dict[str, List[Run]]:
    """The runs of each context (sorted by name), ordered by their last record (the latest
    last): one pass over each view."""
    rows = con.execute(
        "SELECT context, run_id, min(first), max(last), sum(metrics), sum(errors) FROM ("
        " SELECT context, run_id, min(\"timestamp\") AS first, max(\"timestamp\") AS last,"
        "  count(*) AS metrics, 0 AS errors FROM metric GROUP BY ALL"
        " UNION ALL SELECT context, run_id, min(\"timestamp\"), max(\"timestamp\"), 0,"
        "  count(DISTINCT id) FROM error GROUP BY ALL) WHERE context IS NOT NULL "
        "GROUP BY context, run_id ORDER BY context, max(last), run_id").fetchall()
    found: Dict[str, List[Run]] = {}
    for context, *run in rows:
        found.setdefault(str(context), []).append(
            Run(str(run[0]), run[1], run[2], int(run[3]), int(run[4])))
    return found


def _metrics(con: Any, run_id: str) -> Tuple[MetricSummary, ...]:
    rows = con.execute(
        f"SELECT metric_name, count(*), sum(value), min(value), max(value), "
        f"arg_max(value, \"timestamp\") FROM {_WINDOW} WHERE run_id = ? "
        f"GROUP BY metric_name ORDER BY metric_name", [run_id]).fetchall()
    return tuple(MetricSummary(str(r[0]), int(r[1]), *(float(x) for x in r[2:])) for r in rows)


def _sums(con: Any, run_ids: List[str]) -> Dict[str, Tuple[Optional[float], ...]]:
    rows = con.execute(f"SELECT metric_name, run_id, sum(value) FROM {_WINDOW} "
                       f"WHERE run_id IN (SELECT unnest(?::VARCHAR[])) "
                       f"GROUP BY ALL ORDER BY metric_name", [run_ids]).fetchall()
    found: Dict[str, Dict[str, float]] = {}
    for name, run_id, total in rows:
        found.setdefault(str(name), {})[run_id] = float(total)
    return {name: tuple(per_run.get(r) for r in run_ids) for name, per_run in found.items()}


def _errors(con: Any, context: str, run_id: str) -> Tuple[ErrorGroup, ...]:
    """The run's errors grouped in SQL by type and traceback (and by value for errors with
    no frames, whose fingerprint needs it), then merged by fingerprint."""
    rows = con.execute(
        "SELECT exception.type, exception.traceback, "
        " CASE WHEN coalesce(exception.traceback, '') NOT LIKE '%File \"%' "
        "  THEN exception.value END AS frameless_value, "
        " count(DISTINCT id), min(\"timestamp\"), max(\"timestamp\"), arg_min(id, \"timestamp\"), "
        " arg_min(exception.value, \"timestamp\") "
        "FROM error WHERE context = ? AND run_id = ? GROUP BY ALL", [context, run_id]).fetchall()
    groups: Dict[str, ErrorGroup] = {}
    for type_, traceback, _, count, first, last, example_id, value in rows:
        mark = fingerprint(type_, value, traceback)
        group = ErrorGroup(str(mark), type_ or "", value or "", int(count), first, last,
                           example_id or "", traceback or "", mark.key)
        known = groups.get(mark)
        if known is not None:
            example = known if known.first_seen <= first else group
            group = ErrorGroup(
                example.fingerprint, example.type, example.value, known.count + group.count,
                min(known.first_seen, first), max(known.last_seen, last), example.example_id,
                example.traceback, example.frames)
        groups[mark] = group
    return tuple(sorted(groups.values(), key=lambda g: (-g.count, g.first_seen)))


def _completeness(con: Any, run: Run, previous: Optional[Run], drop: float,
                  by: Optional[Sequence[str]]) -> Completeness:
    if previous is None:
        return Completeness(previous=None, drop=drop)
    names = [row[0] for row in con.execute(
        f"SELECT DISTINCT metric_name FROM {_WINDOW} WHERE run_id = ? ORDER BY 1",
        [previous.run_id]).fetchall()]
    if by is not None:
        keys = {name: tuple(by) for name in names}
    else:
        keys = {name: () for name in names}
        keys.update(_grouping_keys(con, previous.run_id, run.run_id))
    combination = "CASE metric_name " + " ".join(
        f"WHEN {_literal(name)} THEN " + (
            "json_object(" + ", ".join(f"{_literal(k)}, metadata -> {_literal(_path(k))}"
                                       for k in chosen) + ")" if chosen else "'{}'::JSON")
        for name, chosen in keys.items()) + " END" if keys else "'{}'::JSON"
    rows = con.execute(
        f"SELECT metric_name, combination, before, now, compared FROM ("
        f" SELECT metric_name, combination, count(*) OVER () AS compared,"
        f"  sum(value) FILTER (WHERE run_id = $previous) AS before,"
        f"  sum(value) FILTER (WHERE run_id = $run) AS now,"
        f"  count(*) FILTER (WHERE run_id = $run) AS records_now"
        f" FROM (SELECT metric_name, run_id, value, ({combination})::VARCHAR AS combination"
        f"       FROM {_WINDOW} WHERE run_id IN ($previous, $run))"
        f" GROUP BY ALL HAVING count(*) FILTER (WHERE run_id = $previous) > 0)"
        f"WHERE records_now = 0 OR (before > 0 AND now < before * (1 - $drop)) "
        f"ORDER BY records_now > 0, metric_name, combination",
        {"previous": previous.run_id, "run": run.run_id, "drop": drop}).fetchall()
    compared = rows[0][4] if rows else con.execute(
        f"SELECT count(DISTINCT (metric_name, ({combination})::VARCHAR)) FROM {_WINDOW} "
        f"WHERE run_id = ?", [previous.run_id]).fetchone()[0]
    gaps = tuple(Gap(str(name), json.loads(combo), float(before),
                     None if now is None else float(now))
                 for name, combo, before, now, _ in rows)
    return Completeness(previous=previous, drop=drop, by=keys,
                        by_option=None if by is None else tuple(by), compared=int(compared),
                        gaps=gaps)


def _grouping_keys(con: Any, previous: str, run: str) -> Dict[str, Tuple[str, ...]]:
    """Each metric's own grouping keys: those with a text (or true/false) value in every
    record of the metric in the previous run, and whose values recur: at least half of the
    values this run recorded were recorded by an earlier run too (a shop does; a URL or a
    request id, new every time, does not). Judged on this run's values, a shop that stopped
    reporting cannot make its own key look like a per-record one. A metric this run did not
    record at all is compared as a whole."""
    rows = con.execute(
        f"WITH pairs AS ("
        f" SELECT metric_name, run_id, key, json_type(metadata, path) AS type,"
        f"  json_extract(metadata, path)::VARCHAR AS value"
        f" FROM (SELECT *, '$.' || to_json(key)::VARCHAR AS path"
        f"       FROM {_WINDOW}, unnest(json_keys(metadata)) AS keys(key))"
        f"), present AS ("
        f" SELECT metric_name, key, count(*) AS n FROM pairs"
        f" WHERE run_id = $previous AND type IN ('VARCHAR', 'BOOLEAN') GROUP BY ALL"
        f"), records_before AS ("
        f" SELECT metric_name, count(*) AS n FROM {_WINDOW} WHERE run_id = $previous GROUP BY ALL"
        f"), now AS (SELECT DISTINCT metric_name, key, value FROM pairs WHERE run_id = $run"
        f"), earlier AS (SELECT DISTINCT metric_name, key, value FROM pairs WHERE run_id <> $run"
        f"), recurring AS ("
        f" SELECT now.metric_name, now.key, count(*) AS values_now,"
        f"  count(earlier.value) AS seen_before FROM now LEFT JOIN earlier"
        f"  ON earlier.metric_name = now.metric_name AND earlier.key = now.key"
        f"  AND earlier.value = now.value GROUP BY ALL"
        f")"
        f"SELECT metric_name, list(key ORDER BY key) FROM present"
        f" JOIN records_before USING (metric_name) JOIN recurring USING (metric_name, key)"
        f" WHERE present.n = records_before.n AND 2 * seen_before >= values_now"
        f" GROUP BY metric_name", {"previous": previous, "run": run}).fetchall()
    return {str(name): tuple(chosen) for name, chosen in rows}


def _path(key: str) -> str:
    return "$." + json.dumps(key, ensure_ascii=False)  # DuckDB's paths take no \u escapes


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _run_dict(run: Run) -> Dict[str, Any]:
    return {"run_id": run.run_id, "first": _iso(run.first), "last": _iso(run.last),
            "metrics": run.metrics, "errors": run.errors}


def _gap_dict(gap: Gap) -> Dict[str, Any]:
    return {"metric_name": gap.metric_name, "metadata": gap.metadata, "before": gap.before,
            "now": gap.now, "change": gap.change}


def _iso(when: dt.datetime) -> str:
    return when.isoformat() + "Z"


def _when(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def number_text(value: float) -> str:
    """A number as the report shows it: whole numbers with thousands separators."""
    return f"{value:,.0f}" if value == int(value) and abs(value) < 1e15 else f"{value:,.6g}"


def _one_line(text: str, width: int) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= width else flat[:width - 3] + "..."


#: The columns of the metrics table, and of the missing and dropped combinations.
METRIC_HEADER = ["name", "count", "sum", "min", "max", "last"]
GAP_HEADER = ["", "metric", "metadata", "before", "now", "change"]


def metric_cells(metric: MetricSummary) -> List[str]:
    """A row of the metrics table, as text."""
    return [metric.name, f"{metric.count:,}", *map(number_text, (metric.sum, metric.min,
                                                                  metric.max, metric.last))]


def gap_cells(gap: Gap) -> List[str]:
    """A row of the missing and dropped combinations, as text."""
    return [gap.kind, gap.metric_name, _metadata_text(gap.metadata), number_text(gap.before),
            "-" if gap.now is None else number_text(gap.now),
            "" if gap.change is None else f"{gap.change:+.0%}"]


def _metadata_text(metadata: Dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in metadata.items()) or "(all)"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    """Rows under a header, two spaces in from the margin; text columns to the left,
    numbers to the right. No rows, no table."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = [all(_NUMERIC.match(row[i]) for row in rows) for i in range(len(header))]
    return ["  " + "  ".join(cell.rjust(w) if num else cell.ljust(w)
                             for cell, w, num in zip(row, widths, numeric)).rstrip()
            for row in [header, *rows]]


_NUMERIC = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?%?$|^-$")
