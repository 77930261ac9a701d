"""Data layer: segmentation sources (COCO, LVIS, ADE20k, PASCAL VOC+SBD, FSS-1000), folds, lists, masks.

The names below are imported on first use: importing a light module of this package (``folds``,
``images``) must not load pycocotools, because the training workers import those and never read a
raw dataset (they read the fold the driver prepared: pipeline/training/prepared.py).
"""

from refseg_models.registry import Registry

_EXPORTS = Registry("name in pipeline.data", {
    "IGNORE_INDEX": "pipeline.data.base:IGNORE_INDEX",
    "SegmentationSource": "pipeline.data.base:SegmentationSource",
    "pairs_by_pixel_rule": "pipeline.data.base:pairs_by_pixel_rule",
    "Coco2014Instances": "pipeline.data.coco:Coco2014Instances",
    "CocoInstances": "pipeline.data.coco:CocoInstances",
    "LvisInstances": "pipeline.data.coco:LvisInstances",
    "base_classes": "pipeline.data.folds:base_classes",
    "fold_classes": "pipeline.data.folds:fold_classes",
    "novel_classes": "pipeline.data.folds:novel_classes",
    "load_rgb": "pipeline.data.images:load_rgb",
    "MaskCache": "pipeline.data.mask_cache:MaskCache",
    "Ade20k": "pipeline.data.semantic:Ade20k",
    "Fss1000": "pipeline.data.semantic:Fss1000",
    "PascalVocAug": "pipeline.data.semantic:PascalVocAug",
}, error=AttributeError)
__all__ = _EXPORTS.names()


def __getattr__(name: str) -> object:
    return _EXPORTS.get(name)
