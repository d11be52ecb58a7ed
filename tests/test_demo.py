"""`make demo` works: the job's records all land once, through a pool of processes."""

from __future__ import annotations

import io
import re
import urllib.request

import pytest

from dxtrack import demo


class TestDemo:
    """The demo reports every record landed exactly once, in both stages."""

    @pytest.mark.parametrize("stage", ["dev", "test"])
    def test_demo_run_lands_everything(
        self, stage: str, monkeypatch: pytest.MonkeyPatch, moto_url: str
    ) -> None:
        # moto keeps its state per process: the demo's own server would see other tests' streams.
        reset = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()
        # The demo sets these for its workers; let the test undo it.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unset")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unset")
        out = io.StringIO()
        assert demo.run(stage=stage, shops=6, pages=40, workers=2, out=out)
        report = out.getvalue()
        assert "every record landed exactly once" in report
        # 6 shops x (40 pages + 2 summary metrics), all of them found
        assert re.search(r"metrics emitted / found\s+252 / 252\n", report)
