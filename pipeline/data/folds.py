"""COCO-20i and PASCAL-5i class folds exactly as HSNet defines them (docs/protocol.md).

COCO-20i is INTERLEAVED: the test classes of fold i are {i + 4j, j = 0..19} (PFENet's contiguous
split is a different benchmark). PASCAL-5i: test classes of fold i are VOC ids 5i+1..5i+5, i.e.
0-based class ids 5i..5i+4 here (0 = aeroplane).
"""

from __future__ import annotations

import re
from typing import Literal

from pipeline.errors import ConfigError

Benchmark = Literal["coco20i", "pascal5i"]
Split = Literal["train", "test"]

NUM_FOLDS = 4
NUM_CLASSES = {"coco20i": 80, "pascal5i": 20}

COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
PASCAL_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def check_fold(benchmark: str, fold: int) -> None:
    if benchmark not in NUM_CLASSES:
        raise ConfigError(f"unknown benchmark {benchmark!r}; expected one of {sorted(NUM_CLASSES)}")
    if not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ConfigError(f"fold must be an integer in 0..{NUM_FOLDS - 1}, got {fold!r}")


def novel_classes(benchmark: Benchmark, fold: int) -> list[int]:
    """The novel (test) classes of ``fold``, in HSNet's order."""
    check_fold(benchmark, fold)
    if benchmark == "coco20i":
        return [fold + NUM_FOLDS * j for j in range(20)]
    return list(range(5 * fold, 5 * fold + 5))


def base_classes(benchmark: Benchmark, fold: int) -> list[int]:
    """The base (training) classes of ``fold``: every class that is not a test class."""
    novel = set(novel_classes(benchmark, fold))
    return [class_id for class_id in range(NUM_CLASSES[benchmark]) if class_id not in novel]


def fold_classes(benchmark: Benchmark, fold: int, split: Split) -> list[int]:
    if split == "test":
        return novel_classes(benchmark, fold)
    if split == "train":
        return base_classes(benchmark, fold)
    raise ConfigError(f"split must be 'train' or 'test', got {split!r}")


def normalise_name(name: str) -> str:
    """Class names compared across datasets (COCO, ADE20k, LVIS, FSS-1000): lower case, ``_`` / ``-``
    / runs of spaces -> one space."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())
