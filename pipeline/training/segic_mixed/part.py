"""One source of the mix as the sampler reads it (worker side): the classes, images and instances it
may draw, each image's size and labelled classes, its label masks, its store and cached-view plan.

The driver resolves the sources against a fold from the raw datasets
(:mod:`pipeline.training.segic_mixed.sources`) and writes each part into the fold's prepared artifact
(:mod:`pipeline.training.segic_mixed.preparation`); the workers read it back with :func:`read_parts`:
instances as COCO RLE strings (decoded by :func:`pipeline.store.rle.decode_rle`), semantic label
masks through the artifact's mask store. Tables per part ``i`` (``mix_<i>_*.parquet``):

* ``images``: ``image_id, height, width, eligible, classes, present``: every image the part may read;
  ``eligible`` rows, in order, are the images it draws (``images``); ``classes``: ADE20k / FSS-1000's
  drawable classes of the image; ``present``: semantic data's labelled classes (queue negatives);
* ``class_images``: ``class_id, image_id``: semantic data's images of each drawable class, in order;
* ``instances``: ``image_id, class_id, rle, height, width``: instance data's usable, non-crowd
  instances of each image, in the annotation file's order;
* ``masks``: the mask index (semantic data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError
from pipeline.store.rle import decode_rle
from pipeline.training.config import TrainConfig
from pipeline.training.features import encoder_identity
from pipeline.training.mix_config import MixSource
from pipeline.training.prepared import PreparedArtifact
from pipeline.training.views import AugmentationConfig, ViewParams, read_plan, view_id

MIX_FILE = "mix"
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("eligible", pa.bool_()),
    ("classes", pa.list_(pa.int32())), ("present", pa.list_(pa.int32())),
])
CLASS_IMAGES_SCHEMA = pa.schema([("class_id", pa.int32()), ("image_id", pa.string())])
INSTANCES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("class_id", pa.int32()), ("rle", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()),
])


class Instance(NamedTuple):
    """One instance of an image: its class and its mask as a compressed COCO RLE string."""

    class_id: int
    rle: str
    height: int
    width: int

    def mask(self) -> np.ndarray:
        """H x W uint8 {0, 1}."""
        return decode_rle(self.rle, self.height, self.width)


@dataclass
class MixPart:
    """One source of the mix with everything the sampler reads (module docstring)."""

    spec: MixSource
    store_uri: str
    feature_dataset: str
    plan_path: str
    augmentation: AugmentationConfig
    class_names: list[str] = field(default_factory=list)  # the source's class names, by class id
    class_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # class id -> key (-1: never used)
    # semantic: eligible class -> its images (>= 2); ADE20k / FSS-1000: eligible classes per image
    class_images: dict[int, list[str]] = field(default_factory=dict)
    image_classes: dict[str, list[int]] = field(default_factory=dict)
    # instance data and ADE20k / FSS-1000: the images drawn
    images: list[str] = field(default_factory=list)
    usable_classes: set[int] = field(default_factory=set)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (height, width) of every image read
    present: dict[str, list[int]] = field(default_factory=dict)  # semantic: labelled classes per image
    instances: dict[str, list[Instance]] = field(default_factory=dict)  # instance data: usable instances
    masks: Any = None  # semantic: label masks by (image id, class id)
    store: Any = None
    plan: dict[str, list[ViewParams]] = field(default_factory=dict)
    _positions: dict[int, dict[str, int]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def semantic(self) -> bool:
        return self.spec.semantic

    @property
    def views(self) -> int:
        return self.spec.views

    @property
    def labels_every_class(self) -> bool:
        """Whether a class missing from an image's labels is absent from it (so it can be a queue
        negative): not for FSS-1000, whose images label their folder's class only."""
        return self.spec.kind != "fss1000_semantic"

    def position(self, class_id: int, image_id: str) -> int:
        """Index of ``image_id`` in ``class_images[class_id]`` (memoised per class)."""
        positions = self._positions.get(class_id)
        if positions is None:
            positions = self._positions[class_id] = {i: k for k, i in enumerate(self.class_images[class_id])}
        return positions[image_id]

    def size(self, image_id: str) -> tuple[int, int]:
        """(height, width) of an image."""
        return self.sizes[image_id]

    def candidate_keys(self) -> set[int]:
        """Keys of the classes this source may use (negatives of a target are drawn from these)."""
        return {int(self.class_keys[c]) for c in self.usable_classes if self.class_keys[c] >= 0}

    def sampled_images(self) -> list[str]:
        if self.spec.kind == "coco_semantic":
            return sorted({i for images in self.class_images.values() for i in images}, key=str)
        return list(self.images)


def backbone_preprocessing(cfg: TrainConfig) -> str:
    """The preprocessing id of the fold's backbone (the frame the plain images' features are in)."""
    return encoder_identity(cfg.backbone).preprocessing_id


def needed_ids(part: MixPart) -> tuple[set[str], set[str]]:
    """(plain image ids, view ids) this source reads from its store for the fold."""
    images = part.sampled_images()
    views = {view_id(i, k) for i in images for k in range(part.views)}
    plain = set(images) if (part.semantic or not part.views) else set()
    return plain, views


def load_plans(parts: Sequence[MixPart]) -> None:
    """Each part's cached views of the images it reads, from its view plan (a file next to the store)."""
    for part in parts:
        if not part.views:
            continue
        plan: dict[str, list[ViewParams]] = {}
        for view in read_plan(part.plan_path):
            plan.setdefault(view.image_id, []).append(view)
        for image_id in part.sampled_images():
            views = sorted(plan.get(image_id, []), key=lambda v: v.view)[: part.views]
            if len(views) < part.views:
                raise DataError(f"view plan {part.plan_path} has {len(views)} view(s) of image {image_id}, "
                                f"{part.spec.name} reads {part.views}")
            if views[0].canvas != part.augmentation.canvas:
                raise DataError(f"view plan {part.plan_path}: canvas {views[0].canvas}, the mix expects "
                                f"{part.augmentation.canvas}")
            part.plan[image_id] = views


def part_record(part: MixPart, mask_folder: str | None) -> dict[str, Any]:
    """What ``mix.json`` holds of a part (the rest is in its tables)."""
    return {"name": part.name, "store_uri": part.store_uri, "feature_dataset": part.feature_dataset,
            "plan_path": part.plan_path, "augmentation": asdict(part.augmentation), "class_names": part.class_names,
            "class_keys": [int(k) for k in part.class_keys], "usable_classes": sorted(part.usable_classes),
            "mask_folder": mask_folder}


def read_parts(cfg: TrainConfig, artifact: PreparedArtifact) -> list[MixPart]:
    """The mix's parts as the driver prepared them for this fold (stores not opened yet)."""
    records = artifact.read_json(MIX_FILE)
    specs = cfg.mix.active_sources()
    if [r["name"] for r in records] != [s.name for s in specs]:
        raise DataError(f"prepared fold {artifact.ref.uri} holds the mix sources {[r['name'] for r in records]}, "
                        f"the configuration has {[s.name for s in specs]}")
    return [_read_part(artifact, index, spec, record) for index, (spec, record) in enumerate(zip(specs, records))]


def _read_part(artifact: PreparedArtifact, index: int, spec: MixSource, record: dict[str, Any]) -> MixPart:
    augmentation = {k: tuple(v) if isinstance(v, list) else v for k, v in record["augmentation"].items()}
    part = MixPart(spec, record["store_uri"], record["feature_dataset"], record["plan_path"],
                   AugmentationConfig(**augmentation), list(record["class_names"]),
                   np.asarray(record["class_keys"], dtype=np.int64), usable_classes=set(record["usable_classes"]))
    images = artifact.read_table(f"mix_{index}_images", IMAGES_SCHEMA).to_pylist()
    for row in images:
        part.sizes[row["image_id"]] = (row["height"], row["width"])
        if row["eligible"]:
            part.images.append(row["image_id"])
            if row["classes"]:
                part.image_classes[row["image_id"]] = list(row["classes"])
        if spec.semantic:
            part.present[row["image_id"]] = list(row["present"])
    if spec.semantic:
        for row in artifact.read_table(f"mix_{index}_class_images", CLASS_IMAGES_SCHEMA).to_pylist():
            part.class_images.setdefault(row["class_id"], []).append(row["image_id"])
        part.masks = artifact.masks(f"mix_{index}_masks", record["mask_folder"])
    else:
        for row in artifact.read_table(f"mix_{index}_instances", INSTANCES_SCHEMA).to_pylist():
            part.instances.setdefault(row["image_id"], []).append(
                Instance(row["class_id"], row["rle"], row["height"], row["width"]))
    return part
