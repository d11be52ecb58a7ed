"""Settings for child processes that import the program afresh (spawn, forkserver).

Such a child did not run the ``configure()`` under ``if __name__ ==
"__main__":``. So the ready-made client, when configured, hands its
non-secret settings (:meth:`~dxtrack.config.Config.for_children`, as JSON) to
every ``multiprocessing`` process started from then on, and an unconfigured
client in a child adopts them on its first record.

They travel with the process object itself: ``multiprocessing`` copies the
parent's ``current_process()._config`` into each new process object and hands
it to the child, whatever the start method, and even through a forkserver
started before ``configure()``, which keeps the environment it was started
with (test_processes: ``test_forkserver_children_see_the_latest_configure``).
Nothing is written to a file or to ``os.environ``, so nothing is left behind
when the process is killed, and a child's own children inherit the same.
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
    from multiprocessing import process

    config = getattr(process.current_process(), "_config", None)
    return config if isinstance(config, dict) else None


def publish(config: Config) -> None:
    """Processes started from now on inherit ``config``'s non-secret settings."""
    settings = _process_config()
    if settings is not None:
        settings[KEY] = orjson.dumps(
            config.for_children(), default=str, option=orjson.OPT_NON_STR_KEYS
        )


def withdraw() -> None:
    """Processes started from now on inherit nothing."""
    settings = _process_config()
    if settings is not None:
        settings.pop(KEY, None)


def inherited() -> Optional[Dict[str, Any]]:
    """The settings a parent handed to this child process; None elsewhere."""
    settings = _process_config() if in_child_process() else None
    published = settings.get(KEY) if settings is not None else None
    if not isinstance(published, bytes):
        return None
    try:
        found = orjson.loads(published)
    except orjson.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None
