"""Defaults for ``configure()`` from ``DXTRACK_<OPTION>`` environment variables.

Every option that :class:`~dxtrack.config.Config` marks ``env`` (all but the
credentials and ``sink``) can come from the environment, which suits jobs
started by a scheduler or a container: ``DXTRACK_STAGE=prod`` and so on. The
text is read as the option's type. An argument passed to ``configure()``
always wins over its variable. An empty variable counts as unset. A value that
does not parse, or that ``Config`` refuses, is a
:class:`~dxtrack.exceptions.ConfigurationError` (a ValueError) naming the variable.

Secrets are never read from ``DXTRACK_*``: AWS keys come from the usual
``AWS_*`` variables, which boto3 reads itself.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import orjson

from .config import OPTIONS, Config
from .exceptions import ConfigurationError

__all__ = ["ENV_PREFIX", "ENV_OPTIONS", "environment_defaults", "variable_for"]

ENV_PREFIX = "DXTRACK_"


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")


def _whole(value: str) -> int:
    try:
        return int(value.strip().replace("_", ""))
    except ValueError:
        raise ValueError("must be a whole number") from None


def _seconds(value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def _json_object(value: str) -> Dict[str, Any]:
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"must be a JSON object, got a JSON {type(parsed).__name__}")
    return parsed


#: A variable's text is read as its option's type (the annotation on Config); else as text.
_PARSERS: Dict[str, Callable[[str], Any]] = {
    "bool": _flag, "int": _whole, "float": _seconds, "Mapping[str, Any]": _json_object,
}

#: Option name -> parser of its variable's text, for the options Config marks ``env``.
ENV_OPTIONS: Dict[str, Callable[[str], Any]] = {
    f.name: _PARSERS.get(str(f.type), str) for f in fields(Config) if OPTIONS[f.name].env
}


def variable_for(option: str) -> str:
    """The environment variable that holds a default for ``option``."""
    return ENV_PREFIX + option.upper()


def environment_defaults(
    explicit: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The options the environment supplies, for those ``explicit`` does not set.

    Returns ``(options, sources)``: ``sources`` maps each option taken from
    the environment to its variable's name, so a later validation error can
    name the variable.

    :raises ConfigurationError: for a variable whose text does not parse.
    """
    environ = os.environ if environ is None else environ
    options: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for option, parse in ENV_OPTIONS.items():
        if explicit.get(option) is not None:
            continue
        variable = variable_for(option)
        text = environ.get(variable)
        if not text:
            continue
        try:
            options[option] = parse(text)
        except ValueError as exc:
            raise ConfigurationError(f"{variable} {exc}, got {text!r}", option=option) from None
        sources[option] = variable
    return options, sources


def unknown_variables(environ: Optional[Mapping[str, str]] = None) -> Set[str]:
    """``DXTRACK_*`` variables that name no option (a typo, most likely)."""
    environ = os.environ if environ is None else environ
    known = {variable_for(option) for option in ENV_OPTIONS}
    return {name for name in environ if name.startswith(ENV_PREFIX) and name not in known}
