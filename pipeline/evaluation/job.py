"""The COCO-20i evaluation job: episodes -> predictions -> HSNet metric, fold by fold, on Ray.

One typed, serialisable config (:class:`EvaluateConfig`) drives it. Everything that can be checked
without Ray is checked before Ray starts: the config (folds, shot, n, paths, names), the annotation
file (its category ids must be COCO's 80; its skip report is printed and saved) and every fold's
episode manifest. Then each fold is evaluated and ``results.json`` is rewritten as soon as a fold
finishes (``status`` says ``running`` / ``complete`` / ``failed``), so a failure in fold 3 keeps
folds 0-2. The job writes the config, the manifests, the skip reports and the metrics under
``output_dir`` so every number is traceable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.base import pairs_by_pixel_rule
from pipeline.data.coco import CROWD_MODES, Coco2014Instances, CocoInstances
from pipeline.data.folds import COCO_CLASS_NAMES, check_fold, novel_classes
from pipeline.data.splits import map_coco20i_list, read_coco20i_list
from pipeline.episodes.annotations import ANNOTATION_TYPES
from pipeline.episodes.manifest import build_episode_manifest, write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.common import (
    PredictorFactory,
    PredictorOptions,
    check_method,
    check_paths,
    sam_checkpoint_for,
    split_result,
    write_json,
)
from pipeline.evaluation.resolution import EvalResolution
from pipeline.evaluation.runner import Evaluation, RayEvaluation
from pipeline.report import SkipReport
from pipeline.store.fs import io_errors

# The predictor pieces live in pipeline.evaluation.common (shared with the FSS-1000 job); re-exported here.
__all__ = ["EvaluateConfig", "PredictorFactory", "SourceFactory", "run", "sam_checkpoint_for", "write_json"]

# The 80 COCO category ids (1..90 with gaps); class id = rank in this list (HSNet; docs/protocol.md).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

CROWD_MEANING = {
    "background": "crowd regions (iscrowd=1) not covered by a non-crowd instance of the class are background (0), "
    "as in the COCO-20i masks HSNet/PFENet evaluate on (HSNet-compatible)",
    "ignore": "crowd regions (iscrowd=1) not covered by a non-crowd instance of the class are ignored (255): "
    "excluded from intersections and unions (not HSNet's masks)",
}


@dataclass
class EvaluateConfig(PredictorOptions):
    """The COCO-20i job: its data, folds and episodes; what predicts is :class:`PredictorOptions`."""

    annotations: str
    images: str
    lists_dir: str | None = None  # HSNet lists; None -> pixel-rule pairs from the json
    layout: str = "2017"
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    shot: int = 1
    n_episodes: int = 1000
    seed: int = 0
    annotation_type: str = "mask"
    # "background" = HSNet's COCO-20i masks (the default for HSNet-protocol numbers), or "ignore" (255).
    crowd: str = "background"
    output_dir: str = "outputs/evaluate"

    def validate(self) -> None:
        """Every check that needs no Ray and no images: raises ConfigError naming the bad value. Sets
        ``method`` to the one that predicts (the checkpoint's, or the training-free default)."""
        if not self.folds:
            raise ConfigError("folds is empty: give at least one of 0 1 2 3")
        for fold in self.folds:
            check_fold("coco20i", fold)
        if len(set(self.folds)) != len(self.folds):
            raise ConfigError(f"folds {self.folds} name a fold twice")
        if self.shot < 1:
            raise ConfigError(f"shot must be >= 1, got {self.shot}")
        if self.n_episodes < 1:
            raise ConfigError(f"n_episodes must be >= 1, got {self.n_episodes}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.layout not in ("2017", "2014"):
            raise ConfigError(f"layout must be '2017' or '2014', got {self.layout!r}")
        if self.annotation_type not in ANNOTATION_TYPES:
            raise ConfigError(f"annotation_type must be one of {ANNOTATION_TYPES}, got {self.annotation_type!r}")
        if self.crowd not in CROWD_MODES:
            raise ConfigError(f"crowd must be one of {CROWD_MODES}, got {self.crowd!r}")
        check_paths(((self.annotations, "file"), (self.images, "dir")))
        self.validate_predictor()
        if self.lists_dir is not None:
            missing = [str(Path(self.lists_dir) / "val" / f"fold{fold}.json") for fold in self.folds
                       if not (Path(self.lists_dir) / "val" / f"fold{fold}.json").is_file()]
            if missing:
                raise ConfigError(f"HSNet COCO-20i lists not found: {', '.join(missing)}")
        self.method = check_method(self)  # last: it loads the checkpoint


@dataclass(frozen=True)
class SourceFactory:
    annotations: str
    images: str
    layout: str
    crowd: str = "background"

    def __call__(self) -> CocoInstances:
        source_type = Coco2014Instances if self.layout == "2014" else CocoInstances
        return source_type(self.annotations, self.images, verbose=False, crowd=self.crowd)


def check_categories(source: CocoInstances) -> None:
    """Fail when a whole category id set does not match: the json's categories are not COCO's 80
    (class ids = ranks would name other classes), or none of its annotations is usable."""
    ids = set(source.category_ids)
    if ids != set(COCO_CATEGORY_IDS):
        missing, unexpected = sorted(set(COCO_CATEGORY_IDS) - ids), sorted(ids - set(COCO_CATEGORY_IDS))
        raise DataError(
            f"{source.annotation_file}: its {len(ids)} category ids are not COCO's 80 (missing {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}); "
            "COCO-20i folds are defined on COCO's categories, by rank of their ids"
        )
    if not source.coco.dataset["annotations"]:
        raise DataError(f"{source.annotation_file}: no usable annotation is left. {source.report.summary()}")


def _fold_manifest(config: EvaluateConfig, source: CocoInstances, fold: int) -> tuple[pa.Table, SkipReport]:
    report = SkipReport(f"fold {fold} episodes")
    classes = novel_classes("coco20i", fold)
    if config.lists_dir is not None:
        pairs = map_coco20i_list(read_coco20i_list(config.lists_dir, "val", fold), source, report)
        pairs = {class_id: pairs.get(class_id, []) for class_id in classes}
    else:
        pairs = pairs_by_pixel_rule(source, classes)
    table: pa.Table = build_episode_manifest(
        pairs, dataset="coco", fold=fold, split="test", n_episodes=config.n_episodes, shot=config.shot,
        seed=config.seed, annotation_type=config.annotation_type, report=report,
    )
    return table, report


def run(config: EvaluateConfig, evaluation: Evaluation | None = None) -> dict:
    """Evaluate ``config``'s folds with ``evaluation`` (default: Ray tasks on ``config.ray_address``),
    started only once every input is checked and the episode files are written."""
    evaluation = evaluation or RayEvaluation(config.ray_address)
    config.validate()
    resolution = EvalResolution(config.resolution_mode, config.resolution_size)  # type: ignore[arg-type]
    source_factory = SourceFactory(config.annotations, config.images, config.layout, config.crowd)
    source = source_factory()
    print(source.report.summary())  # annotations that reference unknown images/categories: shown, saved
    check_categories(source)
    tables = {fold: _fold_manifest(config, source, fold) for fold in config.folds}
    for _, sampling_report in tables.values():
        print(sampling_report.summary())
    predictor_factory = config.predictor_factory()
    # Every input is checked: only now is anything written (a refused run leaves no config.json).
    output_dir = Path(config.output_dir)
    with io_errors(f"cannot create the output folder {output_dir}"):
        output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "config.json", asdict(config))
    manifests = {
        fold: (write_manifest(table, output_dir / f"episodes_fold{fold}.parquet"), report)
        for fold, (table, report) in tables.items()
    }

    results: dict = {
        "status": "running",
        "method": config.method,
        "checkpoint": config.checkpoint,
        "resolution": resolution.describe(),
        "crowd": config.crowd,
        "crowd_meaning": CROWD_MEANING[config.crowd],
        "skipped_annotations": source.report.as_dict(),
        "folds_pending": list(config.folds),
        "folds": {},
    }
    results_path = output_dir / "results.json"
    write_json(results_path, results)
    evaluation.start()
    try:
        for fold in config.folds:
            manifest_path, sampling_report = manifests[fold]
            classes = novel_classes("coco20i", fold)
            started = time.perf_counter()
            meter, eval_report = evaluation(
                manifest_path, source_factory, predictor_factory, classes, resolution, config.num_workers
            )
            fold_result = split_result(meter, COCO_CLASS_NAMES, sampling_report, eval_report)
            print(eval_report.summary())
            print(
                f"fold {fold}: mIoU {fold_result['miou']:.2f}  FB-IoU {fold_result['fbiou']:.2f}  "
                f"({fold_result['episodes']} episodes, {resolution.describe()}, crowd={config.crowd}, "
                f"{time.perf_counter() - started:.1f} s)"
            )
            results["folds"][str(fold)] = fold_result
            results["folds_pending"].remove(fold)
            write_json(results_path, results)  # each finished fold is on disk at once
    except BaseException as error:
        results["status"] = "failed"
        results["error"] = f"{type(error).__name__}: {error}"
        write_json(results_path, results)
        raise
    results["status"] = "complete"
    results["mean_miou"] = float(np.mean([fold["miou"] for fold in results["folds"].values()]))
    write_json(results_path, results)
    print(f"mean mIoU over folds {config.folds}: {results['mean_miou']:.2f}  -> {results_path}")
    return results
