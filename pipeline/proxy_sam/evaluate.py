"""Measuring a proxy SAM on held-out coco_mini instances (never trained on: ``data.is_held_out``).

For every non-crowd instance of a held-out image whose tight box is at least 32 x 32 pixels of the
original image, separately for the fold's base and novel classes (mIoU = mean over instances of the
IoU, at the 512 squash frame: logits upsampled bilinearly 128 -> 512 and thresholded at 0, ground
truth nearest-squashed to 512):

* ``box``: the tight box of the instance (1024 frame), single-mask output;
* ``point_best`` / ``point_head``: one positive point at the instance's most interior pixel (maximum of
  its distance to the background, SAM's evaluation point), multimask output; the best of the three
  masks (oracle) and the one the IoU head ranks first;
* ``box_baseline``: the filled box itself as the mask;
* ``prompts_matter``: for each instance with another measured instance in the same image, the IoU
  between the proxy's masks for the two boxes (partner: the instance whose box overlaps least; lower
  means the prompt moves the mask); ``gt_pair_iou`` is the same for the ground-truth masks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.proxy_sam.data import CANVAS, HeldOutInstance, held_out_instances
from refseg_models.annotations import box_masks

FRAME = 1024


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel of ``mask`` (H x W bool) farthest from the background (chessboard distance by
    repeated 3 x 3 erosion, the image border counting as background); ties: nearest to the centroid
    of the deepest pixels, then the first in row-major order."""
    current = torch.from_numpy(mask.astype(np.float32))[None, None]
    current = F.pad(current, (1, 1, 1, 1))  # border = background
    deepest = current
    while True:
        eroded = -F.max_pool2d(-current, 3, stride=1, padding=1)
        if eroded.sum() == 0:
            break
        deepest, current = eroded, eroded
    ys, xs = torch.nonzero(deepest[0, 0] > 0, as_tuple=True)
    if len(xs) == 0:  # cannot happen for a non-empty mask
        ys, xs = torch.nonzero(current[0, 0] > 0, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    best = int(torch.argmin((ys.float() - cy) ** 2 + (xs.float() - cx) ** 2))
    return float(xs[best] - 1), float(ys[best] - 1)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks along the last two axes."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def box_mask(box: tuple[float, float, float, float], size: int = CANVAS) -> torch.Tensor:
    """A held-out instance's box on the canvas (corners rounded, half-open) -> size x size bool."""
    corners = torch.tensor([[float(round(v)) for v in box]])
    return box_masks(corners, (size, size), (size, size))[0]


@dataclass
class HeldOutSet:
    """Held-out instances with their 512 masks, interior points, and the images' MobileNetV2 maps."""

    instances: list[HeldOutInstance]
    masks: torch.Tensor  # N x 512 x 512 bool
    points: torch.Tensor  # N x 2 (x, y) in the 512 frame (pixel indices)
    by_image: dict[str, list[int]]
    features: dict[str, dict[str, torch.Tensor]]  # image id -> {layer: 1 x C x h x w}
    pairs: list[tuple[int, int]]

    @classmethod
    def build(cls, coco, held_out_ids, novel, features_of, min_side: int = 32) -> "HeldOutSet":
        """``features_of(image_id) -> {"layer2", "layer3", "layer4": 1 x C x h x w}`` (a store or a live
        MobileNetV2, see :func:`store_features` / :func:`live_features`)."""
        instances, mask_of = held_out_instances(coco, held_out_ids, novel, min_side=min_side)
        masks = torch.stack([torch.from_numpy(mask_of(inst)) for inst in instances])
        points = torch.tensor([interior_point(m.numpy()) for m in masks])
        by_image: dict[str, list[int]] = defaultdict(list)
        for n, inst in enumerate(instances):
            by_image[inst.image_id].append(n)
        features = {i: features_of(i) for i in by_image}
        return cls(instances, masks, points, dict(by_image), features, _pairs(instances, by_image))


def live_features(backbone, coco):
    """``features_of`` running ``backbone`` (the proxy's frozen MobileNetV2) on the image file."""

    @torch.no_grad()
    def features_of(image_id: str) -> dict[str, torch.Tensor]:
        image = coco.load_image(int(image_id))
        return backbone(backbone.preprocess(image)[None])

    return features_of


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pairs(instances: list[HeldOutInstance], by_image: dict[str, list[int]]) -> list[tuple[int, int]]:
    pairs = []
    for rows in by_image.values():
        for a in rows:
            others = [b for b in rows if b != a]
            if others:
                b = min(others, key=lambda o: (_box_iou(instances[a].box, instances[o].box), instances[o].annotation_id))
                pairs.append((a, b))
    return pairs


def _decode_image(neck, decoder, held: HeldOutSet, image_id: str, rows: list[int]):
    """Box masks (k x 512 x 512), single-point masks (k x 3 x 512 x 512) and their IoU-head scores."""
    from pipeline.proxy_sam.train import decode_group

    emb = neck(held.features[image_id]).expand(len(rows), -1, -1, -1)
    boxes = torch.tensor([held.instances[r].box for r in rows], dtype=torch.float32) * 2.0  # 1024 frame
    logits, _ = decode_group(decoder, emb, boxes=boxes)
    box_pred = F.interpolate(logits, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)[:, 0] > 0
    coords = (held.points[rows] * 2.0 + 0.5)[:, None, :]  # pixel centre in the 1024 frame
    labels = torch.ones(len(rows), 1, dtype=torch.int64)
    logits, scores = decode_group(decoder, emb, points=(coords, labels), multimask=True)
    point_pred = F.interpolate(logits, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False) > 0
    return box_pred, point_pred, scores


def _mean(values: torch.Tensor, select: torch.Tensor) -> float | None:
    return round(float(values[select].mean()), 4) if bool(select.any()) else None


@torch.no_grad()
def evaluate_proxy(neck, decoder, held: HeldOutSet) -> dict:
    """The quality numbers of ``docs/proxy_sam.md`` for one (neck, decoder) on ``held`` (image by
    image, so memory stays small)."""
    n = len(held.instances)
    box_iou, best, head, baseline = (torch.zeros(n) for _ in range(4))
    pair_pred, pair_gt = [], []
    pairs_of: dict[int, int] = dict(held.pairs)
    for image_id, rows in held.by_image.items():
        box_pred, point_pred, scores = _decode_image(neck, decoder, held, image_id, rows)
        gt = held.masks[rows]
        box_iou[rows] = iou(box_pred, gt)
        point_ious = iou(point_pred, gt[:, None])
        best[rows] = point_ious.max(dim=1).values
        head[rows] = point_ious.gather(1, scores.argmax(dim=1, keepdim=True))[:, 0]
        baseline[rows] = iou(torch.stack([box_mask(held.instances[r].box) for r in rows]), gt)
        local = {r: k for k, r in enumerate(rows)}
        for r in rows:
            if r in pairs_of:
                a, b = local[r], local[pairs_of[r]]
                pair_pred.append(float(iou(box_pred[a], box_pred[b])))
                pair_gt.append(float(iou(gt[a], gt[b])))
    novel = torch.tensor([inst.novel for inst in held.instances])
    out: dict = {}
    for name, select in (("base", ~novel), ("novel", novel)):
        out[name] = {
            "instances": int(select.sum()),
            "box": _mean(box_iou, select),
            "point_best": _mean(best, select),
            "point_head": _mean(head, select),
            "box_baseline": _mean(baseline, select),
        }
    if pair_pred:
        out["prompts_matter"] = {
            "pairs": len(pair_pred),
            "pred_pair_iou": round(float(np.mean(pair_pred)), 4),
            "gt_pair_iou": round(float(np.mean(pair_gt)), 4),
        }
    return out
