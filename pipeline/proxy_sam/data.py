"""Data of the proxy SAM: the held-out split, the training instances and the held-out instances.

* **Held-out images** (:func:`is_held_out`): one image in five, chosen by ``sha256(salt + image id)``,
  independent of which other images exist. They are never trained on, and every quality number of
  ``docs/proxy_sam.md`` is measured on them.
* **Training instances** (:func:`instances_of`): the non-crowd instances of a fold's BASE classes in
  the training images; novel-class instances of the fold are never targets
  (:func:`check_no_excluded_ids`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.coco import CocoInstances
from pipeline.data.folds import base_classes, novel_classes
from pipeline.errors import DataError
from pipeline.training.views import apply_view_to_mask, base_view

HELD_OUT_SALT = "refseg-proxy-sam-heldout"
HELD_OUT_MODULUS = 5  # one image in five is held out
CANVAS = 512  # the VRP-SAM / MobileNetV2 squash frame


def is_held_out(image_id: object) -> bool:
    """True for the ~20% of images the proxy SAM never trains on (hash of the id: stable, list-independent)."""
    digest = hashlib.sha256(f"{HELD_OUT_SALT}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_MODULUS == 0


def split_images(image_ids: Sequence[object]) -> tuple[list[str], list[str]]:
    """(training ids, held-out ids), both sorted as strings."""
    ids = sorted(str(i) for i in image_ids)
    return [i for i in ids if not is_held_out(i)], [i for i in ids if is_held_out(i)]


def plain_view(coco: CocoInstances, image_id: str):
    """The plain image as the store holds it (squashed to 512), as a ``ViewParams``."""
    info = coco.image_info(image_id)
    return base_view(str(image_id), info["height"], info["width"], CANVAS, keep_aspect=False)


def instances_of(coco: CocoInstances, image_id: str, classes: set[int]) -> list[tuple[int, int, np.ndarray]]:
    """(class id, annotation id, full-size bool mask) of the non-crowd instances of ``classes``."""
    key = coco.key(image_id)
    out = []
    for ann in coco.coco.loadAnns(coco.coco.getAnnIds(imgIds=[key], iscrowd=False)):
        class_id = coco._class_of_category[ann["category_id"]]
        if class_id in classes:
            out.append((class_id, int(ann["id"]), coco.coco.annToMask(ann).astype(bool)))
    return out


def mask_box(mask512: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box ``(x0, y0, x1, y1)`` of a non-empty mask, exclusive right/bottom (pixel edges)."""
    ys, xs = np.nonzero(mask512)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def check_no_excluded_ids(class_ids: Sequence[int], excluded: Sequence[int]) -> None:
    """Raise DataError when any training instance belongs to an excluded (novel) class."""
    bad = sorted(set(int(c) for c in class_ids) & set(int(c) for c in excluded))
    if bad:
        raise DataError(f"proxy-SAM training instances contain excluded (novel) classes {bad}")


def fold_classes_for(fold: int) -> tuple[list[int], list[int]]:
    """(base classes, novel classes) of COCO-20i ``fold``."""
    return base_classes("coco20i", fold), novel_classes("coco20i", fold)


# --------------------------------------------------------------------------------------------------
# Held-out instances for measurement
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOutInstance:
    image_id: str
    annotation_id: int
    class_id: int
    novel: bool
    box: tuple[float, float, float, float]  # 512 frame, exclusive right/bottom


def held_out_instances(
    coco: CocoInstances, held_out_ids: Sequence[str], novel: Sequence[int], min_side: int = 32
) -> tuple[list[HeldOutInstance], Callable[[HeldOutInstance], np.ndarray]]:
    """Every non-crowd instance of the held-out images whose tight box is at least ``min_side`` x
    ``min_side`` pixels IN THE ORIGINAL IMAGE, and a function giving its 512 x 512 bool mask
    (nearest squash, the frame the proxy predicts in)."""
    novel_set = set(int(c) for c in novel)
    found, masks = [], {}
    for image_id in sorted(held_out_ids, key=str):
        view = plain_view(coco, image_id)
        for class_id, ann_id, mask in instances_of(coco, image_id, set(range(coco.num_classes))):
            ys, xs = np.nonzero(mask)
            if len(xs) == 0 or xs.max() - xs.min() + 1 < min_side or ys.max() - ys.min() + 1 < min_side:
                continue
            m512 = apply_view_to_mask(mask, view, fill=0)
            if not m512.any():
                continue
            inst = HeldOutInstance(str(image_id), ann_id, class_id, class_id in novel_set, mask_box(m512))
            found.append(inst)
            masks[(inst.image_id, ann_id)] = np.packbits(m512)
    return found, lambda inst: np.unpackbits(masks[(inst.image_id, inst.annotation_id)])[: CANVAS * CANVAS].reshape(
        CANVAS, CANVAS
    ).astype(bool)


def describe_split(coco: CocoInstances) -> str:
    train, held = split_images(coco.image_ids())
    return json.dumps({"train_images": len(train), "held_out_images": len(held)})
