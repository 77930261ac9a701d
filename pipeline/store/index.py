"""The Parquet index: one row per (image, feature) -> shard, member, data offset/size, shape, crc32.

Rows are sorted by (shard, sample key, feature), so the index of a resumed run is byte-identical to
that of a clean run. Random access reads ``size`` bytes at ``offset`` of the shard (an ``.npy``).
``crc32`` (zlib's CRC-32 of those ``size`` bytes) lets ``verify`` (and, on request, readers) detect
corrupted payloads; stores written before it existed have an index without that column
(``INDEX_SCHEMA_V1``), which is still read, and ``verify`` says their payloads cannot be checked.
"""

from __future__ import annotations

import io
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.parquet import read_parquet_table
from pipeline.store.fs import Location
from pipeline.store.layout import INDEX_NAME

INDEX_SCHEMA_V1 = pa.schema(
    [
        ("image_id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("feature", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("shape", pa.list_(pa.int32())),
    ]
)
# crc32 is null for entries of shards written before checksums existed (a store resumed across that change).
INDEX_SCHEMA = INDEX_SCHEMA_V1.append(pa.field("crc32", pa.uint32()))
CHECKSUM_COLUMN = "crc32"


def build_index_table(shard_entries: Iterable[tuple[str, list[dict]]]) -> pa.Table:
    """``[(shard name, entries from its stats)]`` -> sorted index table."""
    rows = [dict(entry, shard=shard) for shard, entries in shard_entries for entry in entries]
    rows.sort(key=lambda row: (row["shard"], row["key"], row["feature"]))
    columns = {name: [row.get(name) for row in rows] for name in INDEX_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)


def write_index(location: Location, table: pa.Table) -> None:
    buffer = io.BytesIO()
    # No statistics/dictionary surprises: fixed options so the bytes only depend on the rows.
    pq.write_table(table, buffer, compression="zstd", write_statistics=False)
    location.write_bytes(INDEX_NAME, buffer.getvalue())


def read_index(location: Location) -> pa.Table:
    data = location.read_bytes(INDEX_NAME)
    try:
        table = read_parquet_table(data)  # no Arrow threads: see pipeline/parquet.py (SIGABRT at exit)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"index {location.join(INDEX_NAME)} is not a readable Parquet file: {error}") from error
    if not (table.schema.equals(INDEX_SCHEMA) or table.schema.equals(INDEX_SCHEMA_V1)):
        raise DataError(f"index {location.join(INDEX_NAME)} has schema {table.schema}, expected {INDEX_SCHEMA}")
    return table


def has_checksums(table: pa.Table) -> bool:
    return CHECKSUM_COLUMN in table.column_names
