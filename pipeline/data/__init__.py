"""Data layer: segmentation sources (COCO, LVIS, ADE20k, PASCAL VOC+SBD, FSS-1000), folds, lists, masks."""

from pipeline.data.base import IGNORE_INDEX, SegmentationSource, pairs_by_pixel_rule
from pipeline.data.coco import Coco2014Instances, CocoInstances, LvisInstances
from pipeline.data.folds import base_classes, fold_classes, novel_classes
from pipeline.data.images import load_rgb
from pipeline.data.mask_cache import MaskCache
from pipeline.data.semantic import Ade20k, Fss1000, PascalVocAug

__all__ = [
    "IGNORE_INDEX",
    "Ade20k",
    "Coco2014Instances",
    "CocoInstances",
    "Fss1000",
    "LvisInstances",
    "MaskCache",
    "PascalVocAug",
    "SegmentationSource",
    "base_classes",
    "fold_classes",
    "load_rgb",
    "novel_classes",
    "pairs_by_pixel_rule",
]
