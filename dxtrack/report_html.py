"""The report as one self-contained HTML page (``dxtrack report --html FILE``).

This module owns the page: a chart per metric of its sum over the recent runs, drawn by
matplotlib as inline SVG, the error groups with their tracebacks folded, and the
completeness table. The page loads nothing: no script, no link, no font; its
Content-Security-Policy forbids anything else, and every piece of record text is escaped.

matplotlib is an optional extra (``pip install 'dxtrack[report]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import re
import tempfile
from typing import Any, List, Optional, Sequence

from .report import GAP_HEADER, METRIC_HEADER, Report, gap_cells, metric_cells

__all__ = ["chart_svg", "need_matplotlib", "page", "write"]

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .2em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td { white-space: nowrap; } td.wrap { white-space: normal; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-weight: 600; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b5e20; font-weight: 600; }
code { font-size: .95em; }
"""
# Inline styles and the SVG's own data; nothing may be fetched, nothing may run.
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_SVG_START = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_THIS_RUN, _OTHER_RUNS = "#1f5fa8", "#a9c1de"


def need_matplotlib() -> Any:
    """Import matplotlib's Figure, or raise an ImportError saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("report --html needs matplotlib: pip install 'dxtrack[report]'"
                          ) from None
    return Figure


def write(report: Report, path: str) -> None:
    """Write the page to ``path`` (UTF-8); it replaces whatever the path held only once it
    is whole."""
    text = page(report)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, partial = tempfile.mkstemp(dir=directory, prefix=".dxtrack-report-",
                                           suffix=".partial")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(partial, 0o644)  # as a page written with open() would be, not mkstemp's 0600
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def page(report: Report) -> str:
    """The whole page, as text."""
    run = report.run
    title = f"dxtrack report: {report.context} / {run.run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(_time(run.first))} to {_e(_time(run.last))}: {run.metrics:,} metric records, "
        f"{run.errors:,} errors. {_status(report)}</p>",
        *_completeness(report), *_metrics(report), *_errors(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def chart_svg(name: str, runs: Sequence[str], sums: Sequence[Optional[float]]) -> str:
    """A bar chart of a metric's sum per run, the last run highlighted, as an ``<svg>``
    element (matplotlib escapes the text it writes)."""
    Figure = need_matplotlib()
    figure = Figure(figsize=(5.2, 2.4), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(runs)))
    axes.bar(positions, [0.0 if s is None else s for s in sums],
             color=[_OTHER_RUNS] * (len(runs) - 1) + [_THIS_RUN])
    axes.set_xticks(positions, [_cut(r) for r in runs], rotation=30, ha="right",
                    fontsize=7)
    axes.set_ylabel("sum per run", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    for text in axes.get_xticklabels():
        text.set_parse_math(False)  # a '$' in a name is text, not mathtext
    axes.spines[["top", "right"]].set_visible(False)
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    return _SVG_START.sub("", out.getvalue(), count=1)


def _status(report: Report) -> str:
    done = report.completeness
    if done.previous is None:
        return "No previous run to compare with."
    if report.failed:
        return (f'<span class="bad">{len(done.missing)} missing, {len(done.dropped)} dropped '
                f"since run {_e(done.previous.run_id)}.</span>")
    return f'<span class="ok">Complete against run {_e(done.previous.run_id)}.</span>'


def _completeness(report: Report) -> List[str]:
    done = report.completeness
    parts = ["<h2>Completeness</h2>"]
    if done.previous is None:
        return [*parts, "<p>No previous run of this context to compare with.</p>"]
    parts.append(f"<p>Against run <code>{_e(done.previous.run_id)}</code>: "
                 f"{done.compared:,} combinations of metric and metadata compared; a sum that "
                 f"fell by more than {done.drop:.0%} counts as dropped.</p>")
    grouping = [[name, ", ".join(keys) or "(name only)"] for name, keys in done.by.items()]
    parts.append(_table(["metric", "grouped by"], grouping))
    if done.gaps:
        parts.append(_table(GAP_HEADER, [gap_cells(gap) for gap in done.gaps],
                            numeric=(3, 4, 5)))
    else:
        parts.append('<p class="ok">Nothing missing or dropped.</p>')
    return parts


def _metrics(report: Report) -> List[str]:
    parts = ["<h2>Metrics</h2>"]
    if not report.metrics:
        parts.append("<p>No metrics in this run.</p>")
    else:
        parts.append(_table(METRIC_HEADER, [metric_cells(m) for m in report.metrics],
                            numeric=(1, 2, 3, 4, 5)))
    runs = [run.run_id for run in report.history]
    if report.sums:
        parts.append(f"<p>Sum per run over the last {len(runs)} runs (this run darker).</p>")
        parts.append('<div class="charts">')
        for name, sums in report.sums.items():
            parts.append(f"<figure><figcaption>{_e(name)}</figcaption>"
                         f"{chart_svg(name, runs, sums)}</figure>")
        parts.append("</div>")
    return parts


def _errors(report: Report) -> List[str]:
    count = sum(g.count for g in report.errors)
    parts = [f"<h2>Errors ({count:,} in {len(report.errors)} "
             f"group{'' if len(report.errors) == 1 else 's'})</h2>"]
    if not report.errors:
        return [*parts, "<p>No errors in this run.</p>"]
    parts.append(_table(
        ["fingerprint", "count", "first seen", "last seen", "type", "value", "example id"],
        [[g.fingerprint, f"{g.count:,}", _time(g.first_seen), _time(g.last_seen), g.type,
          _cut(g.value, 120), g.example_id[:12]] for g in report.errors], numeric=(1,)))
    for group in report.errors:
        parts.append(f"<details><summary><code>{_e(group.fingerprint)}</code> "
                     f"{_e(group.type)}: {_e(_cut(group.value, 120))} ({group.count:,})</summary>"
                     f"<p>Fingerprinted on:</p><pre>{_e(group.frames)}</pre>"
                     f"<p>Traceback of example {_e(group.example_id)}:</p>"
                     f"<pre>{_e(group.traceback)}</pre></details>")
    return parts


def _table(header: List[str], rows: List[List[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _time(when: Any) -> str:
    return str(when.strftime("%Y-%m-%d %H:%M:%S")) + "Z"


def _cut(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
