"""SegIC's mixed-dataset training data: the ``segic_mixed`` sampler of the training loop.

What SegIC trains on (SegIC paper, sec. 4.1 and supplementary A; the authors' ``train.py``,
``utils/dataset.py``, ``utils/fss.py``, ``utils/fss_inst.py`` and ``model/segic.py``; the facts and
our deviations are in docs/segic_training.md):

* per sample, a dataset is drawn with the mix's weights (uniform by default: the authors'
  ``CustomConcatDataset`` with ``random.choices(weights=dataset_ratio)``), a fixed number of samples
  per epoch over the whole mix (``--samples_per_epoch``: 160k main, 80k ablations);
* semantic data (COCO semantic, ADE20k, FSS-1000): one class of the target image (COCO: class
  first, then an image of it, as the authors' ``DatasetCOCO``; ADE20k: image first, then one of its
  classes, as their ``SemADE``; FSS-1000: an image of the split, then its folder's class, as their
  ``DatasetFSS``); the reference is ANOTHER image of that class; one instruction;
* instance data (COCO instances, LVIS): the reference is a second augmentation of the same image;
  ``randint(0, 19)`` (at least one, at most 10) of the instances present in both views are the
  instructions, each with its own instance as target, so the image's other instances are
  background for it;
* augmentation from the feature cache (docs/segic_cache.md): each side of a sample is the plain
  image or one of the ``V`` seeded cached views of it (two DISTINCT variants for instance data),
  optionally flipped in feature space, or (``warp_prob``) a fresh view of the kind's augmentation
  served by warping the nearest cached view, whose missing cells are ignore (255) in the target;
* fold-fair COCO: the COCO sources only use the fold's base classes (``novel_policy`` applies:
  novel pixels are background, or images with novel classes are dropped); with ``novel_by_name`` the
  novel classes (matched by name / synonyms) are kept out of the other sources too;
* negatives: semantic targets list the classes ABSENT from them (the source's usable classes minus
  those in the image; none for FSS-1000, which labels only its folder's class: the authors'
  ``DatasetFSS`` gives no negative class names either); the model draws queued instance features of
  those classes (:meth:`refseg_models.modeling.segic.SegIC.queue_negatives`); semantic instructions
  carry their class key so :meth:`~refseg_models.modeling.segic.SegIC.after_step` can queue them
  (the authors queue semantic samples only). Class keys are shared across sources by normalised
  class name (the authors key their queue by class name).

Rows are data: the epoch table holds, per sample, the source, the images, the class, each side's
variant (view, flip, warp) and a per-sample seed; everything ``build`` draws (fresh views, which
instances) comes from that seed, so a batch is a function of its rows alone: ranks take disjoint
shares of the same table and a resumed run rebuilds the same batches.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.data.base import IGNORE_INDEX, SegmentationSource
from pipeline.data.coco import LvisInstances
from pipeline.data.folds import COCO_CLASS_NAMES, normalise_name, novel_classes
from pipeline.data.mask_cache import MaskCache
from pipeline.data.semantic import Ade20k, Fss1000
from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport
from pipeline.training.config import TrainConfig
from pipeline.training.episode_features import EpisodeBatch
from pipeline.store.status import store_status
from pipeline.training.data import load_fold_data
from pipeline.training.mix_config import MixSource
from pipeline.training.prepared import PreparedFold
from pipeline.training.views import (
    AugmentationConfig,
    ViewParams,
    base_view,
    draw_view,
    nearest_view,
    plan_views,
    read_plan,
    render_view_items,
    segic_instance_config,
    segic_semantic_config,
    view_id,
    warp_features,
    write_plan,
)
from refseg_models.frames import Frame, frame_size_of, is_padded
from refseg_models.modeling.inputs import EpisodeFeatures, InstructionSet
from refseg_models.modeling.segic_instructions import masks_to_boxes

PLAIN = -1  # the variant "plain image" (view index -1)
_TABLE_SALT = 0x5E61C


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
    from pipeline.training.features import encoder_identity

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
    from PIL import Image

    with Image.open(part.source.image_path(part.source.key(image_id))) as image:
        return image.height, image.width


def needed_ids(part: MixPart) -> tuple[set[str], set[str]]:
    """(plain image ids, view ids) this source reads from its store for the fold."""
    images = part.sampled_images()
    views = {view_id(i, k) for i in images for k in range(part.views)}
    plain = set(images) if (part.semantic or not part.views) else set()
    return plain, views


def prepare_mix(cfg: TrainConfig, data: Any, writer: Any, extract_missing: bool, workers: int = 1) -> None:
    """The mix's driver-side preparation (the job calls it before Ray starts): its stores."""
    prepare_stores(cfg, data, extract_missing, workers)


def prepare_stores(
    cfg: TrainConfig, data: Any, extract_missing: bool, workers: int = 1, extract: Any = None
) -> list[MixPart]:
    """Driver side, before Ray: make sure every source's store exists (with ``extract_missing``:
    write the view plan, render the views, extract plain images + views in one run) and holds what
    the fold's sampler reads. Returns the parts (stores opened). ``extract``: the extraction function
    (default :func:`pipeline.extraction.stage.extract_store`, the Ray stage)."""
    from pipeline.store.reader import open_store
    from pipeline.training.features import expected_key, store_exists

    report = SkipReport(f"segic mix, fold {cfg.fold}")
    parts = build_parts(cfg, data, report)
    report.print()
    by_store: dict[str, list[MixPart]] = {}
    for part in parts:
        by_store.setdefault(part.store_uri, []).append(part)
    for uri, group in by_store.items():
        if not store_exists(uri):
            if not extract_missing:
                raise DataError(
                    f"the feature store {uri} of mix source(s) {', '.join(p.name for p in group)} "
                    f"{store_status(uri).describe()}: run the training job with --extract-missing (it writes the view "
                    "plan, renders the cached views and extracts them with the plain images; an incomplete store is "
                    "resumed)"
                )
            _extract(cfg, data, uri, group, workers, extract)
        expect = replace(expected_key(cfg, "backbone"), dataset=group[0].feature_dataset)
        store = open_store(uri, expect=expect)
        for part in group:
            part.store = store
        _load_plans(group)
        have = set(store.image_ids)
        for part in group:
            plain, views = needed_ids(part)
            missing = sorted((plain | views) - have)
            if missing:
                raise DataError(
                    f"the store {uri} lacks {len(missing)} image(s) / view(s) mix source {part.name!r} reads "
                    f"(e.g. {missing[:5]}); a finished store cannot grow: extract a new one (--extract-missing)"
                )
    return parts


def _extract(cfg: TrainConfig, data: Any, uri: str, group: list[MixPart], workers: int, extract: Any = None) -> None:
    from pipeline.extraction.encoder_source import RegistryEncoder

    if extract is None:
        from pipeline.extraction.stage import extract_store as extract

    items: dict[str, str] = {}
    if uri == cfg.backbone.store and cfg.dataset == "coco20i":
        for image_id in data.source.image_ids():  # everything the fold's evaluation reads, too
            items[str(image_id)] = str(data.source.image_path(image_id))
    viewed = [part for part in group if part.views]
    for part in group:
        if part.semantic or not part.views:
            for image_id in _all_images(part):
                items.setdefault(image_id, str(part.source.image_path(part.source.key(image_id))))
    render_dir = None
    if viewed:
        first = viewed[0]
        images: dict[str, MixPart] = {}
        for part in viewed:
            for image_id in _all_images(part):
                images.setdefault(image_id, part)
        sizes = {image_id: _image_size(part, image_id) for image_id, part in images.items()}
        plan = plan_views(sizes, first.views, first.spec.view_seed, first.augmentation)
        plan_path = Path(first.plan_path)
        if plan_path.is_file():
            if read_plan(plan_path) != plan:
                raise DataError(f"{plan_path} holds another view plan than the configuration draws: remove it or point view_plan elsewhere")
        else:
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            write_plan(plan, plan_path)
        render_dir = Path(f"{uri.rstrip('/')}.renders")
        print(f"rendering {len(plan)} cached views of {len(images)} images into {render_dir} ...", flush=True)

        def load(image_id: str) -> np.ndarray:
            part = images[image_id]
            return part.source.load_image(part.source.key(image_id))

        for key, path in render_view_items(plan, load, render_dir):
            items[key] = path
    b = cfg.backbone
    encoder = RegistryEncoder(b.encoder, b.checkpoint, b.checkpoint is None, {**b.options, **b.path_options})
    print(f"extracting {len(items)} images / views into {uri} ({b.encoder}) ...", flush=True)
    summary = extract(
        sorted(items.items()), uri, encoder, group[0].feature_dataset, num_actors=workers, progress=False,
        config={"segic_mix": [p.spec.to_dict() for p in group]},
    )
    print(summary.text(), flush=True)
    if summary.failed:
        raise DataError(f"extraction of {uri}: {summary.failed} image(s) failed")
    if render_dir is not None:
        shutil.rmtree(render_dir, ignore_errors=True)  # rendered PNGs are only extraction input


def _load_plans(group: Sequence[MixPart]) -> None:
    for part in group:
        part.has_plain = True
        if not part.views:
            continue
        plan: dict[str, list[ViewParams]] = {}
        for view in read_plan(part.plan_path):
            plan.setdefault(view.image_id, []).append(view)
        for image_id in part.sampled_images():
            views = sorted(plan.get(image_id, []), key=lambda v: v.view)[: part.views]
            if len(views) < part.views:
                raise DataError(f"view plan {part.plan_path} has {len(views)} view(s) of image {image_id}, {part.spec.name} reads {part.views}")
            if views[0].canvas != part.augmentation.canvas:
                raise DataError(f"view plan {part.plan_path}: canvas {views[0].canvas}, the mix expects {part.augmentation.canvas}")
            part.plan[image_id] = views


# --------------------------------------------------------------------------------------------------
# Geometry: label masks into the model's frame through a side's view
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _nearest_index(size_in: int, size_out: int) -> torch.Tensor:
    """PIL's NEAREST resampling as an index map (exactly what ``apply_view_to_mask`` does)."""
    from PIL import Image

    row = np.arange(size_in, dtype=np.int32)[None, :]
    return torch.from_numpy(np.asarray(Image.fromarray(row, mode="I").resize((size_out, 1), Image.NEAREST))[0].astype(np.int64))


def render_masks(masks: torch.Tensor, view: ViewParams, fill: int) -> torch.Tensor:
    """``N x H x W`` uint8 masks -> ``N x canvas x canvas`` through ``view`` (crop, PIL-nearest resize,
    paste on a ``fill`` canvas, flip): :func:`~pipeline.training.views.apply_view_to_mask` for N masks at
    once, pixel for pixel (tested)."""
    if tuple(masks.shape[1:]) != (view.height, view.width):
        raise DataError(f"view of {view.image_id!r}: masks of shape {tuple(masks.shape[1:])}, the plan says {view.height}x{view.width}")
    crop = masks[:, view.crop_y : view.crop_y + view.crop_h, view.crop_x : view.crop_x + view.crop_w]
    resized = crop[:, _nearest_index(view.crop_h, view.resize_h)][:, :, _nearest_index(view.crop_w, view.resize_w)]
    canvas = torch.full((masks.shape[0], view.canvas, view.canvas), fill, dtype=masks.dtype)
    left, top = max(view.offset_x, 0), max(view.offset_y, 0)
    right, bottom = min(view.offset_x + view.resize_w, view.canvas), min(view.offset_y + view.resize_h, view.canvas)
    if right > left and bottom > top:
        canvas[:, top:bottom, left:right] = resized[
            :, top - view.offset_y : bottom - view.offset_y, left - view.offset_x : right - view.offset_x
        ]
    return canvas.flip(-1) if view.flip else canvas


def _to_frame(masks: torch.Tensor, frame: Frame, fill: int) -> torch.Tensor:
    """``N x H x W`` -> ``N x S x S`` uint8 exactly as :meth:`Frame.mask_to_frame` (nearest, padding ``fill``)."""
    vh, vw = frame.valid
    out = F.interpolate(masks[:, None].float(), (vh, vw), mode="nearest")
    return F.pad(out, (0, frame.size - vw, 0, frame.size - vh), value=float(fill))[:, 0].to(torch.uint8)


@dataclass
class Side:
    """One side (target or reference) of a sample: which store entry, and how it is served.

    ``view``: the view the side shows (None = the plain image as the store holds it);
    ``feature_flip``: the stored features are flipped in feature space (a cached view's flip
    toggled, or the plain image mirrored); ``warp_from``: for a fresh ``view``, the cached view (or
    plain image, as :func:`~pipeline.training.views.base_view`) its features are warped from.
    """

    part: MixPart
    image_id: str
    store_id: str
    view: ViewParams | None
    feature_flip: bool = False
    warp_from: ViewParams | None = None

    def features(self, raw: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C x h x w float32 features, h x w bool valid cells or None)."""
        if self.warp_from is not None:
            warped, valid = warp_features({key: raw}, self.warp_from, self.view)
            return warped[key], valid[key]
        return (torch.flip(raw, dims=(-1,)) if self.feature_flip else raw), None


class SegICMixedSampler:
    """The ``segic_mixed`` sampler (module docstring)."""

    def __init__(self, cfg: TrainConfig, data: Any, model: Any, frozen: Any, parts: list[MixPart] | None = None) -> None:
        from pipeline.training.features import expected_key

        if isinstance(data, PreparedFold):  # the raw fold, until the mix is prepared by the driver too
            data = load_fold_data(cfg)
        self.cfg, self.data, self.mix = cfg, data, cfg.mix
        self.key = model.feature_key
        self.frame_size = int(model.frame_size() or 0)
        self.preprocessing = _backbone_preprocessing(cfg)
        if not self.frame_size:
            self.frame_size = frame_size_of(self.preprocessing)
        self.report = SkipReport("segic mix")
        if parts is None:
            from pipeline.store.reader import open_store

            parts = build_parts(cfg, data, self.report)
            stores: dict[str, Any] = {}
            fold_store = None if frozen is None else frozen.stores.get("backbone")
            for part in parts:
                if part.store_uri not in stores:
                    if fold_store is not None and part.store_uri == cfg.backbone.store:
                        stores[part.store_uri] = fold_store
                    else:
                        expect = replace(expected_key(cfg, "backbone"), dataset=part.feature_dataset)
                        stores[part.store_uri] = open_store(part.store_uri, expect=expect)
                part.store = stores[part.store_uri]
            _load_plans(parts)
        self.parts = parts
        self.part_index = {part.name: index for index, part in enumerate(parts)}
        for part in parts:
            if not part.semantic and max(part.views, 1) * (2 if self.mix.feature_flip_prob > 0 else 1) < 2:
                raise ConfigError(
                    f"mix source {part.name!r}: instance samples need two distinct (view, flip) variants of an "
                    "image: cache views >= 2, or allow feature flips"
                )
        weights = np.array([part.spec.weight for part in parts], dtype=np.float64)
        self.weights = weights / weights.sum()

    # -- the epoch table ----------------------------------------------------------------------------
    def samples_per_epoch(self) -> int:
        wanted = self.mix.samples_per_epoch or self.cfg.recipe.samples_per_epoch
        if not wanted:
            raise ConfigError("the segic_mixed sampler needs samples_per_epoch (mix or recipe)")
        batch = self.cfg.recipe.batch_size
        if wanted < batch:
            raise ConfigError(f"an epoch of {wanted} samples is less than one global batch ({batch})")
        return (wanted // batch) * batch

    def epoch_table(self, epoch: int, num_samples: int) -> pa.Table:
        """Epoch ``epoch``'s samples: a function of (seed, epoch) and the mix only."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.cfg.seed), int(epoch), _TABLE_SALT])))
        n = int(num_samples)
        which = rng.choice(len(self.parts), size=n, p=self.weights)
        seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        columns: dict[str, list] = {name: [None] * n for name in (
            "image_id", "class_id", "reference_id", "target_view", "target_flip", "target_warp",
            "reference_view", "reference_flip", "reference_warp")}
        for index, part in enumerate(self.parts):
            rows = np.flatnonzero(which == index)
            if not len(rows):
                continue
            drawn = self._draw(part, len(rows), rng)
            for name, values in drawn.items():
                for row, value in zip(rows.tolist(), values):
                    columns[name][row] = value
        return pa.table({
            "episode_id": pa.array(np.arange(n, dtype=np.int64)),
            "source": pa.array([self.parts[i].name for i in which.tolist()], pa.string()),
            "kind": pa.array(["semantic" if self.parts[i].semantic else "instance" for i in which.tolist()], pa.string()),
            "image_id": pa.array(columns["image_id"], pa.string()),
            "class_id": pa.array(columns["class_id"], pa.int32()),
            "reference_id": pa.array(columns["reference_id"], pa.string()),
            "target_view": pa.array(columns["target_view"], pa.int16()),
            "target_flip": pa.array(columns["target_flip"], pa.bool_()),
            "target_warp": pa.array(columns["target_warp"], pa.bool_()),
            "reference_view": pa.array(columns["reference_view"], pa.int16()),
            "reference_flip": pa.array(columns["reference_flip"], pa.bool_()),
            "reference_warp": pa.array(columns["reference_warp"], pa.bool_()),
            "sample_seed": pa.array(seeds),
            "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
        })

    def _draw(self, part: MixPart, m: int, rng: np.random.Generator) -> dict[str, list]:
        mix = self.mix
        u = rng.random((m, 3))
        if part.spec.kind == "coco_semantic":  # class first, then an image of it (authors' DatasetCOCO)
            classes = sorted(part.class_images)
            picked = [classes[int(x * len(classes))] for x in u[:, 0]]
            images, references = [], []
            for c, a, b in zip(picked, u[:, 1], u[:, 2]):
                pool = part.class_images[c]
                i = int(a * len(pool))
                j = int(b * (len(pool) - 1))
                images.append(pool[i])
                references.append(pool[j + (j >= i)])
        elif part.spec.kind in ("ade20k_semantic", "fss1000_semantic"):
            # image first, then one of its classes (authors' SemADE; DatasetFSS: an image of the split,
            # its folder's class, another image of that folder as the reference)
            images, picked, references = [], [], []
            for a, b, c in u:
                image = part.images[int(a * len(part.images))]
                cls = part.image_classes[image][int(b * len(part.image_classes[image]))]
                pool = part.class_images[cls]
                i = part.position(cls, image)
                j = int(c * (len(pool) - 1))
                images.append(image)
                picked.append(cls)
                references.append(pool[j + (j >= i)])
        else:  # instance data: an image, the reference is another view of it
            images = [part.images[int(a * len(part.images))] for a in u[:, 0]]
            picked = [-1] * m
            references = list(images)
        out: dict[str, list] = {"image_id": images, "class_id": [int(c) for c in picked], "reference_id": references}
        flips = rng.random((m, 2)) < mix.feature_flip_prob
        warps = rng.random((m, 2)) < mix.warp_prob
        if part.semantic:
            variants = 1 + part.views  # the plain image and the cached views
            drawn = rng.integers(0, variants, size=(m, 2)) - 1
        else:
            variants = part.views or 1
            drawn = rng.integers(0, variants, size=(m, 2)) - (0 if part.views else 1)
            # two DISTINCT (view, flip) variants of the image (redrawn until they differ), unless a
            # side is a fresh (warped) view
            while True:
                same = (drawn[:, 0] == drawn[:, 1]) & (flips[:, 0] == flips[:, 1]) & ~warps.any(axis=1)
                if not same.any():
                    break
                k = int(same.sum())
                drawn[same] = rng.integers(0, variants, size=(k, 2)) - (0 if part.views else 1)
                flips[same] = rng.random((k, 2)) < mix.feature_flip_prob
        out.update(
            target_view=drawn[:, 0].tolist(), reference_view=drawn[:, 1].tolist(),
            target_flip=flips[:, 0].tolist(), reference_flip=flips[:, 1].tolist(),
            target_warp=warps[:, 0].tolist(), reference_warp=warps[:, 1].tolist(),
        )
        return out

    # -- building batches ---------------------------------------------------------------------------
    def _side(self, part: MixPart, image_id: str, view: int, flip: bool, warp: bool, rng: np.random.Generator) -> Side:
        if warp:
            height, width = part.size(image_id)
            fresh = draw_view(rng, image_id, -2, height, width, part.augmentation)
            cached = list(part.plan.get(image_id, []))
            if part.semantic or not part.views:
                cached.append(base_view(image_id, height, width, frame_size_of(self.preprocessing), is_padded(self.preprocessing)))
            source = nearest_view(fresh, cached)
            store_id = image_id if source.view < 0 else source.view_id
            return Side(part, image_id, store_id, fresh, warp_from=source)
        if view == PLAIN:
            return Side(part, image_id, image_id, None, feature_flip=flip)
        cached = part.plan[image_id][view]
        return Side(part, image_id, cached.view_id, replace(cached, flip=cached.flip != flip), feature_flip=flip)

    def _render(self, side: Side, masks: torch.Tensor, fill: int, valid: torch.Tensor | None) -> torch.Tensor:
        """``N x H x W`` uint8 masks at the source's resolution -> ``N x S x S`` in the model's frame."""
        if side.view is None:
            out = _to_frame(masks, Frame.of(self.preprocessing, self.frame_size, tuple(masks.shape[1:])), fill)
            out = out.flip(-1) if side.feature_flip else out
        else:
            canvas = render_masks(masks, side.view, fill)
            out = _to_frame(canvas, Frame.of(self.preprocessing, self.frame_size, tuple(canvas.shape[1:])), fill)
        if valid is not None:
            out[:, ~self._cells_to_frame(valid)] = fill
        return out

    def _cells_to_frame(self, valid: torch.Tensor) -> torch.Tensor:
        return F.interpolate(valid[None, None].float(), (self.frame_size, self.frame_size), mode="nearest")[0, 0] > 0.5

    def resolve(self, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """The samples of ``rows``: per row its sides' features, the source-resolution masks of every
        instruction (targets {0, 1, 255}, references {0, 1}) and their rendering in the model's frame."""
        plans = []
        for row in rows:
            part = self.parts[self.part_index[row["source"]]]
            rng = np.random.Generator(np.random.PCG64(int(row["sample_seed"])))
            target = self._side(part, row["image_id"], row["target_view"], row["target_flip"], row["target_warp"], rng)
            reference = self._side(part, row["reference_id"], row["reference_view"], row["reference_flip"], row["reference_warp"], rng)
            plans.append((row, part, rng, target, reference))
        raw = self._read([(p[1], p[3].store_id) for p in plans] + [(p[1], p[4].store_id) for p in plans])
        samples = []
        for index, (row, part, rng, target, reference) in enumerate(plans):
            t_features, t_valid = target.features(raw[index], self.key)
            r_features, r_valid = reference.features(raw[len(plans) + index], self.key)
            sample = {"row": row, "part": part, "target_features": t_features, "reference_features": r_features}
            ones = torch.ones(1, *part.size(row["reference_id"]), dtype=torch.uint8)
            sample["reference_valid"] = self._render(reference, ones, 0, r_valid)[0]
            if part.semantic:
                self._semantic(sample, part, row, target, reference, t_valid, r_valid)
            else:
                self._instances(sample, part, row, rng, target, reference, t_valid, r_valid)
            samples.append(sample)
        return samples

    def _read(self, wanted: list[tuple[MixPart, str]]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(wanted)
        by_store: dict[int, list[int]] = {}
        for index, (part, _) in enumerate(wanted):
            by_store.setdefault(id(part.store), []).append(index)
        for indices in by_store.values():
            store = wanted[indices[0]][0].store
            arrays = store.get_many([wanted[i][1] for i in indices], [self.key])
            for i, array in zip(indices, arrays):
                out[i] = torch.from_numpy(np.asarray(array[self.key], dtype=np.float32))
        return out  # type: ignore[return-value]

    def _semantic(self, sample, part, row, target, reference, t_valid, r_valid) -> None:
        class_id = int(row["class_id"])
        label = torch.from_numpy(np.array(part.masks.get(row["image_id"], class_id), dtype=np.uint8))[None]
        ref = torch.from_numpy(np.array(part.masks.get(row["reference_id"], class_id) == 1, dtype=np.uint8))[None]
        present = {int(part.class_keys[c]) for c in part.source.classes_in_image(part.source.key(row["image_id"]))}
        negatives = tuple(sorted(part.candidate_keys() - present)) if part.labels_every_class else ()
        sample.update(
            class_ids=[class_id], keys=[int(part.class_keys[class_id])],
            target_labels=label, reference_labels=ref,
            target_frame=self._render(target, label, IGNORE_INDEX, t_valid),
            reference_frame=self._render(reference, ref, 0, r_valid),
            negative_classes=negatives,
        )

    def _instances(self, sample, part, row, rng, target, reference, t_valid, r_valid) -> None:
        mix = self.mix
        source = part.source
        key = source.key(row["image_id"])
        category_class = {cid: index for index, cid in enumerate(source.category_ids)}
        annotations = [
            a for a in source.coco.loadAnns(source.coco.getAnnIds(imgIds=[key], iscrowd=False))
            if category_class[a["category_id"]] in part.usable_classes
        ]
        # bounded work per sample: rasterise at most 2 x instances_drawn random instances
        order = rng.permutation(len(annotations))[: 2 * mix.instances_drawn]
        chosen_annotations = [annotations[i] for i in order.tolist()]
        masks = torch.from_numpy(np.stack([source.coco.annToMask(a).astype(np.uint8) for a in chosen_annotations]))
        t_frame = self._render(target, masks, IGNORE_INDEX, t_valid)
        r_frame = self._render(reference, masks, 0, r_valid)
        usable = ((t_frame == 1).flatten(1).sum(1) >= mix.min_instance_pixels) & (
            (r_frame == 1).flatten(1).sum(1) >= mix.min_instance_pixels)
        candidates = torch.nonzero(usable).flatten().tolist()
        count = min(max(1, int(rng.integers(0, mix.instances_drawn))), mix.max_instances)
        picked = [candidates[i] for i in rng.permutation(len(candidates))[:count].tolist()] if candidates else [0]
        sample.update(
            class_ids=[category_class[chosen_annotations[i]["category_id"]] for i in picked],
            keys=[-1] * len(picked),  # the authors queue semantic samples only
            target_labels=masks[picked], reference_labels=masks[picked],
            target_frame=t_frame[picked], reference_frame=r_frame[picked],
            negative_classes=(),  # queue negatives are for semantic samples (authors)
        )

    def build(self, rows: Sequence[dict]) -> EpisodeBatch:
        samples = self.resolve(rows)
        b, s = len(samples), self.frame_size
        n = max(len(sample["keys"]) for sample in samples)
        targets = torch.full((b, n, s, s), IGNORE_INDEX, dtype=torch.uint8)
        instructions = torch.zeros(b, n, 1, s, s, dtype=torch.uint8)
        classes = torch.full((b, n), -1, dtype=torch.long)
        for i, sample in enumerate(samples):
            count = len(sample["keys"])
            targets[i, :count] = sample["target_frame"]
            instructions[i, :count, 0] = sample["reference_frame"]
            classes[i, :count] = torch.as_tensor(sample["keys"], dtype=torch.long)
        boxes = masks_to_boxes((targets == 1).flatten(0, 1).float()).view(b, n, 4)
        instruction_set = InstructionSet(
            masks=instructions,
            counts=tuple(len(sample["keys"]) for sample in samples),
            boxes=boxes,
            classes=classes,
            negative_classes=tuple(sample["negative_classes"] for sample in samples),
            reference_valid=torch.stack([sample["reference_valid"] for sample in samples])[:, None].float(),
        )
        features = EpisodeFeatures(
            reference_masks=instructions[:, 0].float(),
            target_backbone={self.key: torch.stack([sample["target_features"] for sample in samples])},
            reference_backbone={self.key: torch.stack([sample["reference_features"] for sample in samples])[:, None]},
            target_boxes=boxes[:, 0],
            instructions=instruction_set,
            meta={"episode_ids": [int(sample["row"]["episode_id"]) for sample in samples],
                  "sources": [sample["row"]["source"] for sample in samples]},
        )
        return EpisodeBatch(
            features, targets, [int(sample["row"]["episode_id"]) for sample in samples],
            [int(sample["class_ids"][0]) if sample["part"].semantic else -1 for sample in samples],
        )

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        coco = next((p for p in self.parts if p.spec.kind == "coco_semantic"), None)
        out["data/train_pairs"] = float(sum(len(v) for v in coco.class_images.values())) if coco else 0.0
        for part, weight in zip(self.parts, self.weights):
            out[f"data/mix/{part.name}/weight"] = float(weight)
            out[f"data/mix/{part.name}/images"] = float(len(part.sampled_images()))
            out[f"data/mix/{part.name}/classes"] = float(len(part.usable_classes))
        return out

