"""What serving SegIC's augmentations from a feature cache costs: accuracy, storage, compute.

    .venv/bin/python bench/bench_augmented_views.py [--episodes 200] [--query-images 64] [--views 1,2,4,8]

Real coco_mini images, the real MobileNetV2 (the one real encoder here; DINOv2 numbers need real
DINOv2 weights). Steps:

(a) feature-space flip vs the encoder on the flipped image: relative L2 and cosine per layer;
(b) cached views: a seeded plan of ``max(--views)`` views per query image is rendered to PNGs and
    cached, together with the plain images, by the unchanged Ray extraction stage
    (``extract_store``); seeded 1-shot episodes whose query is a FRESH augmented view are then
    segmented by training-free prototype matching with the query features recomputed on the exact
    view, flipped in feature space, or warped from the nearest cached view (plain image only, or
    plain image + V views); mIoU with HSNet's meter on the same episodes;
(c) storage per image and compute counts.
Results are printed and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import CocoInstances  # noqa: E402
from pipeline.extraction import RegistryEncoder, extract_store  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from pipeline.training.views import (  # noqa: E402
    AugmentationConfig,
    apply_view,
    plan_views,
    render_view_items,
    segic_instance_config,
    segic_semantic_config,
    write_plan,
)
from view_serving import encode_views, evaluate_view_serving, flip_equivariance, sample_view_episodes  # noqa: E402
from refseg_models.build import build_model  # noqa: E402
from refseg_models.encoders import build_encoder  # noqa: E402

SHARED = REPO.parent / "shared"
# Per-view feature sizes from docs/feature_store.md (fp16, in the tar).
PER_VIEW_MB = {"sam (256x64x64)": 2.10, "dinov2_vitl14@896 (1024x64x64)": 8.39}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--query-images", type=int, default=64)
    parser.add_argument("--views", default="1,2,4,8")
    parser.add_argument("--mode", choices=("lsj", "rrc"), default="lsj")
    parser.add_argument("--canvas", type=int, default=512, help="view canvas (MobileNetV2 squashes to 512)")
    parser.add_argument("--flip-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="renders + store (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    views = sorted({int(v) for v in args.views.split(",")})
    torch.set_num_threads(2)

    coco = SHARED / "data" / "coco_mini"
    checkpoint = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
    source = CocoInstances(coco / "instances.json", coco / "images", verbose=False)
    encoder = build_encoder("mobilenet_v2", checkpoint)
    config: AugmentationConfig = (segic_semantic_config if args.mode == "lsj" else segic_instance_config)(args.canvas)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_views_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": {**vars(args), "augmentation": config.__dict__}}

    # (a) flip equivariance on the first images by id
    started = time.perf_counter()
    flip_ids = source.image_ids()[: args.flip_images]
    images = [source.load_image(i) for i in flip_ids]
    original = encode_views(encoder, images)
    flipped = encode_views(encoder, [np.ascontiguousarray(image[:, ::-1]) for image in images])
    results["flip_equivariance"] = flip_equivariance(original, flipped)
    print(f"(a) feature flip vs recomputed flipped image, {len(flip_ids)} images ({time.perf_counter() - started:.0f} s)")
    for layer, values in results["flip_equivariance"].items():
        print(f"    {layer}: rel L2 {values['rel_l2']:.3f}  cosine {values['cosine']:.3f}")

    # (b) episodes over a seeded pool of query images
    rng = np.random.default_rng(args.seed)
    all_ids = [str(i) for i in source.image_ids() if source.classes_in_image(i)]
    query_ids = sorted(rng.choice(all_ids, size=min(args.query_images, len(all_ids)), replace=False), key=int)
    episodes = sample_view_episodes(source, query_ids, args.episodes, args.seed, config)
    sizes = {i: (int(source.image_info(i)["height"]), int(source.image_info(i)["width"])) for i in query_ids}
    plan = plan_views(sizes, max(views), args.seed, config)
    write_plan(plan, work / "plan.parquet")
    started = time.perf_counter()
    items = render_view_items(plan, lambda i: source.load_image(source.key(i)), work / "views")
    render_s = time.perf_counter() - started
    plain_ids = sorted({e.query_id for e in episodes} | {e.reference_id for e in episodes}, key=int)
    items += [(i, str(source.image_path(i))) for i in plain_ids]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = extract_store(
            items, str(work / "store"), RegistryEncoder("mobilenet_v2", str(checkpoint)), "coco_mini_segic_views",
            progress=False,
        )
    finally:
        ray.shutdown()
    results["episodes_skipped"] = args.episodes - len(episodes)
    print(f"(b) {len(episodes)} episodes ({args.episodes - len(episodes)} skipped: no view draw kept the class), "
          f"{len(query_ids)} query images, {len(plan)} cached views + "
          f"{len(plain_ids)} plain images; render {render_s:.0f} s; extraction stage: {summary.text()}")
    store = open_store(str(work / "store"))

    def cached(view):
        key = view.view_id if view.view >= 0 else view.image_id
        return {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in store.get(key).items()}

    # The cache holds what recomputation gives (same view): the difference is thread-count rounding.
    check = plan[0]
    direct = encode_views(encoder, [apply_view(source.load_image(source.key(check.image_id)), check)])[0]
    results["store_vs_recompute_max_abs"] = max(float((direct[k] - v).abs().max()) for k, v in cached(check).items())

    started = time.perf_counter()
    models = {layer: build_model("prototype_matching", feature=layer).eval() for layer in ("layer3", "layer4")}
    results["episodes"] = evaluate_view_serving(source, episodes, plan, encoder, cached, models, num_views=views)
    results["evaluate_s"] = time.perf_counter() - started
    results["extraction"] = {"images": summary.images, "seconds": summary.seconds, "failed": summary.failed}
    store_bytes = sum(p.stat().st_size for p in (work / "store").glob("shard-*.tar"))
    per_item = store_bytes / summary.written
    results["storage_mb_per_view_mobilenet_v2"] = per_item / 1e6
    print(f"    store vs recompute of the same view: max |diff| {results['store_vs_recompute_max_abs']:.2e}")
    print(f"    evaluation {results['evaluate_s']:.0f} s")
    print("| query features | mIoU l3 | mIoU l4 | dIoU/ep l3 (SE) | dIoU/ep l4 (SE) | FB-IoU l4 "
          "| rel L2 l2/l3/l4 | cosine l2/l3/l4 | coverage |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_episode = results["episodes"].pop("per_episode")
    results["per_episode"] = per_episode
    for arm, v in results["episodes"].items():
        d3, d4 = v["delta_iou"]["layer3"], v["delta_iou"]["layer4"]
        rel = "/".join(f"{v['rel_l2'][k]:.2f}" for k in ("layer2", "layer3", "layer4"))
        cos = "/".join(f"{v['cosine'][k]:.2f}" for k in ("layer2", "layer3", "layer4"))
        print(f"| {arm} | {v['miou']['layer3']:.2f} | {v['miou']['layer4']:.2f} | {d3[0]:+.2f} ({d3[1]:.2f}) "
              f"| {d4[0]:+.2f} ({d4[1]:.2f}) | {v['fbiou']['layer4']:.2f} | {rel} | {cos} | {v['coverage']:.3f} |")

    # The same deltas split by how the query view's magnification compares with the plain image's.
    zoom = np.array([e["zoom"] for e in per_episode])
    print("per-episode IoU - recompute's (points, SE), by query zoom vs the plain image:")
    print("| query features | " + " | ".join(f"{name} l3 | {name} l4" for name in ("zoom<0.5", "0.5-1", "zoom>=1")) + " |")
    for arm in results["episodes"]:
        cells = []
        for low, high in ((0, 0.5), (0.5, 1.0), (1.0, np.inf)):
            chosen = [e for e, z in zip(per_episode, zoom) if low <= z < high]
            for layer in ("layer3", "layer4"):
                d = 100 * np.array([e["iou"][arm][layer] - e["iou"]["recompute"][layer] for e in chosen])
                cells.append(f"{d.mean():+.2f} ({d.std(ddof=1) / np.sqrt(len(d)):.2f}, n={len(d)})" if len(d) > 1 else "-")
        print(f"| {arm} | " + " | ".join(cells) + " |")

    # (c) storage: plain image + V views per image
    print("(c) storage per image (plain + V views), MB")
    rows = {"mobilenet_v2 (measured)": per_item / 1e6, **PER_VIEW_MB}
    results["storage_mb_per_image"] = {
        name: {v: round(mb * (1 + v), 2) for v in [0, *views]} for name, mb in rows.items()
    }
    for name, by_v in results["storage_mb_per_image"].items():
        print(f"    {name}: " + ", ".join(f"V={v}: {mb}" for v, mb in by_v.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
