"""The Ray Data extraction stage vs a plain single-process loop (same images, encoder and writer).

    .venv/bin/python bench/bench_extraction.py [--images 64] [--encoders mobilenet_v2,sam_vit_tiny]

Plain loop: decode -> preprocess -> forward (batch ``--batch-size``, all cores as torch threads) ->
fp16 -> the same shard writer, in one process. Ray: ``extract_store`` on a local Ray started here
(``--ray-cpus`` logical CPUs, ``--num-actors`` encoder actors of ``--actor-num-cpus`` each, decode
tasks of ``--decode-num-cpus``). Ray startup is reported separately; actor startup is included in the
Ray time (it is a real per-run cost). Images: the first N coco_mini images by id.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_sam: the tiny SAM ViT benchmarks register

from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.extraction import RegistryEncoder, extract_store  # noqa: E402
from pipeline.extraction.sources import coco_items  # noqa: E402
from pipeline.store import FeatureSetKey, StoreBuilder, resolve_location, sorted_items  # noqa: E402
from pipeline.store.layout import images_per_shard_for  # noqa: E402
from tiny_sam import tiny_sam_registered  # noqa: E402

SHARED = REPO.parent / "shared"


def plain_loop(items, source: RegistryEncoder, output: str, batch_size: int, per_shard: int) -> float:
    start = time.perf_counter()
    encoder = source.build()
    shapes = {k: tuple(v) for k, v in encoder.output_shapes().items()}
    key = FeatureSetKey("coco_mini", encoder.encoder_id, source.weights_sha256(), encoder.preprocessing_id)
    builder = StoreBuilder(resolve_location(output), key, shapes, items, per_shard)
    for spec in builder.prepare():
        writer = builder.writer(spec)
        for begin in range(0, len(spec.items), batch_size):
            chunk = spec.items[begin : begin + batch_size]
            pixels = torch.stack([encoder.preprocess(load_rgb(item.path)) for item in chunk])
            with torch.inference_mode():
                out = {k: v.to(torch.float16).numpy() for k, v in encoder(pixels).items()}
            for index, item in enumerate(chunk):
                writer.add(item.image_id, {k: v[index] for k, v in out.items()})
        writer.publish()
    builder.finalize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--encoders", default="mobilenet_v2,sam_vit_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--actor-num-cpus", type=float, default=1.0)
    parser.add_argument("--decode-num-cpus", type=float, default=1.0)
    parser.add_argument("--writers", default="driver", help="comma list of extract_store writer modes: driver,actors")
    args = parser.parse_args()

    import ray

    coco = SHARED / "data" / "coco_mini"
    items = sorted_items(coco_items(coco / "instances.json", coco / "images"))[: args.images]
    weights = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray_startup = time.perf_counter() - started
    scratch = Path(tempfile.mkdtemp(prefix="refseg-bench-extract-"))
    rows = []
    try:
        for name in [n for n in args.encoders.split(",") if n]:
            if name == "mobilenet_v2":
                source = RegistryEncoder(name, str(weights))
            else:
                source = RegistryEncoder(name, allow_random_init=True)
            shapes = source.build().output_shapes()
            per_shard = min(len(items) // 4 or 1, images_per_shard_for(shapes, 2))
            t_plain = plain_loop(items, source, str(scratch / f"{name}-plain"), args.batch_size, per_shard)
            for writer in args.writers.split(","):
                t_ray = extract_store(
                    items, str(scratch / f"{name}-ray-{writer}"), source, "coco_mini", batch_size=args.batch_size,
                    images_per_shard=per_shard, num_actors=args.num_actors, actor_num_cpus=args.actor_num_cpus,
                    decode_num_cpus=args.decode_num_cpus, progress=False, writer=writer,
                ).seconds
                size = sum(p.stat().st_size for p in (scratch / f"{name}-ray-{writer}").glob("*.tar"))
                rows.append((f"{name} (writer={writer})", t_plain, t_ray, size))
                print(f"  {name}: plain {t_plain:.1f} s, ray ({writer} writes) {t_ray:.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\nimages: {len(items)} coco_mini, batch {args.batch_size}, "
        f"torch threads (plain) {torch.get_num_threads()}, ray: {args.ray_cpus} CPUs, "
        f"{args.num_actors} actor(s) x {args.actor_num_cpus} CPU, decode {args.decode_num_cpus} CPU; "
        f"Ray startup {ray_startup:.1f} s (not included)"
    )
    print("| encoder | plain loop s (img/s) | Ray stage s (img/s) | Ray/plain time | store MB |")
    print("|---|---|---|---|---|")
    for name, t_plain, t_ray, size in rows:
        n = len(items)
        print(
            f"| {name} | {t_plain:.1f} ({n / t_plain:.2f}) | {t_ray:.1f} ({n / t_ray:.2f}) | "
            f"{t_ray / t_plain:.2f} | {size / 1e6:.1f} |"
        )


if __name__ == "__main__":
    with tiny_sam_registered():
        main()
