"""COCO-20i -> PASCAL (domain shift): the class-disjoint PASCAL folds, and the evaluation of a
COCO-trained model (or a training-free method) on them.

The fold definition is data (``benchmarks/folds/coco2pascal.yaml``; docs/protocol.md, "COCO ->
PASCAL"): fold i tests the VOC classes whose COCO counterpart is a novel class of COCO-20i fold i.
:func:`load_folds` reads it and refuses it unless it equals :func:`derived_folds`, the same rule
computed from ``pipeline.data.folds`` and the file's VOC -> COCO name map, so neither can drift.

Episodes: the (image, class) pairs of the official HSNet PASCAL-5i ``val`` lists of all four folds
(together: every VOC 2012 val pair of the 20 classes) restricted to the fold's classes, drawn
HSNet-style from a seed (:func:`pipeline.episodes.manifest.build_episode_manifest`); metric, runner
and predictor are the COCO-20i evaluation job's (:mod:`pipeline.evaluation`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.data.folds import COCO_CLASS_NAMES, NUM_FOLDS, PASCAL_CLASS_NAMES, novel_classes
from pipeline.data.semantic import PascalVocAug
from pipeline.data.splits import read_pascal5i_list
from pipeline.episodes.annotations import ANNOTATION_TYPES
from pipeline.episodes.manifest import build_episode_manifest, write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import common
from pipeline.evaluation.resolution import EvalResolution
from pipeline.evaluation.runner import Evaluation, RayEvaluation
from pipeline.report import SkipReport
from pipeline.store.fs import io_errors

FOLDS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "folds" / "coco2pascal.yaml"
MANIFEST_NAME = "episodes_coco2pascal.parquet"
PROTOCOL = ("COCO-20i -> PASCAL: trained on COCO-20i fold i's base classes, tested on the VOC classes whose COCO "
            "counterpart is a novel class of fold i (benchmarks/folds/coco2pascal.yaml), episodes drawn from the "
            "HSNet PASCAL-5i val lists")


def derived_folds(voc_to_coco: dict[str, str]) -> dict[int, list[int]]:
    """{fold: 0-based VOC class ids} by the rule: a VOC class is tested in the COCO-20i fold where its
    COCO counterpart (same name unless ``voc_to_coco`` maps it) is novel."""
    coco_index = {name: index for index, name in enumerate(COCO_CLASS_NAMES)}
    folds: dict[int, list[int]] = {fold: [] for fold in range(NUM_FOLDS)}
    for voc_id, voc_name in enumerate(PASCAL_CLASS_NAMES):
        coco_name = voc_to_coco.get(voc_name, voc_name)
        if coco_name not in coco_index:
            raise ConfigError(f"VOC class {voc_name!r}: no COCO class named {coco_name!r} (fix voc_to_coco)")
        for fold in range(NUM_FOLDS):
            if coco_index[coco_name] in novel_classes("coco20i", fold):
                folds[fold].append(voc_id)
    return folds


def load_folds(path: str | Path = FOLDS_FILE) -> dict[int, list[int]]:
    """The fold definition file as {fold: 0-based VOC class ids}, checked against :func:`derived_folds`."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the COCO -> PASCAL fold definition {path}: {error}") from error
    names = {name: index for index, name in enumerate(PASCAL_CLASS_NAMES)}
    folds: dict[int, list[int]] = {}
    for fold, classes in (raw.get("folds") or {}).items():
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ConfigError(f"{path}: fold {fold} names unknown VOC classes {unknown}")
        folds[int(fold)] = sorted(names[c] for c in classes)
    derived = derived_folds(dict(raw.get("voc_to_coco") or {}))
    if folds != derived:
        raise ConfigError(f"{path}: its folds {folds} differ from the rule (a VOC class is tested where its COCO class is "
                          f"novel) {derived}")
    return folds


@dataclass
class Coco2PascalEvaluateConfig(common.PredictorOptions):
    """One COCO -> PASCAL evaluation: its data and episodes; what predicts (a trained model's
    ``checkpoint`` or a training-free ``method``) is :class:`~pipeline.evaluation.common.PredictorOptions`."""

    root: str  # PASCAL VOC 2012 + SBD (JPEGImages, SegmentationClassAug)
    lists_dir: str  # HSNet PASCAL-5i lists (val/fold*.txt)
    fold: int
    shot: int = 1
    n_episodes: int = 1000
    seed: int = 0
    annotation_type: str = "mask"
    output_dir: str = "outputs/evaluate_coco2pascal"

    def validate(self) -> None:
        if not 0 <= self.fold < NUM_FOLDS:
            raise ConfigError(f"fold must be in 0..{NUM_FOLDS - 1}, got {self.fold}")
        if self.shot < 1 or self.n_episodes < 1:
            raise ConfigError("shot and n_episodes must be >= 1")
        if self.annotation_type not in ANNOTATION_TYPES:
            raise ConfigError(f"annotation_type must be one of {ANNOTATION_TYPES}, got {self.annotation_type!r}")
        if not (Path(self.root) / "JPEGImages").is_dir():
            raise ConfigError(f"PASCAL VOC root not found (no JPEGImages folder): {self.root}")
        common.check_paths(((self.lists_dir, "dir"),))
        self.validate_predictor()
        self.method = common.check_method(self)  # last: it loads the checkpoint


@dataclass(frozen=True)
class PascalSourceFactory:
    root: str

    def __call__(self) -> PascalVocAug:
        return PascalVocAug(self.root)


def pascal_test_pairs(lists_dir: str, classes: list[int], known: set[str], report: SkipReport) -> dict[int, list[str]]:
    """{class id: images} of the val lists of all folds, for ``classes``, images at hand only."""
    pairs: dict[int, list[str]] = {c: [] for c in classes}
    for list_fold in range(NUM_FOLDS):
        for name, class_id in read_pascal5i_list(lists_dir, "val", list_fold):
            if class_id not in pairs:
                continue
            if name in known:
                pairs[class_id].append(name)
            else:
                report.skip("list image not in the PASCAL root", name)
    return pairs


def episode_manifest(config: Coco2PascalEvaluateConfig, source: PascalVocAug, classes: list[int],
                     report: SkipReport) -> pa.Table:
    pairs = pascal_test_pairs(config.lists_dir, classes, set(source.image_ids()), report)
    return build_episode_manifest(pairs, dataset="coco2pascal", fold=config.fold, split="test", n_episodes=config.n_episodes,
                                  shot=config.shot, seed=config.seed, annotation_type=config.annotation_type, report=report)


def run(config: Coco2PascalEvaluateConfig, folds_file: str | Path = FOLDS_FILE, evaluation: Evaluation | None = None) -> dict:
    """Evaluate on the fold's PASCAL classes with ``evaluation`` (default: Ray tasks on
    ``config.ray_address``); returns (and writes) ``results.json``."""
    evaluation = evaluation or RayEvaluation(config.ray_address)
    config.validate()
    classes = load_folds(folds_file)[config.fold]
    source = PascalSourceFactory(config.root)()
    report = SkipReport(f"COCO -> PASCAL fold {config.fold} episodes")
    table = episode_manifest(config, source, classes, report)
    print(report.summary())
    predictor_factory = config.predictor_factory()
    resolution = EvalResolution(config.resolution_mode, config.resolution_size)  # type: ignore[arg-type]
    output_dir = Path(config.output_dir)
    with io_errors(f"cannot create the output folder {output_dir}"):
        output_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(output_dir / "config.json", asdict(config))
    manifest_path = write_manifest(table, output_dir / MANIFEST_NAME)
    results: dict = {"status": "running", "method": config.method, "checkpoint": config.checkpoint, "benchmark": "coco2pascal",
                     "fold": config.fold, "classes": [PASCAL_CLASS_NAMES[c] for c in classes], "protocol": PROTOCOL,
                     "manifest_episodes": table.num_rows, "resolution": resolution.describe()}
    results_path = output_dir / "results.json"
    common.write_json(results_path, results)
    evaluation.start()
    try:
        started = time.perf_counter()
        meter, eval_report = evaluation(manifest_path, PascalSourceFactory(config.root), predictor_factory, classes,
                                        resolution, config.num_workers)
        results.update(common.split_result(meter, dict(enumerate(PASCAL_CLASS_NAMES)), report, eval_report))
        results["seconds"] = time.perf_counter() - started
    except BaseException as error:
        results["status"], results["error"] = "failed", f"{type(error).__name__}: {error}"
        common.write_json(results_path, results)
        raise
    if results["episodes"] == 0:
        raise DataError(f"COCO -> PASCAL fold {config.fold}: no episode could be evaluated ({eval_report.summary()})")
    results["status"] = "complete"
    common.write_json(results_path, results)
    return results
