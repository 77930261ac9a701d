"""Store read speed vs raw sequential reads, bytes per image, and the cache-or-online decision.

    .venv/bin/python bench/bench_store_reads.py [--images 48] [--budget-mb 600] [--encoders ...]

1. For each feature set's real shapes (SAM embedding, DINOv2-L/14 at 896, resnet50_v2 taps,
   MobileNetV2 taps) a store of random fp16 features is written (the bytes are what matter), then
   read (page cache warm, each read pass repeated once before timing):
   raw = the shard files read sequentially in 16 MiB blocks (the floor), random = ``get`` in a
   shuffled order with the cache off, stream = one WebDataset pass, cached = ``get`` on cache hits.
2. Encoder cost per image on this machine (batch 1, all cores, after one warm-up call), from the
   registry with random weights except MobileNetV2 (real weights, if ../shared/weights exists).
3. A decision table: read s/img vs compute s/img and the disk a COCO train2014 cache would take.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import FeatureSetKey, StoreBuilder, open_store, resolve_location, sorted_items  # noqa: E402
from pipeline.store.layout import bytes_per_sample  # noqa: E402

COCO_TRAIN2014_IMAGES = 82_783
FEATURE_SETS = {
    "sam (256x64x64)": {"image_embedding": (256, 64, 64)},
    "dinov2_vits14@896": {"tokens": (384, 64, 64)},
    "dinov2_vitl14@896": {"tokens": (1024, 64, 64)},
    "resnet50_v2 l2+l3+l4": {"layer2": (512, 64, 64), "layer3": (1024, 64, 64), "layer4": (2048, 64, 64)},
    "resnet50_v2 l2+l3": {"layer2": (512, 64, 64), "layer3": (1024, 64, 64)},
    "mobilenet_v2 l2+l3+l4": {"layer2": (32, 64, 64), "layer3": (96, 32, 32), "layer4": (1280, 16, 16)},
}
REPO = Path(__file__).resolve().parents[1]


def write_random_store(root: Path, shapes: dict, images: int, per_shard: int) -> str:
    key = FeatureSetKey("bench", "random", "0" * 64, "none", "float16")
    items = sorted_items([(i, f"{i}.jpg") for i in range(images)])
    builder = StoreBuilder(resolve_location(str(root)), key, shapes, items, per_shard)
    rng = np.random.default_rng(0)
    for spec in builder.prepare():
        writer = builder.writer(spec)
        for item in spec.items:
            features = {n: rng.standard_normal(s, dtype=np.float32).astype(np.float16) for n, s in shapes.items()}
            writer.add(item.image_id, features)
        writer.publish()
    builder.finalize()
    return str(root)


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_reads(root: Path, shapes: dict, images: int) -> dict:
    uri = write_random_store(root, shapes, images, per_shard=max(1, images // 4))
    store = open_store(uri, cache_bytes=0)
    shard_files = [Path(p) for p in store.shard_paths()]
    total_bytes = sum(p.stat().st_size for p in shard_files)
    payload = images * sum(int(np.prod(s)) * 2 for s in shapes.values())

    def raw():
        for path in shard_files:
            with path.open("rb", buffering=0) as handle:
                while handle.read(16 << 20):
                    pass

    ids = store.image_ids
    order = ids[:]
    random.Random(0).shuffle(order)

    def random_access():
        for image_id in order:
            store.get(image_id)

    def stream():
        for _ in store.stream():
            pass

    cached_store = open_store(uri, cache_bytes=2 * total_bytes)
    for image_id in ids:
        cached_store.get(image_id)

    def cached():
        for image_id in order:
            cached_store.get(image_id)

    t_raw, t_random, t_stream, t_cached = timed(raw), timed(random_access), timed(stream), timed(cached)
    return {
        "bytes_per_image": bytes_per_sample(shapes, 2),
        "payload_mb": payload / 1e6,
        "raw_mb_s": total_bytes / t_raw / 1e6,
        "random_img_s": images / t_random,
        "random_ratio": t_raw / t_random,
        "stream_img_s": images / t_stream,
        "stream_ratio": t_raw / t_stream,
        "cached_img_s": images / t_cached,
        "read_s_per_img": t_random / images,
    }


def encoder_cost(name: str, weights: Path | None, repeat: int) -> float:
    from refseg_models.encoders import build_encoder

    encoder = build_encoder(name, checkpoint=str(weights) if weights else None, allow_random_init=weights is None)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pixels = encoder.preprocess(image)[None]
    with torch.inference_mode():
        encoder(pixels)
        start = time.perf_counter()
        for _ in range(repeat):
            encoder(pixels)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per feature set (capped by --budget-mb)")
    parser.add_argument("--budget-mb", type=int, default=600, help="max store size per feature set")
    parser.add_argument("--encoders", default="mobilenet_v2,sam_vit_tiny,resnet50_v2,dinov2_vits14,sam_vit_b")
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per encoder (sam_vit_b: 1)")
    parser.add_argument("--scratch", default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()

    print(f"machine: {torch.get_num_threads()} torch threads, CUDA available: {torch.cuda.is_available()}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="refseg-bench-reads-"))
    results = {}
    try:
        for name, shapes in FEATURE_SETS.items():
            images = max(4, min(args.images, args.budget_mb * 10**6 // bytes_per_sample(shapes, 2)))
            results[name] = bench_reads(scratch / name.replace(" ", "_"), shapes, images)
            results[name]["images"] = images
            print(f"  measured {name} ({images} images)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        "\n| feature set | MB/img (fp16) | images | raw seq MB/s | random img/s (x raw) | stream img/s (x raw) "
        "| cache-hit img/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['bytes_per_image'] / 1e6:.2f} | {r['images']} | {r['raw_mb_s']:.0f} | "
            f"{r['random_img_s']:.0f} ({r['random_ratio']:.2f}) | {r['stream_img_s']:.0f} ({r['stream_ratio']:.2f}) | "
            f"{r['cached_img_s']:.0f} |"
        )

    weights = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"
    costs = {}
    for name in [n for n in args.encoders.split(",") if n]:
        repeat = 1 if name.startswith("sam_vit_") and name != "sam_vit_tiny" else args.repeat
        costs[name] = encoder_cost(name, weights if name == "mobilenet_v2" and weights.is_file() else None, repeat)
        print(f"  {name}: {costs[name]:.3f} s/img", flush=True)
    reads = {
        "mobilenet_v2": "mobilenet_v2 l2+l3+l4", "sam_vit_tiny": "sam (256x64x64)", "sam_vit_b": "sam (256x64x64)",
        "resnet50_v2": "resnet50_v2 l2+l3+l4", "dinov2_vits14": "dinov2_vits14@896",
    }
    print(
        "\n| encoder | compute s/img (this CPU) | read s/img (random, warm) | compute/read "
        "| COCO train2014 cache GB |"
    )
    print("|---|---|---|---|---|")
    for name, cost in costs.items():
        r = results[reads.get(name, "sam (256x64x64)")]
        print(
            f"| {name} | {cost:.3f} | {r['read_s_per_img']:.4f} | {cost / r['read_s_per_img']:.0f} | "
            f"{COCO_TRAIN2014_IMAGES * r['bytes_per_image'] / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
