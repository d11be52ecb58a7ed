"""Error fingerprints: which recorded errors are the same error.

Two errors are the same when they have the same exception type and the same innermost
frames (:data:`FRAMES` of them: file, function and source line), once line numbers and
memory addresses are set aside, and files named by their last two path parts (after
``site-packages/`` for installed ones). So an error whose code moved down a few lines in a new
release, or that runs from another release directory, or whose message names another object
at another address, stays in its group. An error with no frames at all (recorded with
``errors()``, never raised) is fingerprinted by its type and its value, with numbers and
addresses set aside. docs/report.md states the rule.
"""

from __future__ import annotations

import hashlib
import re
from typing import List, Optional, Tuple

__all__ = ["FRAMES", "Fingerprint", "fingerprint", "frames"]

#: How many innermost frames of a traceback make its fingerprint.
FRAMES = 3

_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line \d+, in (?P<function>.*)$')
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# Python 3.11+ marks the failing part of a source line with a line of carets.
_MARKERS = re.compile(r"^\s*[\^~]+\s*$")
# An installed package's path differs between machines and virtualenvs: keep what follows.
_INSTALLED = re.compile(r"^.*[/\\](?:site|dist)-packages[/\\]")
# The frames of an exception group's members are printed behind '|' margins.
_MARGIN = re.compile(r"^(?:\s*\|)+ ?")
#: Path components kept of a file outside site-packages: a release directory
#: (/srv/releases/20261201/...) or a home directory does not split a group.
PATH_PARTS = 2


class Fingerprint(str):
    """The short hash naming an error group (12 hex digits), stable between runs, machines
    and Python processes; ``key`` is the normalised text it hashes."""

    key: str

    def __new__(cls, key: str) -> Fingerprint:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        made = super().__new__(cls, digest)
        made.key = key
        return made


def frames(traceback: Optional[str], depth: int = FRAMES) -> List[str]:
    """The innermost ``depth`` frames of a printed traceback, normalised: ``file in
    function``, then the source line when the traceback shows it, with addresses as
    ``0x?``. In a chained traceback the innermost frames are those printed last."""
    found: List[Tuple[str, str]] = []
    source_next = False  # the line after a frame's may be its source line
    for line in (traceback or "").splitlines():
        line = _MARGIN.sub("", line)
        frame = _FRAME.match(line)
        if frame:
            where = _INSTALLED.sub("", frame["file"])
            where = "/".join(re.split(r"[/\\]", where)[-PATH_PARTS:])
            found.append((f"{where} in {frame['function'].strip()}", ""))
            source_next = True
        elif source_next and line.startswith("    ") and not _MARKERS.match(line):
            found[-1] = (found[-1][0], _ADDRESS.sub("0x?", line.strip()))
            source_next = False
        elif not _MARKERS.match(line):
            source_next = False
    return [f"{where}: {source}" if source else where for where, source in found[-depth:]]


def fingerprint(type_: Optional[str], value: Optional[str],
                traceback: Optional[str]) -> Fingerprint:
    """The fingerprint of one recorded error (see the module's docstring)."""
    innermost = frames(traceback)
    if innermost:
        return Fingerprint("\n".join([type_ or "", *innermost]))
    normalised = _NUMBER.sub("N", _ADDRESS.sub("0x?", value or ""))
    return Fingerprint("\n".join([type_ or "", normalised]))
