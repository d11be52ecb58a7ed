"""`make demo` works: the job's records all land once, through a pool of processes."""

from __future__ import annotations

import io
import re
import urllib.request
from typing import Any

import pytest

from dxtrack import demo


class TestDemo:
    """The demo reports every record landed exactly once, in both stages."""

    @pytest.mark.parametrize("stage", ["dev", "test"])
    def test_demo_run_lands_everything(
        self, stage: str, monkeypatch: pytest.MonkeyPatch, moto_url: str, tmp_path: Any
    ) -> None:
        # moto keeps its state per process: the demo's own server would see other tests' streams.
        reset = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()
        # The demo sets these for its workers; let the test undo it.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unset")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unset")
        out = io.StringIO()
        html = tmp_path / "demo" / "report.html"
        assert demo.run(stage=stage, shops=6, pages=40, workers=2, out=out, html=str(html))
        report = out.getvalue()
        assert "every record landed exactly once" in report
        # The earlier run: 6 shops x (4 pages + 2 summary metrics); this run: 5 of them
        # x (40 + 2), the sixth refusing the scraper. All of them found.
        assert re.search(r"metrics emitted / found\s+246 / 246\n", report)
        # It ends with the report of its run, read back from where the records landed, which
        # names the shop that stopped reporting, and the path of the HTML page.
        tail = report[report.index("$ dxtrack report"):]
        assert re.search(r"missing\s+scrape\.products\s+host=demo shop=shop-001\s", tail)
        assert "PermissionError: shop-001: 403 Forbidden" in tail
        assert tail.rstrip().endswith(f"HTML report: {html}")
        assert "<svg" in html.read_text()
