"""A fold's data, read from the raw dataset on the driver: the source, the base-class training
pairs and the validation / test episode manifests. Episodes are data: every manifest here is a
deterministic function of the configuration (seeds), and the driver writes it once into the fold's
prepared artifact (:mod:`pipeline.training.prepare`), which is all the workers read; the per-epoch
draws are :mod:`pipeline.training.epochs`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.data.base import SegmentationSource, pairs_by_pixel_rule
from pipeline.data.coco import Coco2014Instances, CocoInstances
from pipeline.data.folds import base_classes, novel_classes
from pipeline.data.mask_cache import MaskCache
from pipeline.data.semantic import PascalVocAug
from pipeline.data.splits import LIST_IMAGE_MISSING, coco_image_id, map_coco20i_list, read_coco20i_list, read_pascal5i_list
from pipeline.episodes.hsnet import hsnet_pascal_test_episodes, hsnet_test_episodes
from pipeline.episodes.manifest import build_episode_manifest, manifest_from_hsnet
from pipeline.episodes.training import training_pairs
from pipeline.errors import DataError
from pipeline.report import SkipReport
from pipeline.training.config import TrainConfig

# Offset of the validation seed from the test seed: validation episodes are another draw.
VALIDATION_SEED_OFFSET = 1000


def open_source(cfg: TrainConfig) -> SegmentationSource:
    """The dataset of the configuration (COCO json + images, or a PASCAL VOC+SBD root)."""
    if cfg.dataset == "coco20i":
        source_type = Coco2014Instances if cfg.layout == "2014" else CocoInstances
        return source_type(cfg.annotations, cfg.images, verbose=False, crowd=cfg.crowd)
    return PascalVocAug(cfg.images)


def _list_pairs(cfg: TrainConfig, source: SegmentationSource, split: str, report: SkipReport) -> dict[int, list[Hashable]]:
    """{class id: image ids} of the official lists (``trn`` / ``val``) restricted to images at hand."""
    if cfg.dataset == "coco20i":
        return map_coco20i_list(read_coco20i_list(cfg.lists_dir, split, cfg.fold), source, report)
    pairs: dict[int, list[Hashable]] = {}
    known = set(source.image_ids())
    for name, class_id in read_pascal5i_list(cfg.lists_dir, split, cfg.fold):
        if name in known:
            pairs.setdefault(class_id, []).append(name)
        else:
            report.skip(LIST_IMAGE_MISSING, name)
    return pairs


@dataclass
class FoldData:
    """Everything a training worker reads besides the feature stores."""

    source: SegmentationSource
    masks: MaskCache
    train_pairs: dict[int, list[Hashable]]
    val: pa.Table
    test: pa.Table
    test_protocol: str
    report: SkipReport = field(repr=False)
    # validation episodes drawn before those repeating a test episode were dropped
    val_drawn: int = 0

    @property
    def num_train_pairs(self) -> int:
        return sum(len(images) for images in self.train_pairs.values())

    def describe(self, context: str) -> list[str]:
        """What the fold trains, validates and tests on, and what was left out, in words."""
        lines = [f"{context}: {self.num_train_pairs} training pairs over {len(self.train_pairs)} base classes; "
                 f"test {self.test.num_rows} episodes ({self.test_protocol}); validation {self.val.num_rows} episodes"]
        dropped = self.val_drawn - self.val.num_rows
        if dropped:
            lines.append(f"  validation: {dropped} of the {self.val_drawn} episodes drawn repeat a test episode (same query "
                         f"and supports) and were dropped; {self.val.num_rows} remain (more: --val-episodes)")
        other = SkipReport(context)
        for reason, count in self.report.counts.items():
            if reason == LIST_IMAGE_MISSING:
                lines.append(f"  the official lists name {count} (class, image) entries whose image is not in this dataset "
                             "(expected with a subset such as coco_mini): left out")
            else:
                other.counts[reason] = count
                other.examples[reason] = list(self.report.examples[reason])
        if other:
            lines += ["  " + line.strip() for line in other.summary().splitlines()[1:]]
        return lines

    def image_ids(self) -> set[str]:
        """Every image id any episode of this fold may read (training pairs, val and test)."""
        ids = {str(i) for images in self.train_pairs.values() for i in images}
        for table in (self.val, self.test):
            ids.update(table.column("query_id").to_pylist())
            ids.update(s for supports in table.column("support_ids").to_pylist() for s in supports)
        return ids


def load_fold_data(cfg: TrainConfig, report: SkipReport | None = None) -> FoldData:
    """Source, training pairs (base classes only, ``novel_policy``), validation and test manifests.

    Test episodes are HSNet-identical (``hsnet_test_episodes``) when the official lists are given and
    every list image is at hand; with a subset of the images (e.g. coco_mini) they are drawn with
    HSNet's sampler rule from the lists mapped onto the images at hand (``test_protocol`` says which).
    Validation episodes are another seeded draw over the same test classes, disjoint from the test
    episodes (model selection never sees the reported episodes).
    """
    report = report if report is not None else SkipReport(f"{cfg.dataset} fold {cfg.fold} data")
    source = open_source(cfg)
    novel = novel_classes(cfg.dataset, cfg.fold)
    complete = False
    if cfg.lists_dir is not None:
        train_all = _list_pairs(cfg, source, "trn", report)
        val_report = SkipReport(f"{cfg.dataset} fold {cfg.fold} test lists")
        test_pairs = _list_pairs(cfg, source, "val", val_report)
        complete = not val_report
        _merge(report, val_report)
    else:
        train_all = pairs_by_pixel_rule(source, base_classes(cfg.dataset, cfg.fold))
        test_pairs = pairs_by_pixel_rule(source, novel)
    train = training_pairs(train_all, source, cfg.dataset, cfg.fold, cfg.novel_policy, report)
    train = {c: images for c, images in train.items() if len(images) >= cfg.shot + 1}
    if not train:
        raise DataError(f"{cfg.dataset} fold {cfg.fold}: no base class has {cfg.shot + 1} training images at hand")
    test_pairs = {c: test_pairs.get(c, []) for c in novel}
    test, protocol = _test_manifest(cfg, test_pairs, complete, report)
    val, drawn = _validation_manifest(cfg, test_pairs, test)
    return FoldData(source, MaskCache(source), train, val, test, protocol, report, drawn)


def _merge(report: SkipReport, other: SkipReport) -> None:
    for reason, count in other.counts.items():
        report.counts[reason] += count
        report.examples[reason].extend(other.examples[reason][: 5 - len(report.examples[reason])])


def _test_manifest(cfg: TrainConfig, test_pairs, lists_complete: bool, report: SkipReport) -> tuple[pa.Table, str]:
    common = dict(dataset=cfg.dataset, fold=cfg.fold, shot=cfg.shot, seed=cfg.test_seed, annotation_type=cfg.annotation_type)
    if cfg.lists_dir is not None and lists_complete:
        if cfg.dataset == "coco20i":
            episodes = hsnet_test_episodes(cfg.lists_dir, cfg.fold, n=cfg.test_episodes, shot=cfg.shot, seed=cfg.test_seed)
            table = manifest_from_hsnet(episodes, image_id_of=lambda name: str(coco_image_id(name)), **common)
        else:
            episodes = hsnet_pascal_test_episodes(cfg.lists_dir, cfg.fold, n=cfg.test_episodes, shot=cfg.shot, seed=cfg.test_seed)
            table = manifest_from_hsnet(episodes, **common)
        return table, "HSNet-identical test episodes"
    table = build_episode_manifest(test_pairs, split="test", n_episodes=cfg.test_episodes, report=report, **common)
    how = "the official lists mapped onto the images at hand" if cfg.lists_dir is not None else "the pixel rule"
    return table, f"test episodes drawn (seed {cfg.test_seed}) from {how}; not HSNet-identical"


def _validation_manifest(cfg, test_pairs, test: pa.Table) -> tuple[pa.Table, int]:
    """Validation episodes (another seed) minus those that repeat a test episode; and how many were drawn."""
    seed = cfg.test_seed + VALIDATION_SEED_OFFSET
    table = build_episode_manifest(
        test_pairs, dataset=cfg.dataset, fold=cfg.fold, split="val", n_episodes=cfg.val_episodes, shot=cfg.shot,
        seed=seed, annotation_type=cfg.annotation_type, report=SkipReport("validation episodes"),
    )
    reported = set(zip(test.column("query_id").to_pylist(), map(tuple, test.column("support_ids").to_pylist())))
    keep = [
        (q, tuple(s)) not in reported
        for q, s in zip(table.column("query_id").to_pylist(), table.column("support_ids").to_pylist())
    ]
    return table.filter(pa.array(keep)), table.num_rows
