"""Small COCO fixtures the tests share: an id-ordered subset of a COCO json, and reference / target
pairs of one class whose masks cover a given share of the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def coco_subset(coco_json: Path, count: int, out: Path) -> Path:
    """The first ``count`` images (by id) of a COCO json and their annotations, written to ``out``."""
    data = json.loads(Path(coco_json).read_text())
    keep = {image["id"] for image in sorted(data["images"], key=lambda i: i["id"])[:count]}
    subset = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    out.write_text(json.dumps(subset))
    return out


def coco_class_pairs(coco_dir: Path, count: int, min_cover: float) -> list[list[tuple[Path, np.ndarray]]]:
    """``count`` pairs ``[(image path, H x W uint8 mask), (path, mask)]`` of two images of one class
    (classes and images in id order) whose non-crowd mask covers more than ``min_cover`` and less
    than half of the image; fewer suitable pairs in ``coco_dir`` fail the test."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_dir / "instances.json"))
    pairs = []
    for category in sorted(coco.cats):
        found = []
        for image_id in sorted(coco.getImgIds(catIds=[category])):
            info = coco.imgs[image_id]
            mask = np.zeros((info["height"], info["width"]), np.uint8)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[category], iscrowd=False)):
                mask |= coco.annToMask(ann).astype(np.uint8)
            if min_cover < mask.mean() < 0.5:
                found.append((coco_dir / "images" / info["file_name"], mask))
            if len(found) == 2:
                pairs.append(found)
                break
        if len(pairs) == count:
            return pairs
    raise AssertionError(f"too few suitable coco_mini pairs: {len(pairs)} of {count}")
