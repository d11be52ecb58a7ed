"""A job that is sent SIGTERM while it forks, after dxtrack held SIGTERM back.

Imported afresh by a spawned child: its before-fork hook is registered before dxtrack's, so
it runs after dxtrack's (hooks run in reverse order of registration), when SIGTERM is already
blocked in the forking thread. The signal is then held back until dxtrack's after-fork hook
unblocks it in the parent, which is where its handler runs.
"""

from __future__ import annotations

import os
import signal
import time

_armed = False


def _terminate_me() -> None:
    if _armed:
        os.kill(os.getpid(), signal.SIGTERM)


os.register_at_fork(before=_terminate_me)

from dxtrack import dxtrack  # noqa: E402 - after the hook above, on purpose


def sigterm_during_fork(output_dir: str, metrics: int) -> None:
    global _armed
    dxtrack.configure(stage="test", context="c", run_id="r", output_dir=output_dir,
                      buffer_metrics=True, flush_interval=3600, shutdown_timeout=2)
    for i in range(metrics):
        dxtrack.metric("mp.before", i)
    _armed = True
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _armed = False
    os.waitpid(pid, 0)
    time.sleep(10)  # still working when the bound (shutdown_timeout + 1 s) passes
