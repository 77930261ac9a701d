"""The official HSNet COCO-20i / PASCAL-5i pair lists, read as-is and mapped to the user's files.

COCO lists name 2014 files (``val2014/COCO_val2014_000000507081.jpg``); COCO 2017 re-splits the same
images under the same ids, so an entry maps to a 2017 dataset through its image id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path

from pipeline.data.base import SegmentationSource
from pipeline.data.folds import check_fold
from pipeline.errors import DataError
from pipeline.report import SkipReport

_COCO_NAME = re.compile(r"^(train2014|val2014)/COCO_(train2014|val2014)_(\d{12})\.jpg$")
LIST_SPLITS = ("trn", "val")

# The skip reason of a list entry whose image the dataset at hand lacks (expected with a subset of
# COCO or PASCAL, e.g. coco_mini: the official lists name every image of the full dataset).
LIST_IMAGE_MISSING = "list entry's image not in the dataset"


def _check_split(split: str) -> None:
    if split not in LIST_SPLITS:
        raise DataError(f"HSNet list split must be one of {LIST_SPLITS}, got {split!r}")


def coco_image_id(name: str) -> int:
    """``"val2014/COCO_val2014_000000507081.jpg"`` -> ``507081``."""
    match = _COCO_NAME.match(name)
    if match is None:
        raise DataError(f"not an HSNet COCO-20i list entry: {name!r}")
    return int(match.group(3))


def read_coco20i_list(lists_dir: str | Path, split: str, fold: int) -> dict[int, list[str]]:
    """{class id (0-79): [image names, in file order]} from ``lists_dir/<split>/fold<fold>.json``."""
    _check_split(split)
    check_fold("coco20i", fold)
    path = Path(lists_dir) / split / f"fold{fold}.json"
    if not path.is_file():
        raise DataError(f"HSNet COCO-20i list not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    lists: dict[int, list[str]] = {}
    for class_key, names in raw.items():
        class_id = int(class_key)
        if not 0 <= class_id < 80:
            raise DataError(f"{path}: class index {class_id} outside 0..79")
        lists[class_id] = list(names)
    return lists


def read_pascal5i_list(lists_dir: str | Path, split: str, fold: int) -> list[tuple[str, int]]:
    """[(image name, 0-based class id)] in file order from ``lists_dir/<split>/fold<fold>.txt``.

    Entries look like ``2007_000033__01`` (1-based VOC class).
    """
    _check_split(split)
    check_fold("pascal5i", fold)
    path = Path(lists_dir) / split / f"fold{fold}.txt"
    if not path.is_file():
        raise DataError(f"HSNet PASCAL-5i list not found: {path}")
    entries = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        name, separator, class_text = line.partition("__")
        if not separator or not class_text.isdigit() or not 1 <= int(class_text) <= 20:
            raise DataError(f"{path}:{line_number}: malformed entry {line!r} (expected NAME__CC)")
        entries.append((name, int(class_text) - 1))
    return entries


def map_coco20i_list(
    lists: dict[int, list[str]], source: SegmentationSource, report: SkipReport | None = None
) -> dict[int, list[Hashable]]:
    """Map list entries to ``source``'s image ids (via the COCO image id), keeping list order.

    Entries whose image the user's dataset lacks are counted in ``report`` under
    :data:`LIST_IMAGE_MISSING`, never dropped silently.
    """
    mapped: dict[int, list[Hashable]] = {}
    for class_id, names in lists.items():
        kept = []
        for name in names:
            image_id = coco_image_id(name)
            if source.has_image(image_id):  # type: ignore[attr-defined]
                kept.append(image_id)
            elif report is not None:
                report.skip(LIST_IMAGE_MISSING, name)
        mapped[class_id] = kept
    return mapped
