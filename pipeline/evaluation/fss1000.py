"""The FSS-1000 one-shot (and k-shot) evaluation job: HSNet's FSS-1000 test (``data/fss.py``
``DatasetFSS``) on a seeded episode manifest, with the COCO-20i job's predictor, runner and meter.

The test split is a class list (HSNet's ``data/splits/fss/test.txt``: 240 folder names; ``lists_dir``
or ``<root>/test.txt``). Every image of every test class is the query of one episode (10 images a
class -> 2,400 episodes), its supports drawn among the other images of its class from a seed per
episode (:func:`pipeline.episodes.manifest.build_every_query_manifest`; HSNet's draw is unseeded, so
not bit-identical: docs/protocol.md). Metric: HSNet's meter over the test classes (class-wise mIoU,
FB-IoU) at the COCO job's evaluation resolution. Everything that needs neither Ray nor images is
checked first, then the class folders and the manifest, all before Ray starts; ``results.json`` says
``running`` / ``complete`` / ``failed``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.data.folds import COCO_CLASS_NAMES, normalise_name
from pipeline.data.semantic import Fss1000
from pipeline.episodes.annotations import ANNOTATION_TYPES
from pipeline.episodes.manifest import build_every_query_manifest, write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import common
from pipeline.evaluation.resolution import EvalResolution
from pipeline.evaluation.runner import Evaluation, RayEvaluation
from pipeline.report import SkipReport
from pipeline.store.fs import io_errors

SPLIT = "test"
MANIFEST_NAME = "episodes_fss1000_test.parquet"
PROTOCOL = (
    "HSNet's FSS-1000 test (data/fss.py): every image of every test class is a query once, supports drawn "
    "among the other images of its class; refseg draws them from a seed per episode (seeded manifest), "
    "HSNet with unseeded np.random, so the supports are not bit-identical to HSNet's"
)
COCO_OVERLAP_NOTE = (
    "these test classes share a name with a COCO class: a model trained on COCO saw them, so their numbers "
    "are not unseen-class numbers unless its training excluded them (SegIC coco_excluded, docs/segic_training.md)"
)


@dataclass
class Fss1000EvaluateConfig(common.PredictorOptions):
    """The FSS-1000 job: its data and episodes; what predicts is :class:`~pipeline.evaluation.common.PredictorOptions`
    (the COCO-20i job's too)."""

    root: str  # FSS-1000: one folder per class, <class>/<n>.jpg + <n>.png
    lists_dir: str | None = None  # folder with HSNet's test.txt; None -> <root>/test.txt
    shot: int = 1
    seed: int = 0
    annotation_type: str = "mask"
    output_dir: str = "outputs/evaluate_fss1000"
    # the COCO job's default resolution (docs/protocol.md: FSS-1000 one-shot): PredictorOptions' "fixed", 512

    def class_list(self) -> Path:
        return (Path(self.lists_dir) if self.lists_dir is not None else Path(self.root)) / f"{SPLIT}.txt"

    def validate(self) -> None:
        """Every check that needs no Ray and no images: raises ConfigError naming the bad value. Sets
        ``method`` to the one that predicts (the checkpoint's, or the training-free default)."""
        if self.shot < 1:
            raise ConfigError(f"shot must be >= 1, got {self.shot}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.annotation_type not in ANNOTATION_TYPES:
            raise ConfigError(f"annotation_type must be one of {ANNOTATION_TYPES}, got {self.annotation_type!r}")
        if not Path(self.root).is_dir():
            raise ConfigError(f"FSS-1000 folder not found: {self.root}")
        common.check_paths(((self.lists_dir, "dir"),))
        self.validate_predictor()
        if not self.class_list().is_file():
            raise ConfigError(
                f"FSS-1000 {SPLIT} class list not found: {self.class_list()} (HSNet's data/splits/fss/{SPLIT}.txt)"
            )
        self.method = common.check_method(self)  # last: it loads the checkpoint


def read_class_list(path: str | Path) -> list[str]:
    """A split's folder names, one a line (blank lines ignored), sorted as HSNet sorts them."""
    path = Path(path)
    with io_errors(f"cannot read {path}"):
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: the class list is empty")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: classes listed twice: {duplicates[:5]}")
    return sorted(names)


@dataclass(frozen=True)
class Fss1000SourceFactory:
    """The test split's :class:`Fss1000` source (class id = rank of the folder name in the sorted list,
    i.e. HSNet's class id minus 760), built again inside each Ray worker."""

    root: str
    classes: tuple[str, ...]

    def __call__(self) -> Fss1000:
        return Fss1000(self.root, list(self.classes))


def fss1000_test_manifest(source: Fss1000, shot: int, seed: int, annotation_type: str = "mask",
                          report: SkipReport | None = None):
    """Every image of every class of ``source`` a query once (:func:`build_every_query_manifest`)."""
    images = {class_id: source.images_of_class(class_id) for class_id in range(len(source.class_names))}
    return build_every_query_manifest(images, dataset="fss1000", fold=0, split=SPLIT, shot=shot, seed=seed,
                                      annotation_type=annotation_type, report=report)


def coco_named_classes(class_names: list[str]) -> list[str]:
    """The classes whose folder name is a COCO class name (compared as the SegIC mix compares them)."""
    coco = {normalise_name(name) for name in COCO_CLASS_NAMES}
    return [name for name in class_names if normalise_name(name) in coco]


def run(config: Fss1000EvaluateConfig, evaluation: Evaluation | None = None) -> dict:
    """Evaluate FSS-1000's test split with ``evaluation`` (default: Ray tasks on ``config.ray_address``),
    started only once every input is checked and the episode file is written."""
    evaluation = evaluation or RayEvaluation(config.ray_address)
    config.validate()
    classes = read_class_list(config.class_list())
    source_factory = Fss1000SourceFactory(config.root, tuple(classes))
    source = source_factory()  # a missing class folder is a DataError here, before any output
    resolution = EvalResolution(config.resolution_mode, config.resolution_size)  # type: ignore[arg-type]
    sampling_report = SkipReport(f"FSS-1000 {SPLIT} episodes")
    table = fss1000_test_manifest(source, config.shot, config.seed, config.annotation_type, sampling_report)
    print(sampling_report.summary())
    predictor_factory = config.predictor_factory()
    # Every input is checked: only now is anything written (a refused run leaves no config.json).
    output_dir = Path(config.output_dir)
    with io_errors(f"cannot create the output folder {output_dir}"):
        output_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(output_dir / "config.json", asdict(config))
    manifest_path = write_manifest(table, output_dir / MANIFEST_NAME)
    class_ids = list(range(len(classes)))
    overlap = coco_named_classes(classes)

    results: dict = {
        "status": "running",
        "method": config.method,
        "checkpoint": config.checkpoint,
        "benchmark": "fss1000",
        "split": SPLIT,
        "shot": config.shot,
        "class_list": str(config.class_list()),
        "classes": len(classes),
        "manifest": MANIFEST_NAME,
        "manifest_episodes": table.num_rows,
        "protocol": PROTOCOL,
        "resolution": resolution.describe(),
        "coco_named_classes": overlap,
        "coco_named_classes_note": COCO_OVERLAP_NOTE,
    }
    results_path = output_dir / "results.json"
    common.write_json(results_path, results)
    evaluation.start()
    try:
        started = time.perf_counter()
        meter, eval_report = evaluation(
            manifest_path, source_factory, predictor_factory, class_ids, resolution, config.num_workers
        )
        results.update(common.split_result(meter, classes, sampling_report, eval_report))
        print(eval_report.summary())
        print(
            f"FSS-1000 {SPLIT} {config.shot}-shot: mIoU {results['miou']:.2f}  FB-IoU {results['fbiou']:.2f}  "
            f"({results['episodes']} episodes, {len(classes)} classes, {resolution.describe()}, "
            f"{time.perf_counter() - started:.1f} s)"
        )
    except BaseException as error:
        results["status"] = "failed"
        results["error"] = f"{type(error).__name__}: {error}"
        common.write_json(results_path, results)
        raise
    results["status"] = "complete"
    common.write_json(results_path, results)
    print(f"-> {results_path}")
    return results
