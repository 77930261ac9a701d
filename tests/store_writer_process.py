"""A real second process that writes a toy store slowly (used by the lease and scratch tests).

    python tests/store_writer_process.py URI [--endpoint HOST:PORT] [--ttl S]

Takes the store's lease, writes the first image of shard 0 into its scratch tar, prints
``READY <run id> <scratch dir>`` and waits for ``finish`` on stdin; then writes the rest, finalizes
and prints ``DONE``. Tests kill it (SIGKILL) or let it finish.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_store_readwrite import KEY, SHAPES, features_of  # noqa: E402

from pipeline.store import StoreBuilder, resolve_location, sorted_items  # noqa: E402

IDS = list(range(1, 8))
PER_SHARD = 3


def s3(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="test", secret_key="test", region="us-east-1"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("--endpoint")
    parser.add_argument("--ttl", type=float, default=60.0)
    args = parser.parse_args()
    filesystem = s3(args.endpoint) if args.endpoint else None
    items = sorted_items([(i, f"/data/{i}.jpg") for i in IDS])
    builder = StoreBuilder(
        resolve_location(args.uri, filesystem), KEY, SHAPES, items, PER_SHARD, lease_ttl_s=args.ttl, lease_settle_s=0.2
    )
    pending = builder.prepare()
    writer = builder.writer(pending[0])
    first = pending[0].items[0]
    writer.add(first.image_id, features_of(first.image_id))
    print(f"READY {builder.run.run_id} {builder.scratch_dir}", flush=True)
    if sys.stdin.readline().strip() != "finish":
        return
    for item in pending[0].items[1:]:
        writer.add(item.image_id, features_of(item.image_id))
    writer.publish()
    for spec in pending[1:]:
        writer = builder.writer(spec)
        for item in spec.items:
            writer.add(item.image_id, features_of(item.image_id))
        writer.publish()
    builder.finalize()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
