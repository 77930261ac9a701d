"""Derived copies of coco_mini for SegIC's mix tests and benches (no ADE20k or LVIS exist here).

* ``derive_ade20k``: an ADEChallengeData2016-format folder of the same real images and COCO
  annotations: ``images/training/<id>.jpg`` (symlinks), ``annotations/training/<id>.png`` label maps
  (COCO class c -> label c + 1, pixels no instance covers -> label 81 "background", crowd-only
  pixels -> 0 = ADE20k's "unlabelled", ignored), ``objectInfo150.csv`` naming the 150 labels.
* ``derive_lvis``: an LVIS-v1-format json of the same images and annotations: category ids moved
  (1000 + COCO id), LVIS-style names (``traffic_light``) with ``synonyms``, images named only by
  ``coco_url`` (``<root>/train2017/<file>`` symlinks), ``not_exhaustive_category_ids`` /
  ``neg_category_ids`` per image.

* ``derive_fss1000``: an FSS-1000-format folder: one folder per COCO class (spaces -> ``_``) holding
  up to ``per_class`` images of the class (``<n>.jpg`` symlinks, n = 1, 2, ...) and the class's mask
  ``<n>.png`` (white on black: the union of its non-crowd instances), HSNet-style ``trn.txt`` /
  ``val.txt`` / ``test.txt`` class lists (3 : 1 : 1 by sorted name), and ``coco_ids.json``
  ({``"<class>/<n>"``: COCO image id}, for pixel checks against the COCO annotations).

Image ids are kept (ADE20k file stems = the COCO ids), so the derived sources can share the COCO
feature stores as real LVIS (COCO 2017 images) does; FSS-1000's ``"<class>/<n>"`` ids need a store
of their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ADE_BACKGROUND_LABEL = 81


def _annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def derive_ade20k(coco_json: Path, image_dir: Path, root: Path) -> Path:
    data = json.loads(Path(coco_json).read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: index for index, c in enumerate(categories)}
    (root / "images" / "training").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in data["images"]:
        height, width = image["height"], image["width"]
        labels = np.full((height, width), ADE_BACKGROUND_LABEL, dtype=np.uint8)
        annotations = by_image.get(image["id"], [])
        covered = np.zeros((height, width), dtype=bool)
        for annotation in sorted((a for a in annotations if not a.get("iscrowd")), key=lambda a: -a["area"]):
            mask = _annotation_mask(annotation, height, width)
            labels[mask] = class_of[annotation["category_id"]] + 1
            covered |= mask
        for annotation in (a for a in annotations if a.get("iscrowd")):
            labels[_annotation_mask(annotation, height, width) & ~covered] = 0
        stem = str(image["id"])
        Image.fromarray(labels, mode="L").save(root / "annotations" / "training" / f"{stem}.png")
        link = root / "images" / "training" / f"{stem}.jpg"
        if not link.exists():
            os.symlink(Path(image_dir).resolve() / image["file_name"], link)
    names = [c["name"] for c in categories] + ["background"] + [f"unused class {i}" for i in range(82, 151)]
    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i + 1},0.0,0,0,{name}" for i, name in enumerate(names)]
    (root / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    return root


def derive_lvis(coco_json: Path, image_dir: Path, root: Path) -> Path:
    data = json.loads(Path(coco_json).read_text())
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    categories = []
    for category in sorted(data["categories"], key=lambda c: c["id"]):
        name = category["name"].replace(" ", "_")
        categories.append({"id": 1000 + category["id"], "name": name, "synonyms": [name], "frequency": "f"})
    present: dict[int, set[int]] = {}
    for annotation in data["annotations"]:
        present.setdefault(annotation["image_id"], set()).add(1000 + annotation["category_id"])
    images = []
    for image in data["images"]:
        cats = sorted(present.get(image["id"], set()))
        images.append({
            "id": image["id"], "height": image["height"], "width": image["width"],
            "coco_url": f"http://images.cocodataset.org/train2017/{image['file_name']}",
            "not_exhaustive_category_ids": cats[::2], "neg_category_ids": [],
        })
        link = root / "train2017" / image["file_name"]
        if not link.exists():
            os.symlink(Path(image_dir).resolve() / image["file_name"], link)
    annotations = [{**a, "category_id": 1000 + a["category_id"]} for a in data["annotations"]]
    out = root / "lvis_v1_train.json"
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out


def derive_fss1000(coco_json: Path, image_dir: Path, root: Path, per_class: int = 10) -> Path:
    data = json.loads(Path(coco_json).read_text())
    images = {image["id"]: image for image in data["images"]}
    by_class: dict[int, dict[int, list[dict]]] = {}
    for annotation in data["annotations"]:
        if not annotation.get("iscrowd"):
            by_class.setdefault(annotation["category_id"], {}).setdefault(annotation["image_id"], []).append(annotation)
    folders, coco_ids = [], {}
    for category in sorted(data["categories"], key=lambda c: c["id"]):
        chosen = sorted(by_class.get(category["id"], {}).items())[:per_class]
        if not chosen:
            continue
        folder = category["name"].replace(" ", "_")
        (root / folder).mkdir(parents=True, exist_ok=True)
        folders.append(folder)
        for n, (image_id, instances) in enumerate(chosen, start=1):
            image = images[image_id]
            mask = np.zeros((image["height"], image["width"]), dtype=bool)
            for annotation in instances:
                mask |= _annotation_mask(annotation, image["height"], image["width"])
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(root / folder / f"{n}.png")
            link = root / folder / f"{n}.jpg"
            if not link.exists():
                os.symlink(Path(image_dir).resolve() / image["file_name"], link)
            coco_ids[f"{folder}/{n}"] = image_id
    folders.sort()
    splits = {"trn": [f for i, f in enumerate(folders) if i % 5 < 3], "val": folders[3::5], "test": folders[4::5]}
    for split, names in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
    (root / "coco_ids.json").write_text(json.dumps(coco_ids))
    return root


class InProcessSummary:
    def __init__(self, written: int) -> None:
        self.written, self.failed = written, 0

    def text(self) -> str:
        return f"in-process extraction: {self.written} images"


def extract_in_process(items, output, encoder, dataset, batch_size: int = 16, **_: object) -> InProcessSummary:
    """What ``pipeline.extraction.stage.extract_store`` writes, without Ray (fast tests): the encoder on
    every ``(image_id, path)`` item, features cast to float16, one store."""
    import torch

    from pipeline.data.images import load_rgb
    from pipeline.store import FeatureSetKey, StoreBuilder, resolve_location, sorted_items

    built = encoder.build().eval()
    shapes = {name: tuple(int(s) for s in shape) for name, shape in built.output_shapes().items()}
    key = FeatureSetKey(dataset, built.encoder_id, encoder.weights_sha256(), built.preprocessing_id, "float16")
    ordered = sorted_items(items)
    builder = StoreBuilder(resolve_location(output), key, shapes, ordered, max(1, len(ordered)))
    written = 0
    with torch.no_grad():
        for spec in builder.prepare():
            writer = builder.writer(spec)
            batch = list(spec.items)
            for start in range(0, len(batch), batch_size):
                chunk = batch[start : start + batch_size]
                pixels = torch.stack([built.preprocess(load_rgb(item.path)) for item in chunk])
                out = built(pixels)
                for index, item in enumerate(chunk):
                    writer.add(item.image_id, {name: value[index].to(torch.float16).numpy() for name, value in out.items()})
                    written += 1
            writer.publish()
    builder.finalize()
    builder.close()
    return InProcessSummary(written)
