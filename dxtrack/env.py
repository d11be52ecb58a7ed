"""Defaults for ``configure()`` from ``DXTRACK_<OPTION>`` environment variables.

Each option :class:`~dxtrack.config.Config` marks ``env`` is read from its variable, parsed as
the option's type; the rules for users are in docs/environment.md.
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


def _number(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return convert(value.strip())
        except ValueError:
            raise ValueError(f"must be {what}") from None

    return parse


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
    "bool": _flag, "int": _number(lambda text: int(text.replace("_", "")), "a whole number"),
    "float": _number(float, "a number of seconds"), "Mapping[str, Any]": _json_object,
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
    """``(options, sources)``: the options the environment supplies where ``explicit`` sets
    none, and the variable each came from (a later error names it).

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


def unknown_variables() -> Set[str]:
    """``DXTRACK_*`` variables that name no option (a typo, most likely)."""
    known = {variable_for(option) for option in ENV_OPTIONS}
    return {name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known}
