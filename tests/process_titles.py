"""Watch Ray's worker processes from outside: Ray sets each worker's title (its argv[0]) to the
task or actor it runs, e.g. ``ray::MapBatches(_decode_chunk)`` or
``ray::MapWorker(MapBatches(_EncodeChunk))`` (fused operators would share one title). Sampling
``/proc/<pid>/cmdline`` during a run shows which stages ran in which processes, without any
plumbing in the code under test."""

from __future__ import annotations

import os
import threading
from collections import defaultdict

from environment import missing


class RayProcessTitles:
    def __init__(self, interval_s: float = 0.02):
        if not os.path.isdir("/proc/self"):
            missing("needs /proc to see Ray's worker processes")
        self.interval_s = interval_s
        self.pids: dict[str, set[int]] = defaultdict(set)  # title -> pids that had it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as handle:
                        title = handle.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::"):
                    self.pids[title].add(int(entry))
            self._stop.wait(self.interval_s)

    def running(self, name: str) -> set[int]:
        """Pids whose title mentions ``name`` (a function or class the stage runs)."""
        return {pid for title, pids in self.pids.items() if name in title for pid in pids}

    def __enter__(self) -> "RayProcessTitles":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
