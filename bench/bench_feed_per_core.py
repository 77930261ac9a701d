"""The training data path's capacity per CPU core: feature stores -> episode batches, episodes/s.

How many CPU cores must feed one GPU that trains at R episodes/s? This measures the CPU side of
the training loop's batch assembly on ONE core (the process pinned to it with
``sched_setaffinity``, torch on 1 thread, the store reader's I/O threads sharing that core), with
the real code: COCO-20i fold 0 training episodes drawn by ``epoch_episodes`` over coco_mini, label
masks rendered from the COCO polygons (``MaskCache`` without hits: COCO's 95k training pairs do not
fit its 2,048-mask LRU), reference annotations generated, both mapped into the logits frame, and
the features read by ``EpisodeFeatureBuilder`` from stores on local disk (page cache warm: this is
the CPU cost, not a disk's; an NVMe or S3 adds I/O, not CPU).

The stores are synthetic (random fp16) at the real geometries, written once into ``--work``: SAM
ViT-H's ``image_embedding`` 256 x 64 x 64 (2 MiB per image), MobileNetV2's taps and ResNet-50 v2's
taps (512 input: 29 MiB per image). Values do not change the cost of reading them.

Arms (VRP-SAM: target SAM embedding + target and reference backbone taps; FCP: + the reference's
SAM embedding):
* ``*_float32``: the builder as the loop runs it today (fp16 store -> fp32 tensors on the CPU);
* ``*_float16``: the same batch left in fp16 (the cast would run on the GPU: half the bytes to pin
  and copy);
* the masked-reference layer4 (VRP-SAM's one live backbone call) is NOT in these arms: on a GPU it
  belongs on the GPU. ``masked_layer4_cpu_s`` says what it costs per episode when left on a CPU core;
* ``decode_resnet50_preprocess``: JPEG decode + ResNet-50 preprocessing per image (what the
  ``online`` backbone mode, refseg's default for ResNet-50, spends on the CPU instead of reading taps).

    python bench/bench_feed_per_core.py --shared ../shared [--episodes 64] [--batch 8] [--json out.json]

Prints one JSON object: episodes per CPU-second (the process's own CPU time on its one core: robust
to other load on a shared machine) and per wall-second per arm, and the cores one GPU needs at
``--gpu-rate`` episodes/s (600: the issue's VRP-SAM goal) from the CPU-second rates.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_output import emit, machine  # noqa: E402

from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.mask_cache import MaskCache  # noqa: E402
from pipeline.store import FeatureSetKey, StoreBuilder, open_store, resolve_location  # noqa: E402
from pipeline.store.feature_set import RANDOM_INIT_WEIGHTS  # noqa: E402
from pipeline.store.layout import MANIFEST_NAME, ImageItem, images_per_shard_for  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.data import load_fold_data  # noqa: E402
from pipeline.training.epochs import epoch_episodes  # noqa: E402
from pipeline.training.episode_features import EpisodeFeatureBuilder  # noqa: E402
from refseg_models import build_model  # noqa: E402
from refseg_models.encoders import build_encoder  # noqa: E402
from refseg_models.modeling.pseudo_mask import masked_reference_layer4  # noqa: E402

SAM_SHAPES = {"image_embedding": (256, 64, 64)}  # SAM ViT-B/L/H, 1024 input


def _synthetic_store(path: Path, key: FeatureSetKey, shapes: dict, items: list[ImageItem]) -> None:
    """A finished store of random fp16 features for ``items`` (skipped when it is already there)."""
    location = resolve_location(str(path))
    if location.exists(MANIFEST_NAME):
        return
    rng = np.random.default_rng(0)
    per_shard = images_per_shard_for(shapes, 2)
    builder = StoreBuilder(location, key, shapes, items, per_shard)
    try:
        for spec in builder.prepare():
            writer = builder.writer(spec)
            for item in spec.items:
                writer.add(item.image_id, {n: rng.standard_normal(s, dtype=np.float32).astype(np.float16) for n, s in shapes.items()})
            writer.publish()
        builder.finalize()
    finally:
        builder.close()


def _rate(fn, batches: list, passes: int) -> tuple[float, float]:
    """(episodes per CPU-second, episodes per wall-second) of ``fn(batch)`` over all batches, median of
    ``passes`` after one warm-up. CPU seconds are this process's (all its threads) on its one core:
    on a shared machine the wall rate also counts other processes' turns on that core."""
    for batch in batches:
        fn(batch)
    cpu, wall = [], []
    episodes = sum(len(b) for b in batches)
    for _ in range(passes):
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            fn(batch)
        cpu.append(episodes / (time.process_time() - start_cpu))
        wall.append(episodes / (time.perf_counter() - start))
    return statistics.median(cpu), statistics.median(wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_feed_per_core")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="episodes per batch (the recipes' global batch)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--core", type=int, default=0, help="the CPU core the measurement is pinned to")
    parser.add_argument("--gpu-rate", type=float, default=600.0, help="episodes/s one GPU trains at")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    coco = args.shared / "data" / "coco_mini"
    cfg = TrainConfig(
        annotations=str(coco / "instances.json"), images=str(coco / "images"),
        lists_dir=str(args.shared / "data" / "splits" / "coco20i_hsnet"), fold=0, feature_dataset="bench",
    )
    data = load_fold_data(cfg)
    rows = epoch_episodes(cfg, data, 0, args.episodes).to_pylist()
    ids = sorted({row["query_id"] for row in rows} | {s for row in rows for s in row["support_ids"]})
    items = [ImageItem(str(image_id), str(data.source.image_path(image_id))) for image_id in ids]
    batches = [rows[i : i + args.batch] for i in range(0, len(rows) - args.batch + 1, args.batch)]

    with torch.device("meta"):
        encoders = {name: build_encoder(name, allow_random_init=True) for name in ("mobilenet_v2", "resnet50_v2")}
    stores = {}
    for name, shapes in (("sam", SAM_SHAPES), *((n, e.output_shapes()) for n, e in encoders.items())):
        encoder_id, preprocessing = ("sam_vit_h", "vrp512_to1024_imagenet") if name == "sam" else (
            encoders[name].encoder_id, encoders[name].preprocessing_id)
        key = FeatureSetKey("bench", encoder_id, RANDOM_INIT_WEIGHTS, preprocessing)
        _synthetic_store(args.work / name, key, {k: tuple(v) for k, v in shapes.items()}, items)
        stores[name] = open_store(str(args.work / name), expect=key)

    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    result: dict = {
        "machine": f"{machine()}; pinned to core {args.core} of {os.cpu_count()}, torch threads 1",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "episodes": len(batches) * args.batch, "batch": args.batch, "images": len(items),
        "arms_episodes_per_cpu_s": {}, "arms_episodes_per_wall_s": {},
    }
    arms, walls = result["arms_episodes_per_cpu_s"], result["arms_episodes_per_wall_s"]
    for method in ("vrp_sam", "fcp"):
        for backbone in ("mobilenet_v2", "resnet50_v2"):
            model = build_model(method, allow_random_init=True)  # its feature spec and frame only
            live = build_encoder(backbone, allow_random_init=True)
            for dtype in (torch.float32, torch.float16):
                # Masks rendered every time (max_items=0): no LRU hits, as on COCO's 95k pairs.
                builder = EpisodeFeatureBuilder.for_method(
                    model, MaskCache(data.source, max_items=0), sam=stores["sam"], backbone_features=stores[backbone],
                    backbone=live, training=True, dtype=dtype,
                )
                builder.spec = replace(builder.spec, masked_reference_layer4=False)  # a GPU call (docstring)
                arm = f"{method}_sam_{backbone}_store_{str(dtype).split('.')[-1]}"
                cpu, wall = _rate(builder, batches, args.passes)
                arms[arm], walls[arm] = round(cpu, 2), round(wall, 2)
                print(f"{arm}: {arms[arm]} episodes per CPU-s ({walls[arm]} per wall-s)", file=sys.stderr, flush=True)

    resnet = build_encoder("resnet50_v2", allow_random_init=True)
    paths = [item.path for item in items[:32]]
    start = time.process_time()
    for path in paths:
        resnet.preprocess(load_rgb(path))
    result["decode_resnet50_preprocess_images_per_cpu_s"] = round(len(paths) / (time.process_time() - start), 2)
    layer3 = torch.randn(args.batch, 1024, 64, 64).relu()
    masks = torch.zeros(args.batch, 1, 512, 512)
    masks[..., 100:300, 150:400] = 1
    with torch.inference_mode():
        masked_reference_layer4(resnet, layer3, masks)
        start = time.process_time()
        masked_reference_layer4(resnet, layer3, masks)
    result["masked_layer4_cpu_s_per_episode_resnet50"] = round((time.process_time() - start) / args.batch, 4)

    rate = args.gpu_rate
    decode_s = 2 / result["decode_resnet50_preprocess_images_per_cpu_s"]  # target + reference image per episode
    # Online ResNet-50 (its taps computed on the GPU): the SAM read, masks and annotations (the
    # fp16 MobileNetV2-store arm, an upper bound: it also reads 1 MiB of taps) plus the two decodes.
    online = 1 / (1 / arms["vrp_sam_sam_mobilenet_v2_store_float16"] + decode_s)
    result["vrp_sam_sam_store_resnet50_online_episodes_per_cpu_s"] = round(online, 2)
    result["cores_per_gpu"] = {
        "gpu_episodes_per_s": rate,
        **{f"{arm}": math.ceil(rate / value) for arm, value in arms.items()},
        "vrp_sam_sam_store_resnet50_online": math.ceil(rate / online),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
