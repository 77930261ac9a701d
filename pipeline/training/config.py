"""The one training configuration: typed, frozen, logged to MLflow and recorded in checkpoints.

A :class:`TrainConfig` is everything one fold's training run is a function of: the method (and
overrides of its config), the recipe (the paper's, with overrides), the data (dataset, fold, shot,
annotation type, lists; the training sampler and, for SegIC's mixed-dataset training, the mix), the
frozen feature stores and the encoder weights they were made with, scaling and the run's identity. ``to_dict()`` is what MLflow logs and what the driver hands to
``train_loop_per_worker``; ``from_dict()`` rebuilds it there (unknown keys are refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.folds import check_fold
from pipeline.errors import ConfigError
from pipeline.training.mix_config import MixConfig
from pipeline.training.sampler_registry import check_sampler, recipe_dataset
from refseg_models.annotations import ANNOTATION_TYPES, POINT_STYLES
from refseg_models.build import available_models, method_class, method_config
from refseg_models.config import FrozenConfig
from refseg_models.encoders.precision import PRECISIONS
from refseg_models.errors import ModelError
from refseg_models.recipes import Recipe, recipe_for

DATASETS = ("coco20i", "pascal5i")


@dataclass(frozen=True)
class StoreSpec(FrozenConfig):
    """A frozen encoder, its weights and the store holding its features.

    ``encoder``: registry name (``refseg_models.encoders``); ``checkpoint``: its weights file (the
    sha256 is part of the store's feature-set key); ``options``: builder options with no paths
    (e.g. ``{"preprocessing": ...}``); ``path_options``: builder options that are paths (e.g. the
    proxy SAM's ``backbone_checkpoint``), kept apart so checkpoints never record machine paths;
    ``store``: the store location (path or ``s3://``); ``precision``: what the encoder ran in when the
    store was extracted (``refseg extract --precision``; part of the store's feature-set key).
    """

    encoder: str = ""
    checkpoint: str | None = None
    store: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    path_options: dict[str, str] = field(default_factory=dict)
    precision: str = "float32"


@dataclass(frozen=True)
class TrainConfig(FrozenConfig):
    # -- method and recipe
    method: str = "vrp_sam"
    method_overrides: dict[str, Any] = field(default_factory=dict)
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    # -- data
    dataset: str = "coco20i"
    fold: int = 0
    shot: int = 1
    annotation_type: str = "mask"
    point_style: str = "pixel"
    annotations: str = ""
    images: str = ""
    layout: str = "2017"
    lists_dir: str | None = None
    novel_policy: str = "background"
    # COCO crowd regions: "background" as in the COCO-20i masks HSNet trains and evaluates on
    # (docs/evaluation.md), or "ignore" (255: excluded from losses and the metric).
    crowd: str = "background"
    episodes_per_epoch: int | None = None
    # What an epoch of training samples is (pipeline/training/sampler_registry.py): "episodes" (the fold's
    # base-class episodes) or "segic_mixed" (SegIC's mixed datasets, configured by ``mix``).
    sampler: str = "episodes"
    mix: MixConfig = field(default_factory=MixConfig)
    val_episodes: int = 200
    test_episodes: int = 1000
    test_seed: int = 0
    eval_size: int = 512
    # -- frozen features (``feature_dataset``: the dataset name in the stores' feature-set keys)
    feature_dataset: str = ""
    sam: StoreSpec = field(default_factory=StoreSpec)
    backbone: StoreSpec = field(default_factory=StoreSpec)
    # -- scaling
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 0
    # The trainable model's forward and loss in a training step: "float32", or "bfloat16" autocast (the
    # tensor-core rate on a GPU; weights, gradients and the optimizer stay fp32). Evaluation runs fp32.
    precision: str = "float32"
    # -- the run
    run_name: str = ""
    storage_path: str = ""
    experiment: str = "coco20i"
    max_failures: int = 2
    checkpoints_per_epoch: int = 1
    log_every: int = 10
    overlays: int = 4
    # -- extra test rows on the same episodes: the method before training, training-free baselines
    evaluate_untrained: bool = False
    baselines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in available_models():
            raise ConfigError(f"unknown method {self.method!r}; available: {', '.join(available_models())}")
        if not method_class(self.method).trainable:
            raise ConfigError(
                f"{self.method} is training-free: nothing to train (evaluate it with jobs/evaluate_coco20i.py, "
                "or add it to a training run's test rows with --baseline)"
            )
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        check_fold(self.dataset, self.fold)
        if self.annotation_type not in ANNOTATION_TYPES:
            raise ConfigError(f"annotation type must be one of {ANNOTATION_TYPES}, got {self.annotation_type!r}")
        if self.crowd not in ("background", "ignore"):
            raise ConfigError(f"crowd must be 'background' or 'ignore', got {self.crowd!r}")
        if self.point_style not in POINT_STYLES:
            raise ConfigError(f"point style must be one of {POINT_STYLES}, got {self.point_style!r}")
        for name in ("shot", "val_episodes", "test_episodes", "num_workers", "checkpoints_per_epoch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.episodes_per_epoch is not None and self.episodes_per_epoch < 1:
            raise ConfigError(f"episodes_per_epoch must be >= 1, got {self.episodes_per_epoch}")
        if self.cpus_per_worker <= 0 or self.loader_workers < 0 or self.max_failures < -1:
            raise ConfigError("cpus_per_worker must be > 0, loader_workers >= 0, max_failures >= -1")
        check_sampler(self.sampler, self.method)
        for what, precision in (("precision", self.precision), ("sam.precision", self.sam.precision),
                                ("backbone.precision", self.backbone.precision)):
            if precision not in PRECISIONS:
                raise ConfigError(f"{what} must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(self.mix, MixConfig):
            raise ConfigError(f"mix must be a MixConfig, got {type(self.mix).__name__}")
        try:
            method_config(self.method, self.method_overrides)
            self.recipe
        except ModelError as error:
            raise ConfigError(str(error)) from error
        for baseline in self.baselines:
            if baseline not in available_models():
                raise ConfigError(f"unknown baseline {baseline!r}; available: {', '.join(available_models())}")
        if self.recipe.batch_size % self.num_workers:
            raise ConfigError(
                f"the global batch {self.recipe.batch_size} must split evenly over {self.num_workers} workers "
                "(set recipe_overrides batch_size or num_workers)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> "TrainConfig":
        data = dict(data or {})
        for role in ("sam", "backbone"):
            if isinstance(data.get(role), dict):
                data[role] = StoreSpec.from_dict(data[role])
        if isinstance(data.get("mix"), dict):
            data["mix"] = MixConfig.from_dict(data["mix"])
        overrides = data.get("method_overrides")
        if isinstance(overrides, dict) and overrides and data.get("method") in available_models():
            # JSON turns tuples into lists: read them back with the method config's own types
            try:
                typed = method_config(data["method"], overrides)
                data["method_overrides"] = {k: getattr(typed, k) for k in overrides}
            except ModelError:
                pass  # reported by validation, in its order
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["sam"], out["backbone"] = self.sam.to_dict(), self.backbone.to_dict()
        out["mix"] = self.mix.to_dict()
        return out

    @property
    def recipe(self) -> Recipe:
        """The paper's recipe of the method on the dataset (or on the sampler's data: SegIC's mix has
        its own recipe), with ``recipe_overrides`` applied."""
        return recipe_for(self.method, recipe_dataset(self.sampler, self.dataset)).replace(**self.recipe_overrides)

    @property
    def batch_per_worker(self) -> int:
        return self.recipe.batch_size // self.num_workers

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def fingerprint(self) -> str:
        """A short hash of the configuration, folds and the run's bookkeeping left out: the same
        command gives the same parent run name, so re-running it resumes."""
        skip = ("fold", "run_name", "storage_path", "experiment", "max_failures", "log_every", "overlays")
        payload = {k: v for k, v in self.to_dict().items() if k not in skip}
        if self.sampler == "episodes" and self.mix == MixConfig():
            # fields added with the samplers: left out at their defaults, so earlier runs keep their names
            payload.pop("sampler"), payload.pop("mix")
        if self.precision == "float32":  # added later: left out at their defaults, as above
            payload.pop("precision")
        for role in ("sam", "backbone"):
            if payload[role].get("precision") == "float32":
                payload[role].pop("precision")
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def default_run_name(self) -> str:
        """``<method>-<dataset>-<shot>shot-<annotation>-s<seed>-<fingerprint>``, deterministic."""
        return f"{self.method}-{self.dataset}-{self.shot}shot-{self.annotation_type}-s{self.seed}-{self.fingerprint()}"

    @property
    def registered_model_name(self) -> str:
        """The MLflow registered model of this method and protocol (one version per fold and seed)."""
        return f"refseg-{self.method}-{self.dataset}-{self.shot}shot-{self.annotation_type}"

    @property
    def fold_run_name(self) -> str:
        """The Ray Train run name of this fold (its folder under ``storage_path``)."""
        return f"{self.run_name}-fold{self.fold}"
