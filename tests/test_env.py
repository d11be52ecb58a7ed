"""DXTRACK_<OPTION> environment variables as defaults for configure()."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from dxtrack import ConfigurationError, DXTrack
from dxtrack.env import ENV_OPTIONS, variable_for

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"DXTRACK_STAGE": "test", "DXTRACK_CONTEXT": "env-job", "DXTRACK_RUN_ID": "run-7"}


@pytest.fixture
def client() -> Any:
    made = DXTrack()
    yield made
    made.close(timeout=1)


def setenv(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


class TestDefaultsFromTheEnvironment:
    """Variables fill in what configure() is not given; arguments win."""

    def test_required_labels_from_the_environment_alone(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_OUTPUT_DIR=str(tmp_path))
        config = client.configure()
        assert (config.stage, config.context, config.run_id) == ("test", "env-job", "run-7")
        client.metric("rows", 1)
        assert (tmp_path / "metric.jsonl").read_bytes().count(b"env-job") == 1

    def test_arguments_win_over_variables(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_ON_FULL="block", DXTRACK_FLUSH_INTERVAL="9")
        config = client.configure(context="from-code", on_full="drop_oldest")
        assert (config.context, config.on_full) == ("from-code", "drop_oldest")
        assert (config.run_id, config.flush_interval) == ("run-7", 9.0)

    def test_none_means_not_given(self, client: DXTrack, monkeypatch: pytest.MonkeyPatch) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_USE_ASYNC_REQUESTS="yes")
        assert client.configure(use_async_requests=None).use_async_requests is True
        monkeypatch.delenv("DXTRACK_USE_ASYNC_REQUESTS")
        assert client.configure(use_async_requests=None).use_async_requests is False

    def test_an_empty_variable_counts_as_unset(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_REGION_NAME="", DXTRACK_MAX_BUFFER_RECORDS="")
        config = client.configure()
        assert config.region_name is None and config.max_buffer_records == 100_000

    @pytest.mark.parametrize(
        ("variable", "text", "option", "expected"),
        [
            ("DXTRACK_BUFFER_METRICS", "true", "buffer_metrics", True),
            ("DXTRACK_BUFFER_METRICS", "Off", "buffer_metrics", False),
            ("DXTRACK_PACK_RECORDS", "0", "pack_records", False),
            ("DXTRACK_CAPTURE_UNHANDLED", "1", "capture_unhandled", True),
            ("DXTRACK_MAX_BUFFER_RECORDS", "1_000", "max_buffer_records", 1000),
            ("DXTRACK_MAX_BUFFER_BYTES", "2000000", "max_buffer_bytes", 2_000_000),
            ("DXTRACK_FLUSH_INTERVAL", "2.5", "flush_interval", 2.5),
            ("DXTRACK_SHUTDOWN_TIMEOUT", "0", "shutdown_timeout", 0.0),
            ("DXTRACK_DEFAULT_METADATA", '{"host": "w3", "n": 2}', "default_metadata",
             {"host": "w3", "n": 2}),
            ("DXTRACK_TIMESTAMP_FORMAT", "datetime", "timestamp_format", "datetime"),
            ("DXTRACK_ENDPOINT_URL", "http://127.0.0.1:4566", "endpoint_url",
             "http://127.0.0.1:4566"),
            ("DXTRACK_METRIC_STREAM", "custom-metrics", "metric_stream", "custom-metrics"),
            ("DXTRACK_PAPERTRAIL_HOSTPORT", "logs.example.com:514", "papertrail_hostport",
             "logs.example.com:514"),
        ],
    )
    def test_each_kind_of_value_parses(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch, variable: str, text: str,
        option: str, expected: Any,
    ) -> None:
        setenv(monkeypatch, **LABELS, **{variable: text})
        assert getattr(client.configure(), option) == expected

    def test_secrets_are_never_read_from_dxtrack_variables(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_AWS_SECRET_ACCESS_KEY="s3cr3t",
               DXTRACK_AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            config = client.configure()
        assert config.aws_secret_access_key is None and config.aws_access_key_id is None
        assert "DXTRACK_AWS_SECRET_ACCESS_KEY is ignored: credentials" in caplog.text
        assert "s3cr3t" not in caplog.text

    def test_a_misspelt_variable_is_reported(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_BUFER_METRICS="1")
        with caplog.at_level(logging.WARNING, logger="dxtrack"):
            client.configure()
        assert "DXTRACK_BUFER_METRICS names no dxtrack option" in caplog.text


class TestBadValues:
    """A bad variable is a ValueError that names the variable."""

    @pytest.mark.parametrize(
        ("variable", "text", "says"),
        [
            ("DXTRACK_BUFFER_METRICS", "maybe", "must be one of 1/true"),
            ("DXTRACK_MAX_BUFFER_RECORDS", "lots", "must be a whole number"),
            ("DXTRACK_MAX_BUFFER_RECORDS", "0", "max_buffer_records must be a whole number"),
            ("DXTRACK_FLUSH_INTERVAL", "soon", "must be a number of seconds"),
            ("DXTRACK_FLUSH_INTERVAL", "-1", "flush_interval must be a number of seconds >= 0"),
            ("DXTRACK_STAGE", "staging", "stage must be one of"),
            ("DXTRACK_DEFAULT_METADATA", "[1, 2]", "must be a JSON object, got a JSON list"),
            ("DXTRACK_DEFAULT_METADATA", "{host: w3}", "must be a JSON object"),
            ("DXTRACK_PAPERTRAIL_HOSTPORT", "logs.example.com", "must look like 'host:port'"),
            ("DXTRACK_ON_FULL", "wait", "on_full must be one of"),
        ],
    )
    def test_the_message_names_the_variable(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch, variable: str, text: str,
        says: str,
    ) -> None:
        setenv(monkeypatch, **{**LABELS, variable: text})
        with pytest.raises(ConfigurationError) as info:
            client.configure()
        message = str(info.value)
        assert message.startswith(variable) and says in message
        assert isinstance(info.value, ValueError)
        assert client.config is None  # nothing half-applied

    def test_a_bad_argument_is_named_as_the_argument(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        setenv(monkeypatch, **LABELS, DXTRACK_FLUSH_INTERVAL="3")
        with pytest.raises(ConfigurationError, match=r"^flush_interval must"):
            client.configure(flush_interval=-2)

    def test_a_missing_label_names_argument_and_variable(
        self, client: DXTrack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        setenv(monkeypatch, DXTRACK_STAGE="test", DXTRACK_CONTEXT="job")
        with pytest.raises(TypeError, match="needs run_id: pass run_id=... or set DXTRACK_RUN_ID"):
            client.configure()


class TestDocumented:
    """The table of docs/environment.md lists every variable dxtrack reads."""

    def test_every_variable_is_in_the_docs_table(self) -> None:
        page = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
        missing = [variable_for(o) for o in ENV_OPTIONS if f"| `{variable_for(o)}`" not in page]
        assert not missing
        listed = re.findall(r"^\| `(DXTRACK_\w+)` \| `(\w+)` \|", page, flags=re.MULTILINE)
        assert sorted(listed) == sorted((variable_for(o), o) for o in ENV_OPTIONS)
