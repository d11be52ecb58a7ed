"""configure() and Config: validation, defaults, snapshots, and a repr without secrets."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict

import pytest

from dxtrack import Config, ConfigurationError, DXTrack, DXTrackError, MemorySink
from dxtrack.config import DEFAULT_REGION, OPTIONS

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = dict(stage="test", context="tests", run_id="run-1")
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLETOKENdxtrack0123456789"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def config(**options: Any) -> Config:
    return Config(**{**REQUIRED, **options})


class TestConfigureAcceptsTheDocumentedOptions:
    """Every option of the issue is accepted by keyword, with the documented default."""

    def test_defaults(self) -> None:
        c = config()
        assert (c.stage, c.context, c.run_id) == ("test", "tests", "run-1")
        assert c.default_metadata == {}
        assert c.profile_name is None
        assert c.aws_access_key_id is None and c.aws_secret_access_key is None
        assert c.buffer_metrics is False
        assert c.papertrail_hostport is None
        assert c.use_async_requests is False
        assert c.region_name is None and DEFAULT_REGION == "eu-west-1"
        assert c.endpoint_url is None
        assert c.timestamp_format == "unix"
        assert c.output_dir == "./.dxtrack_output"
        assert c.test_output == "file"

    def test_all_options_at_once(self, tmp_path: Any) -> None:
        client = DXTrack()
        try:
            c = client.configure(
                stage="test",
                context="shop-scraper",
                run_id="2026-11-27",
                default_metadata={"host": "w3"},
                profile_name="datalake",
                aws_access_key_id=KEY_ID,
                aws_secret_access_key=SECRET,
                buffer_metrics=True,
                papertrail_hostport="logs5.papertrailapp.com:12345",
                use_async_requests=True,
                region_name="us-west-2",
                endpoint_url="http://127.0.0.1:5000",
                timestamp_format="datetime",
                output_dir=str(tmp_path),
                test_output="print",
            )
            assert client.config is c
            assert c.region_name == "us-west-2" and c.test_output == "print"
            assert c.default_metadata == {"host": "w3"}
        finally:
            client.close()

    @pytest.mark.parametrize("stage", ["test", "dev", "prod"])
    def test_each_stage(self, stage: str) -> None:
        assert config(stage=stage).stage == stage

    def test_output_dir_may_be_a_path(self, tmp_path: Any) -> None:
        assert config(output_dir=tmp_path).output_dir == tmp_path


BAD_OPTIONS = [
    ("stage", "staging"),
    ("stage", "TEST"),
    ("context", ""),
    ("context", "   "),
    ("context", 42),
    ("run_id", ""),
    ("run_id", 20261127),
    ("default_metadata", ["host", "w3"]),
    ("default_metadata", "host=w3"),
    ("profile_name", ""),
    ("endpoint_url", "localhost:4566"),
    ("endpoint_url", "http://"),
    ("region_name", "eu west 1"),
    ("profile_name", 3),
    ("buffer_metrics", "yes"),
    ("buffer_metrics", 1),
    ("papertrail_hostport", "logs5.papertrailapp.com"),
    ("papertrail_hostport", "logs5.papertrailapp.com:port"),
    ("papertrail_hostport", ":12345"),
    ("papertrail_hostport", 12345),
    ("region_name", ""),
    ("endpoint_url", ""),
    ("timestamp_format", "iso"),
    ("output_dir", ""),
    ("test_output", "stdout"),
]


class TestConfigureValidation:
    """A bad value is a ValueError (ConfigurationError) that names the argument."""

    @pytest.mark.parametrize(
        ("name", "value"), BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS]
    )
    def test_bad_value_names_the_argument(self, name: str, value: Any) -> None:
        with pytest.raises(ConfigurationError) as info:
            DXTrack().configure(**{**REQUIRED, name: value})
        assert str(info.value).startswith(name)
        assert isinstance(info.value, ValueError) and isinstance(info.value, DXTrackError)

    @pytest.mark.parametrize(
        "credentials",
        [dict(aws_access_key_id=KEY_ID), dict(aws_secret_access_key=SECRET)],
        ids=["id only", "secret only"],
    )
    def test_credentials_come_in_pairs(self, credentials: Dict[str, str]) -> None:
        with pytest.raises(ConfigurationError, match="aws_access_key_id and aws_secret_access_key"):
            config(**credentials)

    def test_a_failed_configure_leaves_the_client_unconfigured(self) -> None:
        client = DXTrack()
        with pytest.raises(ValueError):
            client.configure(stage="nope", context="tests", run_id="run-1")
        assert client.config is None and client.sink is None

    def test_unknown_keyword_is_a_type_error_naming_it(self) -> None:
        with pytest.raises(TypeError, match="buffer_metric\\b"):
            DXTrack().configure(**REQUIRED, buffer_metric=True)

    def test_arguments_are_keyword_only(self) -> None:
        with pytest.raises(TypeError):
            DXTrack().configure("test", "tests", "run-1")  # type: ignore[misc]

    @pytest.mark.parametrize("missing", ["stage", "context", "run_id"])
    def test_required_arguments(self, missing: str) -> None:
        options = {k: v for k, v in REQUIRED.items() if k != missing}
        with pytest.raises(TypeError, match=f"needs {missing}.*DXTRACK_{missing.upper()}"):
            DXTrack().configure(**options)
        with pytest.raises(TypeError, match=f"needs {missing}"):  # None is "not given"
            DXTrack().configure(**options, **{missing: None})


class TestConfigIsFrozen:
    """A Config never changes after it was validated."""

    def test_assignment_refused(self) -> None:
        c = config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.stage = "prod"  # type: ignore[misc]
        assert c.stage == "test"


class TestDefaultMetadataSnapshot:
    """default_metadata is copied at configure(): later changes to the given dict do nothing."""

    def test_top_level_and_nested_changes_do_not_leak(self) -> None:
        given = {"host": "w3", "shops": ["a"], "limits": {"pages": 5}}
        c = config(default_metadata=given)
        given["host"] = "w4"
        given["shops"].append("b")
        given["limits"]["pages"] = 6
        given["new"] = 1
        assert c.default_metadata == {"host": "w3", "shops": ["a"], "limits": {"pages": 5}}

    def test_none_means_empty(self) -> None:
        assert config(default_metadata=None).default_metadata == {}

    def test_keys_written_as_one_are_refused_at_configure(self) -> None:
        client = DXTrack()
        with pytest.raises(ConfigurationError, match="default_metadata: .*both written as '1'"):
            client.configure(stage="test", context="c", run_id="r",
                             default_metadata={1: "a", "1": "b"})
        assert client.config is None

    def test_values_that_cannot_be_copied_are_accepted(self) -> None:
        lock = threading.Lock()
        c = config(default_metadata={"lock": lock, "shops": ["a"]})
        assert c.default_metadata["lock"] is lock
        assert c.default_metadata["shops"] == ["a"]


class TestReprHidesSecrets:
    """The repr of a Config (and of a client) never shows a secret."""

    def make(self) -> Config:
        return config(
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            aws_session_token=SESSION_TOKEN,
            profile_name="datalake",
        )

    def test_config_repr(self) -> None:
        c = self.make()
        for text in (repr(c), str(c), f"{c}", f"{c!r}"):
            assert SECRET not in text and SESSION_TOKEN not in text
            assert KEY_ID not in text
        assert "aws_secret_access_key='***'" in repr(c)
        assert "aws_session_token='***'" in repr(c)
        assert "aws_access_key_id='***MPLE'" in repr(c)
        assert "profile_name='datalake'" in repr(c) and "context='tests'" in repr(c)

    def test_secret_fragments_never_shown(self) -> None:
        text = repr(self.make())
        for start in range(len(SECRET) - 6):
            assert SECRET[start : start + 6] not in text

    def test_client_repr(self) -> None:
        client = DXTrack()
        try:
            client.configure(**REQUIRED, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
            assert SECRET not in repr(client) and "'***'" in repr(client)
        finally:
            client.close()
        assert repr(DXTrack()) == "DXTrack(not configured)"

    @pytest.mark.parametrize("name", ["aws_secret_access_key", "aws_session_token"])
    def test_error_messages_do_not_echo_a_badly_typed_secret(self, name: str) -> None:
        options: Dict[str, Any] = dict(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
        options[name] = SECRET.encode()
        with pytest.raises(ConfigurationError) as info:
            config(**options)
        assert str(info.value).startswith(name)
        assert SECRET not in str(info.value) and "bytes" in str(info.value)

    def test_unset_options_are_left_out(self) -> None:
        text = repr(config())
        assert text.startswith("Config(stage='test', context='tests', run_id='run-1', ")
        assert "aws_secret_access_key" not in text and "default_metadata" not in text


class TestProfileIsChecked:
    """A ``profile_name`` the AWS config files do not define is refused at configure().

    The autouse fixture of ``conftest.py`` points ``AWS_CONFIG_FILE`` and
    ``AWS_SHARED_CREDENTIALS_FILE`` at files of the test's own; this class
    writes them.
    """

    @pytest.fixture(autouse=True)
    def aws_files(self) -> None:
        with open(os.environ["AWS_SHARED_CREDENTIALS_FILE"], "w") as f:
            f.write("[datalake]\naws_access_key_id = profile-key\n"
                    "aws_secret_access_key = profile-secret\n")
        with open(os.environ["AWS_CONFIG_FILE"], "w") as f:
            f.write("[profile sso-only]\nregion = us-west-2\n")

    @pytest.mark.parametrize("stage", ["dev", "prod"])
    def test_a_profile_that_does_not_exist_names_it(self, stage: str) -> None:
        client = DXTrack()
        with pytest.raises(ConfigurationError, match="profile_name 'datalak' is not") as info:
            client.configure(**{**REQUIRED, "stage": stage}, profile_name="datalak")
        assert info.value.option == "profile_name"
        assert "'datalake'" in str(info.value)  # the profiles there are, to spot the typo
        assert os.environ["AWS_CONFIG_FILE"] in str(info.value)
        assert client.config is None and client.sink is None

    def test_from_the_environment_names_the_variable(self, monkeypatch: Any) -> None:
        monkeypatch.setenv("DXTRACK_PROFILE_NAME", "nosuch")
        with pytest.raises(ConfigurationError, match="^DXTRACK_PROFILE_NAME .*'nosuch'"):
            DXTrack().configure(**{**REQUIRED, "stage": "dev"})

    @pytest.mark.parametrize("profile", ["datalake", "sso-only"])
    def test_a_profile_of_either_file_is_accepted(self, profile: str) -> None:
        client = DXTrack()
        try:
            assert client.configure(**{**REQUIRED, "stage": "dev"}, profile_name=profile)
        finally:
            client.close()

    @pytest.mark.parametrize(
        "other",
        [dict(stage="test"), dict(stage="dev", aws_access_key_id=KEY_ID,
                                  aws_secret_access_key=SECRET)],
        ids=["stage test", "explicit keys"],
    )
    def test_not_looked_up_where_it_is_not_used(self, other: Dict[str, Any]) -> None:
        """Stage test sends nothing to AWS, and explicit keys win over any profile."""
        client = DXTrack()
        try:
            assert client.configure(**{**REQUIRED, **other}, profile_name="nosuch")
        finally:
            client.close()


class TestOptionsDefinedOnce:
    """configure()'s keywords, the README's table and the children's settings follow Config."""

    def test_configure_takes_each_option_as_a_typed_keyword(self) -> None:
        parameters = list(inspect.signature(DXTrack.configure).parameters.values())[1:]
        assert [p.name for p in parameters] == list(OPTIONS)
        for parameter, f in zip(parameters, dataclasses.fields(Config)):
            typed = str(f.type) if str(f.type).startswith(("Optional[", "Any")) else (
                f"Optional[{f.type}]")
            assert (parameter.kind, parameter.default, parameter.annotation) == (
                inspect.Parameter.KEYWORD_ONLY, None, typed), f.name

    def test_the_readme_table_lists_every_option_with_its_default(self) -> None:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        section = readme.split("### Options of `configure()`", 1)[1].split("\n#", 1)[0]
        shown: Dict[str, str] = {}  # option -> its default cell
        for row in re.findall(r"^\| `.*", section, flags=re.MULTILINE):
            names, default = [cell.strip() for cell in row.split("|")[1:3]]
            for name in re.findall(r"`(\w+)`", names):
                assert name not in shown, f"{name} is listed twice"
                shown[name] = default
        assert set(shown) == set(OPTIONS)
        for f in dataclasses.fields(Config):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert shown[f.name] == "", f.name  # required
            else:  # default_metadata's fresh {} is shown as None
                default = None if f.default is dataclasses.MISSING else f.default
                assert ast.literal_eval(shown[f.name].split("`")[1]) == default, f.name

    def test_children_get_every_option_but_credentials_and_sink(self) -> None:
        settings = config(output_dir="relative/out", aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, aws_session_token=SESSION_TOKEN,
                          sink=MemorySink(), profile_name="datalake").for_children()
        withheld = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "sink"}
        assert set(settings) == set(OPTIONS) - withheld | {"explicit_credentials"}
        assert (settings["explicit_credentials"], settings["profile_name"]) == (True, "datalake")
        assert settings["output_dir"] == os.path.abspath("relative/out")
        assert config().for_children()["explicit_credentials"] is False
