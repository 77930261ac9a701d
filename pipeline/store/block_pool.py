"""Read buffers reused once no array viewing them is alive any more.

A fresh buffer costs page faults on first touch: streaming into fresh 16 MiB blocks ran at about half
the speed of a raw read, and batches of random reads (several 1-2 MB buffers alive at once, then
freed together, which glibc returns to the kernel) ran 5x slower than single reads. A consumer that
drops (or copies) what it read, as a DataLoader or an episode builder does, gets the same memory
back. A buffer is reused only when nothing but the pool references it (CPython reference counts; a
numpy view keeps its base buffer referenced), so data that is kept, e.g. in a store's LRU cache, is
never overwritten.

Pools are owned by the reader objects that read into them (a store's random reads, a stream's shard
reads) and emptied when those close; a pickled pool arrives empty (its buffers are per process).
"""

from __future__ import annotations

import sys
import threading

import numpy as np


class BlockPool:
    """Keeps at most ``keep_blocks`` buffers and about ``keep_bytes`` between reads; every buffer
    holds at least ``min_block`` bytes. Thread-safe."""

    def __init__(self, min_block: int, keep_bytes: int, keep_blocks: int) -> None:
        self.min_block, self.keep_bytes, self.keep_blocks = int(min_block), int(keep_bytes), int(keep_blocks)
        self._blocks: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A uint8 buffer of ``size`` bytes, a free kept one when one fits (at most 25 % larger)."""
        limit = max(size + size // 4, self.min_block)
        with self._lock:
            for block in self._blocks:
                # references: the list, `block` here, getrefcount's argument -> 3 when no view is alive
                if size <= block.size <= limit and sys.getrefcount(block) == 3:
                    return block[:size]
            block = np.empty(max(size, self.min_block), dtype=np.uint8)
            self._blocks.append(block)
            while len(self._blocks) > self.keep_blocks or (
                len(self._blocks) > 2 and sum(b.size for b in self._blocks) > self.keep_bytes
            ):
                self._blocks.pop(0)
            return block[:size]

    def clear(self) -> None:
        """Forget every kept buffer (arrays still viewing one keep it alive themselves)."""
        with self._lock:
            self._blocks.clear()

    def __getstate__(self) -> dict:
        return {"min_block": self.min_block, "keep_bytes": self.keep_bytes, "keep_blocks": self.keep_blocks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
