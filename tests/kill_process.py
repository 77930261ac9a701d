"""Kill a real driver process (and the local Ray it started) once it has done some work: the one
pattern the kill-and-resume tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_group_when(
    command: Sequence[str], ready: Callable[[], bool], waiting_for: str, deadline_s: float = 400, poll_s: float = 0.25, **popen
) -> int:
    """Start ``command`` in a new session, poll ``ready()`` until it holds, then SIGKILL the whole
    process group (the driver and every process it started); returns the killed driver's pid. Fails
    if the process ends first or ``deadline_s`` passes."""
    process = subprocess.Popen(list(command), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, **popen)
    try:
        deadline = time.monotonic() + deadline_s
        while not ready():
            assert process.poll() is None, f"the process ended before {waiting_for}"
            assert time.monotonic() < deadline, f"no {waiting_for} in {deadline_s:.0f} s"
            time.sleep(poll_s)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.pid
