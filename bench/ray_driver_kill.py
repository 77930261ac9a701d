"""How long Ray's processes outlive a driver that started a local Ray and was SIGKILLed.

    .venv/bin/python bench/ray_driver_kill.py [--watch-s 150]

Starts a driver (``ray.init()``, as the training job's embedded local Ray) in its own process
group, waits until its Ray is up, SIGKILLs the driver alone, then lists every process of that group
once a second until none is left, printing each change (process names) with the time since the kill.
The processes are found by their process group (Ray's processes started by a driver stay in it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

DRIVER = "import ray, time; ray.init(); print('up', flush=True); time.sleep(3600)"


def group_processes(group: int) -> list[str]:
    """``pid name`` of every live or zombie process of process group ``group`` (but its leader)."""
    listing = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    out = []
    for line in listing.splitlines():
        pid, pgid, args = line.split(None, 2)
        if int(pgid) == group and int(pid) != group:
            out.append(f"{pid} {re.sub(r' .*', '', args) if not args.startswith('ray::') else args}"[:80])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch-s", type=float, default=150.0, help="give up watching after this long")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after Ray is up before the kill")
    args = parser.parse_args()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True)
    assert driver.stdout.readline().strip() == "up", "the driver did not start Ray"
    time.sleep(args.settle_s)
    print(f"before the kill: {len(group_processes(driver.pid))} Ray processes")
    killed = time.monotonic()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    last: list[str] | None = None
    while time.monotonic() - killed < args.watch_s:
        names = sorted({entry.split(" ", 1)[1] for entry in group_processes(driver.pid)})
        if names != last:
            print(f"t = {time.monotonic() - killed:5.1f} s: {len(names)} left {names}", flush=True)
            last = names
        if not names:
            break
        time.sleep(1.0)
    print(f"the last one was gone {time.monotonic() - killed:.1f} s after the kill" if not last
          else f"still alive after {args.watch_s:.0f} s: {last}")


if __name__ == "__main__":
    main()
