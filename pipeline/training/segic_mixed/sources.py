"""The mix's sources resolved against a fold (driver side): which classes, images and instances
each source may draw, the class keys shared by normalised name, and what each reads from its store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.base import SegmentationSource
from pipeline.data.coco import LvisInstances
from pipeline.data.folds import COCO_CLASS_NAMES, normalise_name, novel_classes
from pipeline.data.mask_cache import MaskCache
from pipeline.data.semantic import Ade20k, Fss1000
from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport
from pipeline.training.config import TrainConfig
from pipeline.training.features import encoder_identity
from pipeline.training.mix_config import MixSource
from pipeline.training.views import AugmentationConfig, ViewParams, segic_instance_config, segic_semantic_config, view_id
from refseg_models.frames import frame_size_of


# --------------------------------------------------------------------------------------------------
# Sources of the mix, resolved against a fold
# --------------------------------------------------------------------------------------------------
@dataclass
class MixPart:
    """One source of the mix with everything the sampler reads: the data source, its label masks,
    its store and cached-view plan, and which classes / images / instances it may draw."""

    spec: MixSource
    source: SegmentationSource
    masks: MaskCache
    store_uri: str
    feature_dataset: str
    plan_path: str
    augmentation: AugmentationConfig
    synonyms: list[set[str]]  # per source class: normalised names
    class_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # class id -> key (-1: never used)
    # semantic: eligible class -> its images (>= 2); ADE20k / FSS-1000: eligible classes per image
    class_images: dict[int, list[str]] = field(default_factory=dict)
    image_classes: dict[str, list[int]] = field(default_factory=dict)
    # instance: eligible images (at least one usable instance)
    images: list[str] = field(default_factory=list)
    usable_classes: set[int] = field(default_factory=set)
    store: Any = None
    plan: dict[str, list[ViewParams]] = field(default_factory=dict)
    has_plain: bool = True
    _positions: dict[int, dict[str, int]] = field(default_factory=dict, repr=False)
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

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
        """(height, width) of an image (memoised)."""
        if image_id not in self._sizes:
            self._sizes[image_id] = _image_size(self, image_id)
        return self._sizes[image_id]

    def candidate_keys(self) -> set[int]:
        """Keys of the classes this source may use (negatives of a target are drawn from these)."""
        return {int(self.class_keys[c]) for c in self.usable_classes if self.class_keys[c] >= 0}

    def sampled_images(self) -> list[str]:
        if self.semantic:
            if self.spec.kind == "coco_semantic":
                return sorted({i for images in self.class_images.values() for i in images}, key=str)
            return list(self.images)
        return list(self.images)


def _coco_synonyms(source: SegmentationSource) -> list[set[str]]:
    out = []
    categories = {c["id"]: c for c in getattr(source, "coco").dataset.get("categories", [])}
    for class_id, name in enumerate(source.class_names):
        names = {normalise_name(name)}
        category = categories.get(source.category_ids[class_id], {})
        names.update(normalise_name(s) for s in category.get("synonyms", []) or [])
        out.append(names)
    return out


def _ade_synonyms(source: Ade20k) -> list[set[str]]:
    info = Path(source.root) / "objectInfo150.csv"
    if info.is_file():
        rows = info.read_text().strip().splitlines()[1:]
        synonyms = [{normalise_name(n) for n in row.split(",")[-1].split(";") if n.strip()} for row in rows]
        if len(synonyms) == source.num_classes:
            return synonyms
    return [{normalise_name(name)} for name in source.class_names]


def _fss_source(spec: MixSource) -> Fss1000:
    """The FSS-1000 split of a source: the class folders its class list names (one a line)."""
    classes = [line.strip() for line in Path(spec.class_list).read_text().splitlines() if line.strip()]
    if not classes:
        raise DataError(f"mix source {spec.name!r}: the FSS-1000 class list {spec.class_list} names no class")
    return Fss1000(spec.images, classes)


def check_source_paths(sources: Sequence[MixSource]) -> None:
    """Every path the non-COCO sources read exists: checked before any source is read or any store
    extracted, so a wrong path costs nothing."""
    for spec in sources:
        for what, path in spec.required_paths():
            if not Path(path).exists():
                raise DataError(f"mix source {spec.name!r} ({spec.kind}): {what} not found: {path}")


def _resolve_spec(cfg: TrainConfig, spec: MixSource) -> tuple[str, str, str, AugmentationConfig]:
    """(store uri, feature dataset, plan path, augmentation) of a source, defaults applied."""
    if spec.coco and (spec.annotations or spec.images) and (
        Path(spec.annotations or cfg.annotations).resolve() != Path(cfg.annotations).resolve()
        or Path(spec.images or cfg.images).resolve() != Path(cfg.images).resolve()
    ):
        raise ConfigError(f"mix source {spec.name!r}: the COCO kinds use the fold's --annotations / --images")
    store = spec.store or cfg.backbone.store
    if not store:
        raise ConfigError(f"mix source {spec.name!r}: no feature store (configure the backbone store)")
    dataset = spec.feature_dataset or (cfg.feature_dataset if store == cfg.backbone.store else spec.name)
    plan = spec.view_plan or (f"{store.rstrip('/')}.views.parquet" if spec.views else "")
    if spec.views and "://" in plan:
        raise ConfigError(f"mix source {spec.name!r}: the view plan must be a local file, got {plan}")
    canvas = spec.view_canvas or frame_size_of(_backbone_preprocessing(cfg))
    augmentation = segic_semantic_config(canvas) if spec.semantic else segic_instance_config(canvas)
    return store, dataset, plan, augmentation


def _backbone_preprocessing(cfg: TrainConfig) -> str:
    return encoder_identity(cfg.backbone).preprocessing_id


def _check_shared_stores(parts: Sequence[MixPart]) -> None:
    """Sources sharing a store with cached views must share the view plan (same ids, same views)."""
    by_store: dict[str, MixPart] = {}
    for part in parts:
        if not part.views:
            continue
        other = by_store.setdefault(part.store_uri, part)
        if other is part:
            continue
        mine = (part.augmentation, part.views, part.spec.view_seed, part.plan_path)
        theirs = (other.augmentation, other.views, other.spec.view_seed, other.plan_path)
        if mine != theirs:
            raise ConfigError(
                f"mix sources {other.name!r} and {part.name!r} keep cached views in one store ({part.store_uri}) "
                "with different augmentations / view counts / seeds: a view id names one view, give them separate stores"
            )


def build_parts(cfg: TrainConfig, data: Any, report: SkipReport | None = None) -> list[MixPart]:
    """The active sources of ``cfg.mix`` resolved against the fold's data (``load_fold_data``):
    usable classes (base classes only for COCO; novel names kept out of the others when
    ``novel_by_name``), their images, and the global class keys (shared by normalised name)."""
    report = report if report is not None else SkipReport("segic mix")
    mix = cfg.mix
    novel = set(novel_classes(cfg.dataset, cfg.fold)) if cfg.dataset == "coco20i" else set()
    novel_names = {normalise_name(COCO_CLASS_NAMES[c]) for c in novel}
    parts: list[MixPart] = []
    check_source_paths(mix.active_sources())
    for spec in mix.active_sources():
        store, dataset, plan, augmentation = _resolve_spec(cfg, spec)
        if spec.coco:
            if cfg.dataset != "coco20i":
                raise ConfigError(f"mix source {spec.name!r}: the COCO kinds need a COCO-20i fold")
            source, masks = data.source, data.masks
            synonyms = _coco_synonyms(source)
        elif spec.kind == "lvis_instances":
            source = LvisInstances(spec.annotations, spec.images, verbose=False, crowd=cfg.crowd)
            masks = MaskCache(source)
            synonyms = _coco_synonyms(source)
        elif spec.kind == "fss1000_semantic":
            source = _fss_source(spec)
            masks = MaskCache(source)
            synonyms = [{normalise_name(name)} for name in source.class_names]  # FSS-1000 ships no synonyms
        else:
            source = Ade20k(spec.images, spec.split)
            masks = MaskCache(source)
            synonyms = _ade_synonyms(source)
        parts.append(MixPart(spec, source, masks, store, dataset, plan, augmentation, synonyms))
    _check_shared_stores(parts)

    # global class keys: one per normalised primary name, over every active source
    vocabulary = sorted({normalise_name(name) for part in parts for name in part.source.class_names})
    key_of = {name: key for key, name in enumerate(vocabulary)}
    for part in parts:
        keys = np.array([key_of[normalise_name(name)] for name in part.source.class_names], dtype=np.int64)
        for class_id in range(len(keys)):
            if part.spec.coco and class_id in novel:
                keys[class_id] = -1
            elif not part.spec.coco and mix.novel_by_name and part.synonyms[class_id] & novel_names:
                keys[class_id] = -1
                report.skip(f"{part.name}: class named like a novel COCO class (novel_by_name)", part.source.class_names[class_id])
        part.class_keys = keys
        _select(part, cfg, data, novel, report)
    return parts


def _select(part: MixPart, cfg: TrainConfig, data: Any, novel: set[int], report: SkipReport) -> None:
    """Usable classes and images of one source."""
    usable = {c for c in range(part.source.num_classes) if part.class_keys[c] >= 0}
    kind = part.spec.kind
    if kind == "coco_semantic":
        # the fold's base-class training pairs (official lists or the pixel rule; novel_policy applied)
        part.class_images = {
            int(c): [str(i) for i in images] for c, images in data.train_pairs.items() if len(images) >= 2 and c in usable
        }
        part.usable_classes = set(part.class_images)
    elif kind in ("ade20k_semantic", "fss1000_semantic"):
        index = _ade_class_index(part) if kind == "ade20k_semantic" else _fss_class_index(part)
        per_class: dict[int, list[str]] = {}
        for image_id, classes in index.items():
            for c in classes:
                if c in usable:
                    per_class.setdefault(c, []).append(image_id)
        part.class_images = {c: sorted(images) for c, images in per_class.items() if len(images) >= 2}
        part.usable_classes = set(part.class_images)
        part.image_classes = {}
        for image_id, classes in sorted(index.items()):
            mine = [c for c in classes if c in part.class_images]
            if mine:
                part.image_classes[image_id] = mine
        part.images = sorted(part.image_classes)
    else:
        coco = part.source.coco
        category_class = {cid: index for index, cid in enumerate(part.source.category_ids)}
        images = []
        for image_id in part.source.image_ids():
            annotations = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            classes = {category_class[a["category_id"]] for a in annotations}
            if kind == "coco_instances" and cfg.novel_policy == "drop" and classes & novel:
                report.skip(f"{part.name}: image contains a novel class (policy 'drop')", image_id)
                continue
            if classes & usable:
                images.append(str(image_id))
        part.images = images
        part.usable_classes = usable
    if not part.sampled_images():
        raise DataError(f"mix source {part.name!r} has no usable image (classes / instances) for fold {cfg.fold}")


def _ade_class_index(part: MixPart) -> dict[str, list[int]]:
    """{image id: classes with a labelled pixel} of an ADE20k source (every label PNG read once; cached
    next to the store as ``<store>.<source>.classes.json``, written by the driver)."""
    cache = _class_index_path(part)
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("images") == len(part.source.image_ids()):
            return {k: list(v) for k, v in stored["classes"].items()}
    index = {str(i): part.source.classes_in_image(i) for i in part.source.image_ids()}
    if cache is not None:
        try:
            cache.write_text(json.dumps({"images": len(index), "classes": index}))
        except OSError:
            pass  # a read-only location: the next process scans again
    return index


def _fss_class_index(part: MixPart) -> dict[str, list[int]]:
    """{image id: [its folder's class]} of an FSS-1000 source (from the folder names, no file read)."""
    return {image_id: part.source.classes_in_image(image_id) for image_id in part.source.image_ids()}


def _class_index_path(part: MixPart) -> Path | None:
    if "://" in part.store_uri:
        return None
    return Path(f"{part.store_uri.rstrip('/')}.{part.name}.classes.json")


# --------------------------------------------------------------------------------------------------
# Stores: what each source reads, checks, and extraction of missing stores (driver)
# --------------------------------------------------------------------------------------------------
def _all_images(part: MixPart) -> list[str]:
    """Images to cache views of: every image of the source that has annotations / labels (fold
    independent, so one extraction serves all four folds)."""
    if part.spec.kind == "ade20k_semantic":
        return sorted(i for i, classes in _ade_class_index(part).items() if classes)
    if part.spec.kind == "fss1000_semantic":
        return part.source.image_ids()  # the split's every image (fold independent as well)
    coco = part.source.coco
    return [str(i) for i in part.source.image_ids() if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, []))]


def _image_size(part: MixPart, image_id: str) -> tuple[int, int]:
    if hasattr(part.source, "image_info"):
        info = part.source.image_info(image_id)
        return int(info["height"]), int(info["width"])
    with Image.open(part.source.image_path(part.source.key(image_id))) as image:
        return image.height, image.width


def needed_ids(part: MixPart) -> tuple[set[str], set[str]]:
    """(plain image ids, view ids) this source reads from its store for the fold."""
    images = part.sampled_images()
    views = {view_id(i, k) for i in images for k in range(part.views)}
    plain = set(images) if (part.semantic or not part.views) else set()
    return plain, views
