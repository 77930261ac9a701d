"""How fast one process writes encoded chunks into a store (the ``writer="driver"`` path).

With ``writer="driver"`` every encoded chunk comes back to the driver, which appends it to the shard
tar (``pipeline.extraction.chunks.write_chunk``: bytes -> arrays -> ``.npy`` members) and publishes
each shard. Ray Data runs decode and encode in other processes and buffers their output, so the
driver stalls the GPU only if it writes slower than the GPU encodes. This measures the driver's side
alone on ONE core (pinned), from rows exactly as the encoder actors return them, into a local store:

    python bench/bench_store_writer.py [--images 256] [--encoder sam_vit_h] [--core 0] [--json out.json]

Prints images per CPU-second and per wall-second and MB/s (payload bytes), and the rows' sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_output import emit, machine  # noqa: E402

from pipeline.extraction.chunks import chunk_rows, write_chunk  # noqa: E402
from pipeline.store import FeatureSetKey, StoreBuilder, resolve_location  # noqa: E402
from pipeline.store.feature_set import RANDOM_INIT_WEIGHTS  # noqa: E402
from pipeline.store.layout import ImageItem, images_per_shard_for  # noqa: E402
from refseg_models.encoders import build_encoder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--encoder", default="sam_vit_h", help="whose output shapes to write (random values)")
    parser.add_argument("--batch", type=int, default=16, help="images per chunk (the encoder batch)")
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with torch.device("meta"):
        encoder = build_encoder(args.encoder, allow_random_init=True)
    shapes = {k: tuple(v) for k, v in encoder.output_shapes().items()}
    items = [ImageItem(f"{i:08d}", f"/nonexistent/{i}.jpg") for i in range(args.images)]
    key = FeatureSetKey("bench", encoder.encoder_id, RANDOM_INIT_WEIGHTS, encoder.preprocessing_id)
    scratch = Path(tempfile.mkdtemp(prefix="refseg-bench-writer-"))
    rng = np.random.default_rng(0)
    try:
        builder = StoreBuilder(resolve_location(str(scratch / "store")), key, shapes, items, images_per_shard_for(shapes, 2))
        pending = builder.prepare()
        specs = {spec.index: spec for spec in pending}
        rows = []
        for row in chunk_rows(pending, args.batch):  # what an encoder actor returns, unpacked
            ids = [item.image_id for item in specs[row["shard"]].items][row["chunk"] * args.batch:][: args.batch]
            features = {f"feature_{n}": rng.standard_normal((len(ids), *s), dtype=np.float32).astype(np.float16).tobytes()
                        for n, s in shapes.items()}
            rows.append({**row, "ok_ids": row["image_ids"], "failures": "[]", **features})
        payload = sum(len(v) for row in rows for k, v in row.items() if k.startswith("feature_"))
        os.sched_setaffinity(0, {args.core})
        torch.set_num_threads(1)
        start, start_cpu = time.perf_counter(), time.process_time()
        writer = None
        for row in rows:
            writer = writer or builder.writer(specs[int(row["shard"])])
            write_chunk(writer, row, shapes, "float16")
            if row["last"]:
                writer.publish()
                writer = None
        builder.finalize()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        builder.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return emit({
        "machine": f"{machine()}; pinned to core {args.core}, local disk (page cache)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "encoder_shapes": args.encoder, "images": args.images, "batch": args.batch,
        "payload_mb_per_image": round(payload / args.images / 1e6, 3),
        "images_per_cpu_s": round(args.images / cpu, 1), "images_per_wall_s": round(args.images / wall, 1),
        "payload_mb_per_wall_s": round(payload / wall / 1e6, 1),
    }, args.json)


if __name__ == "__main__":
    sys.exit(main())
