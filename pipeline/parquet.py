"""Reading small Parquet files (store indexes, episode manifests) without starting Arrow threads.

``pq.read_table`` goes through Arrow's dataset scanner, which starts Arrow's CPU and I/O thread
pools. When such a process exits, a pool thread that is still joinable can be destroyed during
static teardown and the process dies with SIGABRT ("terminate called without an active
exception"; apache/arrow#34314). With torch imported this happened in 6-11 of 30 runs of a
script that opens a store and reads one entry (2-core CPU machine, pyarrow 25.0.1, torch 2.14.1):
``pq.ParquetFile(...).read()`` still aborted (1-2/30), ``ParquetFile(...).read(use_threads=False)``
starts no Arrow thread at all and never aborted (0/40, and ``tests/test_parquet_exit.py`` runs it
20 times in fresh processes). The files read here are a few MB at most: threads buy nothing.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet_table(source: bytes | str) -> pa.Table:
    """The whole table of a Parquet file given as bytes or a local path, single-threaded."""
    handle = pa.BufferReader(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    return pq.ParquetFile(handle).read(use_threads=False)
