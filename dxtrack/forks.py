"""``os.fork()``: the one place where dxtrack's state is made fit for a forked child.

A child starts with one thread and copies of every lock, queue and connection, some held by
threads that no longer exist. One set of hooks sets things right in one order: the signal
state (:mod:`dxtrack.signals`), the exit hooks (:mod:`dxtrack.exits`), then every registered
object in creation order (a client before its pipelines). They log nothing: the logging lock
may have been held at fork time (test_processes: ``TestForkKeepsParentAndChildApart``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from typing import Any

from . import exits, signals

__all__ = ["register"]

# Objects with an after_fork_in_child() method, by creation number; dead ones drop out.
_registered: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_numbers = itertools.count()


def register(obj: Any) -> None:
    """Call ``obj.after_fork_in_child()`` in every forked child while ``obj`` lives."""
    _registered[next(_numbers)] = obj


def _after_fork_in_child() -> None:
    signals.after_fork_in_child()
    exits.after_fork_in_child()
    for _, obj in sorted(_registered.items(), key=lambda item: item[0]):  # creation order
        with contextlib.suppress(Exception):  # one that fails must not keep the others back
            obj.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=signals.before_fork, after_in_parent=signals.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
