"""Training pairs and targets that can never leak a novel class.

Training images may contain objects of the fold's novel classes. Two policies exist in the
literature; the choice is explicit here (docs/protocol.md):

* ``"background"`` (HSNet): keep such images; the target of a base class c is the mask of c only,
  so novel-class pixels are background.
* ``"drop"`` (BAM / VRP-SAM PASCAL lists): drop every training image that contains a novel class.

Either way no novel-class pixel is ever a foreground training target, and asking for the target
of a novel class raises.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from pipeline.data.base import SegmentationSource
from pipeline.data.folds import Benchmark, base_classes, novel_classes
from pipeline.data.mask_cache import MaskCache
from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport

NOVEL_POLICIES = ("background", "drop")


def training_pairs(
    pairs: Mapping[int, Sequence[Hashable]],
    source: SegmentationSource,
    benchmark: Benchmark,
    fold: int,
    novel_policy: str = "background",
    report: SkipReport | None = None,
) -> dict[int, list[Hashable]]:
    """Restrict ``pairs`` to the fold's base classes and apply ``novel_policy``; skips are counted."""
    if novel_policy not in NOVEL_POLICIES:
        raise ConfigError(f"novel_policy must be one of {NOVEL_POLICIES}, got {novel_policy!r}")
    report = report if report is not None else SkipReport(f"{benchmark} fold {fold} training pairs")
    base, novel = set(base_classes(benchmark, fold)), set(novel_classes(benchmark, fold))
    kept: dict[int, list[Hashable]] = {}
    for class_id, image_ids in pairs.items():
        if class_id not in base:
            report.skip("novel class in a training list", f"class {class_id}")
            continue
        if novel_policy == "drop":
            selected = []
            for image_id in image_ids:
                if novel & set(source.classes_in_image(image_id)):
                    report.skip("image contains a novel class (policy 'drop')", f"{image_id}")
                else:
                    selected.append(image_id)
            kept[class_id] = selected
        else:
            kept[class_id] = list(image_ids)
    return kept


def training_target(
    masks: MaskCache, image_id: Hashable, class_id: int, benchmark: Benchmark, fold: int
) -> np.ndarray:
    """The uint8 {0, 1, 255} target of base class ``class_id`` (novel-class pixels are 0)."""
    if class_id not in base_classes(benchmark, fold):
        raise DataError(f"class {class_id} is a novel class of {benchmark} fold {fold}: never a training target")
    return masks.get(image_id, class_id)
