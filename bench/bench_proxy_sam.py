"""Quality and speed of the proxy SAM (docs/proxy_sam.md).

    python bench/bench_proxy_sam.py [--checkpoint FILE] [--shared ../shared] [--threads 1] [--json out.json]

Prints, for the shipped (sha256-verified) proxy file or ``--checkpoint``:

1. held-out coco_mini instances (boxes >= 32 x 32 original pixels), fold-0 base and novel classes
   separately: box-prompt mIoU, single-point mIoU (best of 3, IoU head's pick), the filled-box
   baseline, and the "prompts matter" pair IoU (``refseg proxy-sam evaluate`` computes the same);
2. free prompt tokens through the frozen proxy decoder: 50 tokens per episode, LayerNorm'd to unit
   scale, Adam lr 0.1, 50 steps, BCE + Dice at 512, on the 4 coco_mini episodes the overfit tests
   pick (first 4 classes with two images whose class mask covers 20-60% of the image); no q/k
   scaling or any other change to the decoder;
3. speed: the image encoder per image and the decoder per prompt (fp32, this machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # model_helpers: the overfit episodes, the free-token probe

from bench_output import emit  # noqa: E402
from model_helpers import fit_free_prompt_tokens, pick_overfit_episodes  # noqa: E402


def free_token_iou(encoder, decoder, coco) -> dict:
    episodes = pick_overfit_episodes(coco, 4)
    targets = []
    for class_id, _, target_id in episodes:
        mask = torch.from_numpy((coco.class_mask(target_id, class_id) == 1).astype(np.float32))[None, None]
        targets.append(F.interpolate(mask, size=(512, 512), mode="nearest")[0])
    target = torch.stack(targets)  # 4 x 1 x 512 x 512
    with torch.no_grad():
        images = torch.stack([encoder.preprocess(coco.load_image(t)) for _, _, t in episodes])
        embeddings = encoder(images)["image_embedding"]
    ious = fit_free_prompt_tokens(decoder, embeddings, target)
    return {"episodes": [list(e) for e in episodes], "iou": [round(float(v), 3) for v in ious],
            "mean_iou": round(float(ious.mean()), 3)}


def speed(encoder, decoder) -> dict:
    from pipeline.proxy_sam.train import decode_group

    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        encoder(x)
        start = time.perf_counter()
        for _ in range(3):
            emb = encoder(x)["image_embedding"]
        per_image = (time.perf_counter() - start) / 3
        boxes = torch.tensor([[100.0, 120.0, 600.0, 700.0]]).repeat(16, 1)
        decode_group(decoder, emb.expand(16, -1, -1, -1), boxes=boxes)
        start = time.perf_counter()
        decode_group(decoder, emb.expand(16, -1, -1, -1), boxes=boxes)
        per_prompt = (time.perf_counter() - start) / 16
    return {"encoder_s_per_image": round(per_image, 3), "decoder_s_per_prompt": round(per_prompt, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="proxy SAM file (default: the shipped asset, verified)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.data.coco import CocoInstances
    from pipeline.proxy_sam.commands import measure_checkpoint
    from refseg_models.encoders import build_encoder
    from refseg_models.encoders.sam_proxy import default_proxy_sam_checkpoint, proxy_sam_grid, sha256_of_file
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    coco_dir = args.shared / "data" / "coco_mini"
    backbone = args.shared / "weights" / "mobilenet_v2_imagenet.pth"
    path = args.checkpoint or default_proxy_sam_checkpoint()
    report: dict = {"checkpoint": str(path), "sha256": sha256_of_file(path), "bytes": path.stat().st_size,
                    "threads": args.threads}
    start = time.perf_counter()
    report["held_out"] = measure_checkpoint(path, coco_dir / "instances.json", coco_dir / "images", backbone)
    report["held_out_seconds"] = round(time.perf_counter() - start, 1)
    encoder = build_encoder("sam_proxy_mobilenet_v2", path, backbone_checkpoint=backbone)
    decoder = build_sam_decoder(path, image_embedding_size=proxy_sam_grid(path))
    coco = CocoInstances(coco_dir / "instances.json", coco_dir / "images", verbose=False)
    report["free_tokens"] = free_token_iou(encoder, decoder, coco)
    report["speed"] = speed(encoder, decoder)
    return emit(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
