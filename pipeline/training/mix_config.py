"""The typed, frozen configuration of SegIC's training mix (the ``segic_mixed`` sampler).

SegIC trains one model on several segmentation datasets at once, a dataset drawn per sample
(SegIC paper, sec. 4.1 and supplementary A; the authors' ``utils/dataset.py``
``CustomConcatDataset``); facts and deviations: docs/segic_training.md. A :class:`MixConfig` is part
of :class:`~pipeline.training.config.TrainConfig` (``TrainConfig.mix``), so it is logged to MLflow,
recorded in checkpoints and part of the run's fingerprint like everything else.

Source kinds (the data sources of :mod:`pipeline.data`):

==================== =================================== ==========================================
kind                 source                              sample
==================== =================================== ==========================================
``coco_semantic``    the fold's COCO (``CocoInstances``)  a base class of a target image; the
                                                         reference is another image of the class
``ade20k_semantic``  ``Ade20k`` (label PNGs, 0 ignored)   the same, over ADE20k's classes
``coco_instances``   the fold's COCO                     up to ``max_instances`` instances of one
                                                         image; the reference is another view of
                                                         the same image
``lvis_instances``   ``LvisInstances`` (``coco_url``)      the same, over LVIS
``fss1000_semantic`` ``Fss1000`` (a split's class list)  an image, then another image of its class
                                                         (the authors' ``DatasetFSS``)
==================== =================================== ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import ConfigError
from refseg_models.config import FrozenConfig

SEMANTIC_KINDS = ("coco_semantic", "ade20k_semantic", "fss1000_semantic")
INSTANCE_KINDS = ("coco_instances", "lvis_instances")
SOURCE_KINDS = SEMANTIC_KINDS + INSTANCE_KINDS
COCO_KINDS = ("coco_semantic", "coco_instances")
FSS_SPLITS = ("trn", "val", "test")  # HSNet's FSS-1000 class lists (520 / 240 / 240 classes)


@dataclass(frozen=True)
class MixSource(FrozenConfig):
    """One dataset of the mix.

    ``name``: a unique label (metrics, manifests); ``kind``: one of ``SOURCE_KINDS``; ``weight``: its
    relative share of the drawn samples (the authors' ``--dataset_ratio``, uniform by default).
    ``annotations`` / ``images``: the COCO / LVIS json and image folder (the COCO kinds default to the
    fold's ``--annotations`` / ``--images``), or the ADEChallengeData2016 root (``images``) and its
    ``split``, or the FSS-1000 root (``images``, one folder per class) and the split whose classes
    are drawn: ``split`` ``"trn"`` (the default ``"training"`` reads as ``"trn"``), ``"val"`` or
    ``"test"`` names the class list ``<images>/<split>.txt`` (HSNet's ``data/splits/fss/<split>.txt``,
    one folder name a line); ``annotations``, when given, is that class-list file instead (HSNet keeps
    its lists outside the dataset folder). ``store``: the backbone feature store holding this source's
    plain images and/or its cached views (default: the fold's backbone store; must be made with the
    fold's backbone); ``feature_dataset``: the dataset name in that store's feature-set key (default:
    the fold's when the store is the fold's). ``views``: cached augmented views per image in the store (``V``; 0 =
    plain images only), drawn with ``view_seed`` on a ``view_canvas`` canvas (0 = the backbone's input
    size) from SegIC's augmentation of the kind (large-scale jitter for semantic data, random resized
    crop + colour jitter + flip for instance data, docs/segic_cache.md); ``view_plan``: the plan file
    (the record of what is cached; default ``<store>.views.parquet``, a local path).
    """

    name: str = ""
    kind: str = ""
    weight: float = 1.0
    annotations: str = ""
    images: str = ""
    split: str = "training"
    store: str = ""
    feature_dataset: str = ""
    views: int = 0
    view_seed: int = 0
    view_canvas: int = 0
    view_plan: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("every mix source needs a name")
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"mix source {self.name!r}: kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if not self.weight > 0:
            raise ConfigError(f"mix source {self.name!r}: weight must be > 0, got {self.weight}")
        if self.views < 0 or self.view_canvas < 0:
            raise ConfigError(f"mix source {self.name!r}: views and view_canvas must be >= 0")
        if self.kind not in COCO_KINDS and not self.images:
            raise ConfigError(f"mix source {self.name!r} ({self.kind}) needs its images (and annotations) path")
        if self.kind == "lvis_instances" and not self.annotations:
            raise ConfigError(f"mix source {self.name!r}: LVIS needs its annotations json")
        if self.kind == "fss1000_semantic":
            if self.split == "training":  # the field's default (ADE20k's name): FSS-1000's training split
                object.__setattr__(self, "split", "trn")
            if self.split not in FSS_SPLITS:
                raise ConfigError(f"mix source {self.name!r}: the FSS-1000 split must be one of {FSS_SPLITS}, got {self.split!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None) -> "MixSource":
        """Like :meth:`FrozenConfig.from_dict` (unknown keys named), without a default instance
        (a source has no meaningful default)."""
        import dataclasses

        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"MixSource: unknown option(s) {unknown}")
        return cls(**data)

    @property
    def semantic(self) -> bool:
        return self.kind in SEMANTIC_KINDS

    @property
    def coco(self) -> bool:
        return self.kind in COCO_KINDS

    @property
    def class_list(self) -> str:
        """FSS-1000: the file naming the split's class folders (``annotations`` or ``<images>/<split>.txt``)."""
        if self.kind != "fss1000_semantic":
            return ""
        return self.annotations or str(Path(self.images) / f"{self.split}.txt")

    def required_paths(self) -> tuple[tuple[str, str], ...]:
        """(what, path) of every file / folder this source reads, checked before any work is done
        (the COCO kinds read the fold's ``--annotations`` / ``--images``, checked with them)."""
        if self.coco:
            return ()
        if self.kind == "ade20k_semantic":
            return (("ADE20k root", self.images),)
        if self.kind == "lvis_instances":
            return (("LVIS annotations", self.annotations), ("LVIS images", self.images))
        return (("FSS-1000 root", self.images), (f"FSS-1000 {self.split} class list", self.class_list))


def default_sources() -> tuple[MixSource, ...]:
    """The mix when none is configured: the fold's COCO as semantic and as instance data (the only
    sources every COCO-20i run has; ADE20k and LVIS need their paths)."""
    return (MixSource("coco_semantic", "coco_semantic"), MixSource("coco_instances", "coco_instances"))


@dataclass(frozen=True)
class MixConfig(FrozenConfig):
    """SegIC's training mix.

    ``sources``: the datasets (empty = :func:`default_sources`); ``samples_per_epoch``: drawn samples
    per epoch over the whole mix (None = the recipe's, 160k; the authors' ``--samples_per_epoch``).
    ``max_instances``: instance instructions per instance sample (the authors decode at most 10
    instruction sets per image); ``instances_drawn``: the authors draw ``randint(0, instances_drawn
    - 1)`` instances (at least 1) before that cap. ``coco_excluded``: Table 2's dagger setting, the
    COCO sources left out (the paper's ADE20k + LVIS + FSS-1000: whichever of those are configured).
    ``novel_by_name``: keep the fold's novel COCO classes out of the non-COCO sources too, matched by
    class name / synonyms (the COCO sources always use the fold's base classes only).
    ``feature_flip_prob``: probability of a feature-space flip of a served view; ``warp_prob``: probability that a side is a FRESH view of
    the kind's augmentation served by warping the nearest cached view (cells it lacks are invalid
    in the loss); ``min_instance_pixels``: an instance is usable when it keeps at least this many
    pixels in both views (in the model's frame; the authors: 1).
    """

    sources: tuple[MixSource, ...] = ()
    samples_per_epoch: int | None = None
    max_instances: int = 10
    instances_drawn: int = 20
    coco_excluded: bool = False
    novel_by_name: bool = True
    feature_flip_prob: float = 0.5
    warp_prob: float = 0.0
    min_instance_pixels: int = 1

    def __post_init__(self) -> None:
        if not all(isinstance(source, MixSource) for source in self.sources):
            raise ConfigError("MixConfig.sources must be MixSource entries")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"mix source names must be unique, got {names}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if not 1 <= self.max_instances <= self.instances_drawn:
            raise ConfigError(f"need 1 <= max_instances <= instances_drawn, got {self.max_instances}, {self.instances_drawn}")
        for name in ("feature_flip_prob", "warp_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_instance_pixels < 0:
            raise ConfigError("min_instance_pixels must be >= 0")
        if not self.active_sources():
            raise ConfigError("the mix has no source left (coco_excluded drops the COCO sources: add ADE20k / LVIS / FSS-1000 ones)")

    def active_sources(self) -> tuple[MixSource, ...]:
        """The sources drawn from (``coco_excluded`` drops the COCO kinds)."""
        sources = self.sources or default_sources()
        return tuple(s for s in sources if not (self.coco_excluded and s.coco))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None) -> "MixConfig":
        data = dict(data or {})
        if "sources" in data:
            data["sources"] = tuple(
                s if isinstance(s, MixSource) else MixSource.from_dict(s) for s in (data["sources"] or ())
            )
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["sources"] = [source.to_dict() for source in self.sources]
        return out

