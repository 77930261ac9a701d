"""Command lines of the training jobs (``jobs/train_coco20i.py``, ``jobs/train_pascal5i.py``) and of
``refseg compare``; they only turn arguments into a :class:`TrainConfig` + :class:`JobOptions`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.locations import resolve_root
from refseg_models.errors import ModelError
from pipeline.training.config import StoreSpec, TrainConfig
from pipeline.training.job import JobOptions
from pipeline.training.mix_config import MixConfig
from pipeline.training.sampler_registry import SAMPLERS
from refseg_models.annotations import ANNOTATION_TYPES, POINT_STYLES
from refseg_models.build import available_models, method_config
from refseg_models.encoders import available_encoders, encoder_options
from refseg_models.encoders.precision import PRECISIONS
from refseg_models.encoders.sam_proxy import PROXY_ENCODER as DEFAULT_SAM_ENCODER  # the CPU default (docs/proxy_sam.md)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _json_object_or_file(text: str) -> dict[str, Any]:
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text()
    return _json_object(text)


def add_train_arguments(parser: argparse.ArgumentParser, dataset: str) -> None:
    what = parser.add_argument_group("method and recipe")
    what.add_argument("--method", default="vrp_sam", choices=available_models())
    what.add_argument("--method-options", type=_json_object, default={}, help='method config overrides, e.g. \'{"num_samples": 4}\'')
    what.add_argument("--epochs", type=int, help="default: the paper's recipe")
    what.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    what.add_argument("--lr", type=float, help="default: the recipe's")
    what.add_argument("--recipe-options", type=_json_object, default={}, help="other recipe overrides (JSON)")
    what.add_argument("--episodes-per-epoch", type=int, help="default: one episode per training pair (HSNet)")
    what.add_argument("--sampler", choices=SAMPLERS.names(), default="episodes",
                      help="training data: the fold's episodes, or SegIC's mixed datasets (segic_mixed)")
    what.add_argument("--mix", type=_json_object_or_file, default={},
                      help="segic_mixed: the mix as JSON or a JSON file (sources, weights, stores, views; "
                           "pipeline/training/mix_config.py, docs/segic_training.md)")
    what.add_argument("--samples-per-epoch", type=int, help="segic_mixed: samples per epoch (default: the recipe's, 160k)")
    what.add_argument("--coco-excluded", action="store_true",
                      help="segic_mixed: leave the COCO sources out (Table 2's dagger: the mix's ADE20k / LVIS / "
                           "FSS-1000 sources remain)")

    data = parser.add_argument_group("data")
    data.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    data.add_argument("--shot", type=int, default=1)
    data.add_argument("--annotation-type", choices=ANNOTATION_TYPES, default="mask")
    data.add_argument("--point-style", choices=POINT_STYLES, default="pixel", help="pixel: the authors' points")
    if dataset == "coco20i":
        data.add_argument("--annotations", required=True, help="COCO instances json")
        data.add_argument("--images", required=True, help="image folder")
        data.add_argument("--layout", choices=("2017", "2014"), default="2017")
    else:
        data.add_argument("--images", required=True, help="PASCAL VOC root (JPEGImages, SegmentationClassAug)")
    data.add_argument("--lists-dir", help="official HSNet lists (omit: the pixel rule)")
    data.add_argument("--novel-policy", choices=("background", "drop"), default="background")
    data.add_argument("--crowd", choices=("background", "ignore"), default="background",
                      help="COCO crowd regions: background (HSNet's masks) or ignored")
    data.add_argument("--val-episodes", type=int, default=200)
    data.add_argument("--test-episodes", type=int, default=1000)
    data.add_argument("--test-seed", type=int, default=0)

    frozen = parser.add_argument_group("frozen encoders and their feature stores")
    frozen.add_argument("--feature-dataset", help="dataset name in the stores' keys (default: from --images)")
    frozen.add_argument("--sam-encoder", default=DEFAULT_SAM_ENCODER, choices=available_encoders())
    frozen.add_argument("--sam-checkpoint", help="SAM weights (default: the shipped proxy SAM)")
    frozen.add_argument("--sam-store", help="default: <root>/stores/<feature dataset>-<sam encoder>")
    frozen.add_argument("--backbone", default="mobilenet_v2", choices=available_encoders())
    frozen.add_argument("--backbone-checkpoint", required=True, help="backbone weights file")
    frozen.add_argument("--backbone-store", help="default: <root>/stores/<feature dataset>-<backbone>")
    for role in ("sam", "backbone"):
        frozen.add_argument(f"--{role}-precision", choices=PRECISIONS, default="float32",
                            help=f"what the {role} encoder ran in for its store (refseg extract --precision; a bfloat16 "
                                 f"store's default location ends in -bfloat16)")
    frozen.add_argument("--extract-missing", action="store_true", help="extract missing stores first")

    scale = parser.add_argument_group("scaling")
    scale.add_argument("--num-workers", type=int, default=2)
    scale.add_argument("--use-gpu", action="store_true")
    scale.add_argument("--cpus-per-worker", type=float, default=1.0)
    scale.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    scale.add_argument("--precision", choices=PRECISIONS, default="float32",
                       help="training steps' forward and loss: float32, or bfloat16 autocast (GPU); evaluation stays float32")
    scale.add_argument("--ray-address", help="default: RAY_ADDRESS (ray job submit) or an embedded local Ray")

    run = parser.add_argument_group("the run")
    run.add_argument("--root", help="where the run's stores, checkpoints, MLflow store and summary go by default: a "
                                    "shared path or s3://bucket/prefix (default REFSEG_ROOT, else the working directory; "
                                    "required under `ray job submit --working-dir`)")
    run.add_argument("--run-name", help="default: derived from the configuration (re-running resumes it)")
    run.add_argument("--new-run", action="store_true", help="start anew under a new, timestamped name")
    run.add_argument("--storage-path", help="Ray Train checkpoints (default <root>/outputs/ray)")
    run.add_argument("--experiment", default=dataset, help="MLflow experiment")
    run.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db")
    run.add_argument("--max-failures", type=int, default=2, help="worker restarts from the last checkpoint")
    run.add_argument("--checkpoints-per-epoch", type=int, default=1)
    run.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    run.add_argument("--evaluate-untrained", action="store_true", help="also test the model before training")
    run.add_argument("--baseline", action="append", default=[], choices=available_models(), help="training-free rows")
    run.add_argument("--output-dir", help="where summary.json goes (default <root>/outputs/<run name>)")


def _feature_dataset(images: str) -> str:
    path = Path(images).resolve()
    return path.parent.name if path.name in ("images", "JPEGImages") else path.name


def default_sam_checkpoint(encoder: str) -> str | None:
    """The shipped proxy SAM for the proxy encoder; real SAM encoders need their file."""
    if encoder == DEFAULT_SAM_ENCODER:
        from refseg_models.encoders.sam_proxy import default_proxy_sam_checkpoint

        return str(default_proxy_sam_checkpoint())
    return None


def _reads_sam(method: str, overrides: dict[str, Any], baselines: list[str]) -> bool:
    specs = [method_config(method, overrides).feature_spec()]
    specs += [method_config(name).feature_spec() for name in baselines]
    return any("sam" in spec.encoders for spec in specs)


def _mix_config(args: argparse.Namespace) -> MixConfig:
    """``--mix`` (+ ``--samples-per-epoch``, ``--coco-excluded``), paths made absolute."""
    data = dict(args.mix)
    sources = []
    for source in data.get("sources", []) or []:
        source = dict(source)
        for key in ("annotations", "images", "view_plan"):
            if source.get(key):
                source[key] = str(Path(source[key]).resolve())
        if source.get("store") and "://" not in source["store"]:
            source["store"] = str(Path(source["store"]).resolve())
        sources.append(source)
    if sources:
        data["sources"] = sources
    if args.samples_per_epoch is not None:
        data["samples_per_epoch"] = args.samples_per_epoch
    if args.coco_excluded:
        data["coco_excluded"] = True
    try:
        return MixConfig.from_dict(data)
    except ModelError as error:
        raise ConfigError(f"--mix: {error}") from error


def configs_from_args(args: argparse.Namespace, dataset: str) -> tuple[TrainConfig, JobOptions]:
    root = resolve_root(args.root)
    feature_dataset = args.feature_dataset or _feature_dataset(args.images)
    if args.sampler == "episodes" and (args.mix or args.samples_per_epoch is not None or args.coco_excluded):
        raise ConfigError("--mix / --samples-per-epoch / --coco-excluded configure --sampler segic_mixed")
    sam = StoreSpec()
    if args.sam_checkpoint or _reads_sam(args.method, args.method_options, args.baseline):
        sam_checkpoint = args.sam_checkpoint or default_sam_checkpoint(args.sam_encoder)
        if sam_checkpoint is None:
            raise ConfigError(f"--sam-checkpoint is required for {args.sam_encoder} (only the proxy SAM ships with refseg)")
        # Builder options that are paths (the proxy SAM's MobileNetV2 weights) stay out of the config record.
        sam_paths = {"backbone_checkpoint": args.backbone_checkpoint} if "backbone_checkpoint" in encoder_options(args.sam_encoder) else {}
        sam = StoreSpec(args.sam_encoder, str(Path(sam_checkpoint).resolve()),
                        _location(args.sam_store) or root.store(feature_dataset, args.sam_encoder, args.sam_precision),
                        path_options={k: str(Path(v).resolve()) for k, v in sam_paths.items()}, precision=args.sam_precision)
    recipe = dict(args.recipe_options)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    base = TrainConfig(
        method=args.method, method_overrides=args.method_options, recipe_overrides=recipe, dataset=dataset,
        shot=args.shot, annotation_type=args.annotation_type, point_style=args.point_style,
        annotations=str(Path(args.annotations).resolve()) if dataset == "coco20i" else "",
        images=str(Path(args.images).resolve()), layout=getattr(args, "layout", "2017"),
        lists_dir=str(Path(args.lists_dir).resolve()) if args.lists_dir else None, novel_policy=args.novel_policy,
        crowd=getattr(args, "crowd", "background"),
        episodes_per_epoch=args.episodes_per_epoch, val_episodes=args.val_episodes, test_episodes=args.test_episodes,
        test_seed=args.test_seed, feature_dataset=feature_dataset,
        sam=sam, sampler=args.sampler, mix=_mix_config(args) if args.sampler != "episodes" else MixConfig(),
        backbone=StoreSpec(args.backbone, str(Path(args.backbone_checkpoint).resolve()),
                           _location(args.backbone_store) or root.store(feature_dataset, args.backbone, args.backbone_precision),
                           precision=args.backbone_precision),
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        loader_workers=args.loader_workers, precision=args.precision, run_name=args.run_name or "", storage_path=args.storage_path or "",
        experiment=args.experiment, max_failures=args.max_failures, checkpoints_per_epoch=args.checkpoints_per_epoch,
        log_every=args.log_every,
        evaluate_untrained=args.evaluate_untrained, baselines=tuple(args.baseline),
        fold=args.folds[0],
    )
    options = JobOptions(
        folds=tuple(args.folds), tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        extract_missing=args.extract_missing, new_run=args.new_run, output_dir=_location(args.output_dir), root=root,
    )
    return base, options


def _location(value: str | None) -> str | None:
    """A location given on the command line: a URI as is, a path made absolute (the workers run elsewhere)."""
    if not value or "://" in value:
        return value
    return str(Path(value).resolve())


def train_main(dataset: str, argv: list[str] | None = None, description: str = "", defaults: dict[str, Any] | None = None) -> int:
    """Entry point of ``jobs/train_<dataset>.py`` (``defaults``: other argument defaults, e.g. the
    method and sampler of ``jobs/train_segic.py``)."""
    import sys

    from pipeline.errors import run_cli

    parser = argparse.ArgumentParser(description=description)
    add_train_arguments(parser, dataset)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)

    def main() -> int:
        import ray

        from pipeline.training.job import format_summary, run_training

        base, options = configs_from_args(args, dataset)
        summary = run_training(base, options)
        if ray.is_initialized():
            ray.shutdown()  # no worker log line arrives after the summary
        print(format_summary(summary), flush=True)
        return 0

    code = run_cli(main, f"train_{dataset}")
    sys.stdout.flush()
    return code
