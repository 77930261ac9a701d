"""Training step time from the feature stores vs recomputing the frozen encoders (issue: training layer).

One VRP-SAM / ProSAM training step on a batch of B episodes (B = 2, the authors' per-GPU batch),
the paper's geometry (512 input, SAM 1024 -> 256 x 64 x 64, ResNet-50 v2 layer2/3/4 at 64 x 64),
random weights (speed only), timed per component and composed into two arms:

* ``store``: the SAM embeddings and the backbone maps read from stores (fp16 host arrays of the
  stores' sizes, copied to the device and cast), the masked-reference layer4 (the one live backbone
  call), and the trainable step (forward, criterion, backward, AdamW);
* ``store_online_backbone``: SAM from its store, the backbone computed live (refseg's default for
  ResNet-50, whose maps are 29 MB per image);
* ``recompute``: both frozen encoders run on the images every step (no feature cache).

Also the proxy SAM (MobileNetV2 + neck, cached here as SAM is) when its checkpoint is given.
Prints one JSON line; ``--out`` writes it too. On a GPU machine it also estimates the time of one
50-epoch COCO-20i fold (fold 0: 95,476 training pairs = episodes per HSNet epoch).

    python bench/bench_step_time.py --device cpu --reps 2           # CPU (minutes: ViT-B at 1024)
    python bench/bench_step_time.py --device cuda --sam vit_b vit_h  # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_output import provenance  # noqa: E402

from refseg_models import build_model  # noqa: E402
from refseg_models.encoders import build_encoder  # noqa: E402
from refseg_models.method import split_target  # noqa: E402
from refseg_models.modeling.inputs import EpisodeFeatures  # noqa: E402
from refseg_models.modeling.pseudo_mask import masked_reference_layer4  # noqa: E402
from refseg_models.recipes import build_optimizer, recipe_for  # noqa: E402

COCO20I_FOLD0_TRAIN_PAIRS = 95_476


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sam", nargs="+", default=["vit_b"], help="SAM image encoders to time (vit_b, vit_l, vit_h)")
    parser.add_argument("--methods", nargs="+", default=["vrp_sam", "prosam"])
    parser.add_argument("--proxy-checkpoint", help="time the proxy SAM too (its file)")
    parser.add_argument("--mobilenet-checkpoint", help="the proxy's MobileNetV2 weights")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b = args.batch
    torch.manual_seed(0)
    pixels = torch.randn(2 * b, 3, 512, 512, device=device)  # targets and references, normalised
    masks = torch.zeros(b, 1, 512, 512, device=device)
    masks[..., 128:384, 96:416] = 1
    targets, valid = split_target((masks[:, 0] > 0).to(torch.uint8))
    result: dict = {"device": str(device), "batch": b, **provenance()}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        result["cpu_threads"] = torch.get_num_threads()

    backbone = build_encoder("resnet50_v2", allow_random_init=True).to(device)
    with torch.no_grad():
        result["backbone_s"] = timed(lambda: backbone(pixels), device, args.reps)
        maps = backbone(pixels)
        result["masked_layer4_s"] = timed(lambda: masked_reference_layer4(backbone, maps["layer3"][b:], masks), device, args.reps)
        masked = masked_reference_layer4(backbone, maps["layer3"][b:], masks)
    # what store reads return: fp16 host arrays (SAM: targets; backbone: targets + references)
    host = {"sam": torch.randn(b, 256, 64, 64, dtype=torch.float16), **{k: v.half().cpu() for k, v in maps.items()}}
    if device.type == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}
    result["read_sam_s"] = timed(lambda: host["sam"].to(device, non_blocking=True).float(), device, args.reps)
    result["read_backbone_s"] = timed(
        lambda: [host[k].to(device, non_blocking=True).float() for k in ("layer2", "layer3", "layer4")], device, args.reps
    )
    sam_fp16 = host["sam"]

    for variant in args.sam:
        encoder = build_encoder(f"sam_{variant}", allow_random_init=True).to(device)
        with torch.no_grad():
            result[f"sam_{variant}_encoder_s"] = timed(lambda: encoder(pixels[:b]), device, max(1, min(args.reps, 3)))
    if args.proxy_checkpoint:
        proxy = build_encoder("sam_proxy_mobilenet_v2", args.proxy_checkpoint, backbone_checkpoint=args.mobilenet_checkpoint).to(device)
        proxy_pixels = torch.randn(b, 3, 512, 512, device=device)
        with torch.no_grad():
            result["sam_proxy_encoder_s"] = timed(lambda: proxy(proxy_pixels), device, args.reps)

    embedding = sam_fp16.to(device).float()
    for method in args.methods:
        model = build_model(method, allow_random_init=True).to(device).train()
        optimizer = build_optimizer(model, recipe_for(method, "coco20i"))
        reads_references = model.feature_spec().reference_sam  # FCP: the references' SAM embeddings too
        features = EpisodeFeatures(
            reference_masks=masks, target_sam=embedding,
            reference_sam=embedding[:, None] if reads_references else None,
            target_backbone={k: v[:b] for k, v in maps.items()},
            reference_backbone={k: v[b:, None] for k, v in maps.items()},
            reference_masked_layer4=masked[:, None],
        )
        sam_images = 2 if reads_references else 1

        def step():
            losses = model.loss(model(features), targets, valid)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

        step_s = timed(step, device, args.reps)
        live = result["masked_layer4_s"] + step_s
        store = sam_images * result["read_sam_s"] + result["read_backbone_s"] + live
        online = sam_images * result["read_sam_s"] + result["backbone_s"] + live
        row = {"step_s": step_s, "store_arm_s": store, "store_online_backbone_arm_s": online,
               "store_steps_per_s": 1.0 / store, "store_online_backbone_steps_per_s": 1.0 / online}
        for variant in args.sam:
            recompute = sam_images * result[f"sam_{variant}_encoder_s"] + result["backbone_s"] + live
            row[f"recompute_{variant}_s"] = recompute
            row[f"ratio_{variant}"] = recompute / store
            row[f"ratio_{variant}_online_backbone"] = recompute / online
        if "sam_proxy_encoder_s" in result:
            row["ratio_proxy"] = (sam_images * result["sam_proxy_encoder_s"] + result["backbone_s"] + live) / store
        if device.type == "cuda":
            samples = 50 * COCO20I_FOLD0_TRAIN_PAIRS
            row["fold0_50_epochs_hours_1gpu"] = samples / (b / store) / 3600
            row["fold0_50_epochs_hours_1gpu_online_backbone"] = samples / (b / online) / 3600
        result[method] = row
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
