"""COCO (2014/2017) and LVIS v1 instance annotations via pycocotools.

Class id = rank of the category id in sorted order (COCO: 0 = person ... 79 = toothbrush), as HSNet
define it (docs/protocol.md). Crowd regions (``iscrowd=1``), where a non-crowd instance of the class
does not cover them, are

* ``crowd="ignore"`` (default here): ``IGNORE_INDEX`` (255), neither foreground nor background;
* ``crowd="background"``: 0, as in the COCO-20i masks HSNet (and PFENet, whose parsing script they
  come from) evaluate on: HSNet's loader (``data/coco.py``) sets every pixel that is not the class's
  label to 0, and the official lists are reproduced by painting non-crowd annotations only (see
  ``docs/evaluation.md``). The HSNet-protocol evaluation job uses this by default.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Hashable
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from pipeline.data.base import IGNORE_INDEX, SegmentationSource
from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport

CROWD_MODES = ("ignore", "background")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with path.open() as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"annotation file {path} is not valid JSON: {error}") from error
    for required in ("images", "annotations", "categories"):
        if required not in data:
            raise DataError(f"annotation file {path} has no {required!r} list (not a COCO-style instances json)")
    return data


def _indexed_coco(dataset: dict) -> COCO:
    """pycocotools' ``COCO`` over ``dataset`` with the index ``createIndex()`` builds, built here:
    ``createIndex()`` prints "creating index... index created!", and in a Ray Train worker ``print``
    is patched into a logger call, so redirecting stdout does not silence it (one pair per worker per
    (re)start)."""
    coco = COCO()
    coco.dataset = dataset
    coco.anns = {annotation["id"]: annotation for annotation in dataset["annotations"]}
    coco.imgs = {image["id"]: image for image in dataset["images"]}
    coco.cats = {category["id"]: category for category in dataset["categories"]}
    coco.imgToAnns, coco.catToImgs = defaultdict(list), defaultdict(list)
    for annotation in dataset["annotations"]:
        coco.imgToAnns[annotation["image_id"]].append(annotation)
        coco.catToImgs[annotation["category_id"]].append(annotation["image_id"])
    return coco


class CocoInstances(SegmentationSource):
    """A COCO-style instances json plus its image folder.

    ``image_dir`` holds the files named by each image's ``file_name`` (2017 layout), or, with
    ``layout="2014"``, the HSNet layout ``image_dir/{train2014,val2014}/COCO_{split}_{id:012d}.jpg``.
    Annotations that reference unknown images or categories are skipped and counted in
    ``self.report`` (printed once at load unless ``verbose=False``); ``strict=True`` raises instead.
    ``crowd``: how crowd regions are labelled in class masks (module docstring).
    """

    name = "coco"

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        *,
        strict: bool = False,
        verbose: bool = True,
        crowd: str = "ignore",
    ) -> None:
        if crowd not in CROWD_MODES:
            raise ConfigError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
        self.crowd = crowd
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        data = _read_json(self.annotation_file)
        self.report = SkipReport(f"{self.name} annotations {self.annotation_file.name}")

        categories = sorted(data["categories"], key=lambda category: category["id"])
        self.category_ids: list[int] = [category["id"] for category in categories]
        self.class_names = [category["name"] for category in categories]
        self._class_of_category = {category_id: index for index, category_id in enumerate(self.category_ids)}

        images = {image["id"]: image for image in data["images"]}
        kept = []
        for annotation in data["annotations"]:
            if annotation.get("image_id") not in images:
                self.report.skip("annotation references an unknown image id", f"ann {annotation.get('id')}")
            elif annotation.get("category_id") not in self._class_of_category:
                self.report.skip("annotation references an unknown category id", f"ann {annotation.get('id')}")
            elif not annotation.get("segmentation"):
                self.report.skip("annotation has no segmentation", f"ann {annotation.get('id')}")
            else:
                kept.append(annotation)
        if strict and self.report:
            raise DataError(self.report.summary())
        if verbose:
            self.report.print()

        self.coco = _indexed_coco({**data, "annotations": kept})
        self._images = images
        self._image_ids = sorted(images)
        self._classes_of_image: dict[int, list[int]] = defaultdict(list)
        for image_id, annotations in self.coco.imgToAnns.items():
            classes = {self._class_of_category[a["category_id"]] for a in annotations if not a.get("iscrowd", 0)}
            self._classes_of_image[image_id] = sorted(classes)
        self._layout = "2017"

    # --- ids and files -------------------------------------------------------------------------
    def key(self, image_id: Hashable | str) -> int:
        try:
            key = int(image_id)
        except (TypeError, ValueError) as error:
            raise DataError(f"{self.name}: image id {image_id!r} is not an integer") from error
        if key not in self._images:
            raise DataError(f"{self.name}: image id {key} is not in {self.annotation_file}")
        return key

    def image_ids(self) -> list[int]:
        return list(self._image_ids)

    def has_image(self, image_id: int) -> bool:
        return int(image_id) in self._images

    def image_info(self, image_id: Hashable) -> dict:
        return self._images[self.key(image_id)]

    def image_path(self, image_id: Hashable) -> Path:
        return self.image_dir / self._file_name(self._images[self.key(image_id)])

    def _file_name(self, image: dict) -> str:
        return image["file_name"]

    def category_id(self, class_id: int) -> int:
        self._check_class(class_id)
        return self.category_ids[class_id]

    # --- masks ---------------------------------------------------------------------------------
    def classes_in_image(self, image_id: Hashable) -> list[int]:
        return list(self._classes_of_image.get(self.key(image_id), []))

    def images_of_class(self, class_id: int) -> list[int]:
        """Images with a non-crowd instance of the class, sorted by id."""
        self._check_class(class_id)
        candidates = self.coco.catToImgs.get(self.category_ids[class_id], [])
        return sorted({image_id for image_id in candidates if class_id in self._classes_of_image.get(image_id, [])})

    def render_class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        image = self._images[image_id]
        height, width = image["height"], image["width"]
        annotation_ids = self.coco.getAnnIds(imgIds=[image_id], catIds=[self.category_ids[class_id]])
        foreground = np.zeros((height, width), dtype=bool)
        crowd = np.zeros((height, width), dtype=bool)
        for annotation in self.coco.loadAnns(annotation_ids):
            try:
                instance = self.coco.annToMask(annotation).astype(bool)
            except Exception as error:  # pycocotools raises bare exceptions on malformed polygons
                raise DataError(
                    f"{self.annotation_file}: annotation {annotation.get('id')} of image {image_id} "
                    f"has a malformed segmentation: {error}"
                ) from error
            if instance.shape != (height, width):
                raise DataError(
                    f"{self.annotation_file}: annotation {annotation.get('id')} mask is {instance.shape}, "
                    f"image {image_id} is {(height, width)}"
                )
            (crowd if annotation.get("iscrowd", 0) else foreground)[instance] = True
        mask = foreground.astype(np.uint8)
        if self.crowd == "ignore":
            mask[crowd & ~foreground] = IGNORE_INDEX
        return mask

    @property
    def mask_variant(self) -> str:
        """Part of the mask cache key: masks rendered with another crowd rule are other masks."""
        return f"crowd={self.crowd}"

    def instance_masks(self, image_id: Hashable) -> list[tuple[int, np.ndarray]]:
        """Non-crowd instances of an image as (class id, bool mask) (SegIC's instance-level data)."""
        key = self.key(image_id)
        instances = []
        for annotation in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[key], iscrowd=False)):
            instances.append(
                (self._class_of_category[annotation["category_id"]], self.coco.annToMask(annotation).astype(bool))
            )
        return instances


class Coco2014Instances(CocoInstances):
    """COCO 2014 annotations with images in ``image_dir/{train2014,val2014}/COCO_<split>_<id>.jpg``."""

    def _file_name(self, image: dict) -> str:
        name = image["file_name"]
        if name.startswith("COCO_train2014_"):
            return f"train2014/{name}"
        if name.startswith("COCO_val2014_"):
            return f"val2014/{name}"
        return name


class LvisInstances(CocoInstances):
    """LVIS v1 (COCO-like json, 1203 categories; images are COCO 2017 files named by ``coco_url``).

    LVIS is federated: an image's ``not_exhaustive_category_ids`` may miss instances, so for those
    (image, class) pairs everything outside the annotated instances is marked ignore rather than
    background; ``neg_category_ids`` are verified absent (their masks are all background).
    """

    name = "lvis"

    def _file_name(self, image: dict) -> str:
        if "coco_url" in image:
            # http://images.cocodataset.org/train2017/000000391895.jpg -> train2017/000000391895.jpg
            return "/".join(image["coco_url"].split("/")[-2:])
        return image["file_name"]

    def render_class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        mask = super().render_class_mask(image_id, class_id)
        if self.category_ids[class_id] in self._images[image_id].get("not_exhaustive_category_ids", []):
            mask[mask == 0] = IGNORE_INDEX
        return mask
