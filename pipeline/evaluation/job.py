"""The COCO-20i evaluation job: episodes -> predictions -> HSNet metric, fold by fold, on Ray.

One typed, serialisable config (:class:`EvaluateConfig`) drives it; the job writes the config,
the manifests, the skip report and the metrics under ``output_dir`` so every number is traceable.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.data.base import pairs_by_pixel_rule
from pipeline.data.coco import Coco2014Instances, CocoInstances
from pipeline.data.folds import COCO_CLASS_NAMES, novel_classes
from pipeline.data.splits import map_coco20i_list, read_coco20i_list
from pipeline.episodes.manifest import build_episode_manifest, write_manifest
from pipeline.errors import ConfigError
from pipeline.evaluation.resolution import EvalResolution
from pipeline.evaluation.runner import Episode, Predictor, evaluate_manifest_with_ray
from pipeline.report import SkipReport


@dataclass
class EvaluateConfig:
    annotations: str
    images: str
    backbone_checkpoint: str
    lists_dir: str | None = None  # HSNet lists; None -> pixel-rule pairs from the json
    layout: str = "2017"
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    shot: int = 1
    n_episodes: int = 1000
    seed: int = 0
    annotation_type: str = "mask"
    method: str = "prototype_matching"
    backbone: str = "mobilenet_v2"
    feature: str = "layer4"
    resolution_mode: str = "fixed"
    resolution_size: int = 512
    num_workers: int = 2
    ray_address: str | None = None  # None: an existing cluster if RAY_ADDRESS is set, else embedded local Ray
    output_dir: str = "outputs/evaluate"

    def validate(self) -> None:
        if self.method != "prototype_matching":
            raise ConfigError(f"method {self.method!r} is not evaluable by this job yet (prototype_matching is)")
        for path in (self.annotations, self.images, self.backbone_checkpoint):
            if not Path(path).exists():
                raise ConfigError(f"path not found: {path}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        EvalResolution(self.resolution_mode, self.resolution_size)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SourceFactory:
    annotations: str
    images: str
    layout: str

    def __call__(self) -> CocoInstances:
        source_type = Coco2014Instances if self.layout == "2014" else CocoInstances
        return source_type(self.annotations, self.images, verbose=False)


@dataclass(frozen=True)
class PrototypeMatchingFactory:
    """Builds, inside each worker, the live backbone + training-free prototype matcher."""

    backbone: str
    backbone_checkpoint: str
    feature: str

    def __call__(self) -> Predictor:
        from refseg_models import build_model
        from refseg_models.encoders import build_encoder

        from refseg_models.modeling.inputs import EpisodeFeatures

        backbone = build_encoder(self.backbone, self.backbone_checkpoint)
        model = build_model("prototype_matching", feature=self.feature).eval()

        def predict(episode: Episode) -> torch.Tensor:
            query = backbone(backbone.preprocess(episode.query_image)[None])
            supports = torch.stack([backbone.preprocess(image) for image in episode.support_images])
            reference = {name: value[None] for name, value in backbone(supports).items()}
            masks = torch.from_numpy(np.stack(episode.support_annotations))[None].float()
            features = EpisodeFeatures(reference_masks=masks, target_backbone=query, reference_backbone=reference)
            return model.mask_logits(model(features))[0, 0]

        return predict


def run(config: EvaluateConfig) -> dict:
    import ray

    config.validate()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    resolution = EvalResolution(config.resolution_mode, config.resolution_size)  # type: ignore[arg-type]
    source_factory = SourceFactory(config.annotations, config.images, config.layout)
    source = source_factory()
    predictor_factory = PrototypeMatchingFactory(config.backbone, config.backbone_checkpoint, config.feature)

    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
    results: dict = {"resolution": resolution.describe(), "folds": {}}
    for fold in config.folds:
        report = SkipReport(f"fold {fold} episodes")
        classes = novel_classes("coco20i", fold)
        if config.lists_dir is not None:
            pairs = map_coco20i_list(read_coco20i_list(config.lists_dir, "val", fold), source, report)
            pairs = {class_id: pairs.get(class_id, []) for class_id in classes}
        else:
            pairs = pairs_by_pixel_rule(source, classes)
        table = build_episode_manifest(
            pairs, dataset="coco", fold=fold, split="test", n_episodes=config.n_episodes, shot=config.shot,
            seed=config.seed, annotation_type=config.annotation_type, report=report,
        )
        manifest_path = write_manifest(table, output_dir / f"episodes_fold{fold}.parquet")
        started = time.perf_counter()
        meter, eval_report = evaluate_manifest_with_ray(
            manifest_path, source_factory, predictor_factory, classes, resolution, config.num_workers
        )
        metrics = meter.compute()
        print(report.summary())
        print(eval_report.summary())
        print(
            f"fold {fold}: mIoU {metrics['miou']:.2f}  FB-IoU {metrics['fbiou']:.2f}  "
            f"({metrics['episodes']} episodes, {resolution.describe()}, {time.perf_counter() - started:.1f} s)"
        )
        results["folds"][str(fold)] = {
            "miou": metrics["miou"],
            "fbiou": metrics["fbiou"],
            "episodes": metrics["episodes"],
            "per_class_iou": {COCO_CLASS_NAMES[c]: v for c, v in metrics["per_class_iou"].items()},
            "skipped_sampling": report.as_dict(),
            "skipped_evaluation": eval_report.as_dict(),
        }
    mious = [fold["miou"] for fold in results["folds"].values()]
    results["mean_miou"] = float(np.mean(mious))
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"mean mIoU over folds {config.folds}: {results['mean_miou']:.2f}  -> {output_dir / 'results.json'}")
    return results
