"""The mix's sources resolved against a fold (driver side): which classes, images and instances
each source may draw, the class keys shared by normalised name, and what each reads from its store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
from pipeline.training.mix_config import MixSource
from pipeline.training.segic_mixed.part import Instance, MixPart, backbone_preprocessing
from pipeline.training.views import AugmentationConfig, segic_instance_config, segic_semantic_config
from refseg_models.frames import frame_size_of


@dataclass
class ResolvedPart:
    """A part of the mix (what the workers read) with the raw source it was resolved from (driver side)."""

    part: MixPart
    source: SegmentationSource
    masks: MaskCache  # the source's label masks, rendered from its annotations
    synonyms: list[set[str]]  # per source class: normalised names
    class_index: dict[str, list[int]] | None = None  # ADE20k / FSS-1000: the classes labelled in each image

    @property
    def name(self) -> str:
        return self.part.name


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
    canvas = spec.view_canvas or frame_size_of(backbone_preprocessing(cfg))
    augmentation = segic_semantic_config(canvas) if spec.semantic else segic_instance_config(canvas)
    return store, dataset, plan, augmentation


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


def build_parts(cfg: TrainConfig, data: Any, report: SkipReport | None = None) -> list[ResolvedPart]:
    """The active sources of ``cfg.mix`` resolved against the fold's data (``load_fold_data``):
    usable classes (base classes only for COCO; novel names kept out of the others when
    ``novel_by_name``), their images and instances, the images' sizes and labelled classes, and the
    global class keys (shared by normalised name)."""
    report = report if report is not None else SkipReport("segic mix")
    mix = cfg.mix
    novel = set(novel_classes(cfg.dataset, cfg.fold)) if cfg.dataset == "coco20i" else set()
    novel_names = {normalise_name(COCO_CLASS_NAMES[c]) for c in novel}
    parts: list[ResolvedPart] = []
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
        part = MixPart(spec, store, dataset, plan, augmentation, list(source.class_names))
        parts.append(ResolvedPart(part, source, masks, synonyms))
    _check_shared_stores([resolved.part for resolved in parts])

    # global class keys: one per normalised primary name, over every active source
    vocabulary = sorted({normalise_name(name) for resolved in parts for name in resolved.source.class_names})
    key_of = {name: key for key, name in enumerate(vocabulary)}
    for resolved in parts:
        part, source = resolved.part, resolved.source
        keys = np.array([key_of[normalise_name(name)] for name in source.class_names], dtype=np.int64)
        for class_id in range(len(keys)):
            if part.spec.coco and class_id in novel:
                keys[class_id] = -1
            elif not part.spec.coco and mix.novel_by_name and resolved.synonyms[class_id] & novel_names:
                keys[class_id] = -1
                report.skip(f"{part.name}: class named like a novel COCO class (novel_by_name)", source.class_names[class_id])
        part.class_keys = keys
        _select(resolved, cfg, data, novel, report)
        _read_images(resolved)
    return parts


def _select(resolved: ResolvedPart, cfg: TrainConfig, data: Any, novel: set[int], report: SkipReport) -> None:
    """Usable classes and images of one source."""
    part, source = resolved.part, resolved.source
    usable = {c for c in range(source.num_classes) if part.class_keys[c] >= 0}
    kind = part.spec.kind
    if kind == "coco_semantic":
        # the fold's base-class training pairs (official lists or the pixel rule; novel_policy applied)
        part.class_images = {
            int(c): [str(i) for i in images] for c, images in data.train_pairs.items() if len(images) >= 2 and c in usable
        }
        part.usable_classes = set(part.class_images)
    elif kind in ("ade20k_semantic", "fss1000_semantic"):
        index = _ade_class_index(resolved) if kind == "ade20k_semantic" else _fss_class_index(resolved)
        resolved.class_index = index
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
        coco = source.coco
        category_class = {cid: index for index, cid in enumerate(source.category_ids)}
        images = []
        for image_id in source.image_ids():
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


def _ade_class_index(resolved: ResolvedPart) -> dict[str, list[int]]:
    """{image id: classes with a labelled pixel} of an ADE20k source (every label PNG read once; cached
    next to the store as ``<store>.<source>.classes.json``)."""
    cache = _class_index_path(resolved.part)
    source = resolved.source
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("images") == len(source.image_ids()):
            return {k: list(v) for k, v in stored["classes"].items()}
    index = {str(i): source.classes_in_image(i) for i in source.image_ids()}
    if cache is not None:
        try:
            cache.write_text(json.dumps({"images": len(index), "classes": index}))
        except OSError:
            pass  # a read-only location: the next process scans again
    return index


def _fss_class_index(resolved: ResolvedPart) -> dict[str, list[int]]:
    """{image id: [its folder's class]} of an FSS-1000 source (from the folder names, no file read)."""
    return {image_id: resolved.source.classes_in_image(image_id) for image_id in resolved.source.image_ids()}


def _class_index_path(part: MixPart) -> Path | None:
    if "://" in part.store_uri:
        return None
    return Path(f"{part.store_uri.rstrip('/')}.{part.name}.classes.json")


# --------------------------------------------------------------------------------------------------
# Stores: what each source reads, checks, and extraction of missing stores (driver)
# --------------------------------------------------------------------------------------------------
def all_images(resolved: ResolvedPart) -> list[str]:
    """Images to cache views of: every image of the source that has annotations / labels (fold
    independent, so one extraction serves all four folds)."""
    source = resolved.source
    if resolved.part.spec.kind == "ade20k_semantic":
        return sorted(i for i, classes in _ade_class_index(resolved).items() if classes)
    if resolved.part.spec.kind == "fss1000_semantic":
        return source.image_ids()  # the split's every image (fold independent as well)
    coco = source.coco
    return [str(i) for i in source.image_ids() if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, []))]


def image_size(source: SegmentationSource, image_id: str) -> tuple[int, int]:
    """(height, width) of an image: from the annotations when they hold it, else the file's header."""
    if hasattr(source, "image_info"):
        info = source.image_info(image_id)
        return int(info["height"]), int(info["width"])
    with Image.open(source.image_path(source.key(image_id))) as image:
        return image.height, image.width


def _read_images(resolved: ResolvedPart) -> None:
    """What the workers read of the source's images instead of the source: sizes, the labelled classes
    of semantic targets (queue negatives), the usable instances of instance data (COCO RLE)."""
    part, source = resolved.part, resolved.source
    for image_id in part.sampled_images():
        part.sizes[image_id] = image_size(source, image_id)
        if part.semantic:  # what source.classes_in_image says (ADE20k's label PNGs were read once for the index)
            present = resolved.class_index[image_id] if resolved.class_index is not None else source.classes_in_image(image_id)
            part.present[image_id] = [int(c) for c in present]
    if part.semantic:
        return
    category_class = {cid: index for index, cid in enumerate(source.category_ids)}
    for image_id in part.images:
        key = source.key(image_id)
        annotations = [a for a in source.coco.loadAnns(source.coco.getAnnIds(imgIds=[key], iscrowd=False))
                       if category_class[a["category_id"]] in part.usable_classes]
        part.instances[image_id] = [_instance(source, a, category_class) for a in annotations]


def _instance(source: SegmentationSource, annotation: dict, category_class: dict[int, int]) -> Instance:
    rle = source.coco.annToRLE(annotation)  # polygons merged, uncompressed RLE compressed (pycocotools)
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    height, width = rle["size"]
    return Instance(category_class[annotation["category_id"]], counts, int(height), int(width))
