"""Settings handed to child processes that import the program afresh (spawn, forkserver).

The ready-made client, when configured, puts its non-secret settings
(:meth:`~dxtrack.config.Config.for_children`, as JSON) in ``multiprocessing``'s
per-process settings (``current_process()._config``), which every process
created from then on copies and its child receives, whatever the start method,
even through a forkserver started before ``configure()`` (test_processes:
``test_forkserver_children_see_the_latest_configure``). An unconfigured client
in a child adopts them on first use. No file, no ``os.environ``: nothing is
left behind by ``kill -9`` (``TestNothingLeftBehind``). See docs/processes.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import orjson

from .config import Config
from .signals import in_child_process

__all__ = ["inherited", "publish", "withdraw"]

#: The key in ``multiprocessing``'s per-process settings that carries dxtrack's.
KEY = "dxtrack_settings"


def _process_config() -> Optional[Dict[str, Any]]:
    from multiprocessing import current_process  # only once settings are handed on or read

    config = getattr(current_process(), "_config", None)
    return config if isinstance(config, dict) else None


def publish(config: Config) -> None:
    """Processes created from now on inherit ``config``'s non-secret settings; nothing, and
    TypeError, when JSON cannot hold them (a tuple key in ``default_metadata``)."""
    withdraw()
    settings = _process_config()
    if settings is not None:
        settings[KEY] = orjson.dumps(config.for_children(), default=str,
                                     option=orjson.OPT_NON_STR_KEYS)


def withdraw() -> None:
    """Processes started from now on inherit nothing."""
    settings = _process_config()
    if settings is not None:
        settings.pop(KEY, None)


def inherited() -> Optional[Dict[str, Any]]:
    """The settings a parent handed to this child process; None elsewhere."""
    settings = _process_config() if in_child_process() else None
    published = settings.get(KEY) if settings is not None else None
    found = orjson.loads(published) if isinstance(published, bytes) else None
    return found if isinstance(found, dict) else None
