"""The training job's driver: validate everything, make sure the feature stores exist, create the
MLflow runs, then one Ray Train ``TorchTrainer`` per fold, and a summary.

Thin by design (open_clip's ``main.py``): the work happens in
:func:`pipeline.training.loop.train_loop_per_worker`. Runs on an embedded local Ray by default and
unchanged under ``ray job submit`` (Ray then provides ``RAY_ADDRESS``).

Resume: a fold's Ray run is ``<run name>-fold<k>`` under ``storage_path``; running the same command
again resumes every unfinished fold from its last checkpoint into the same MLflow child run (Ray
Train V2 restores a run from the same ``(storage_path, name)``), and skips finished folds.
``--new-run`` starts a fresh run under a new, timestamped name instead.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport
from pipeline.training.config import StoreSpec, TrainConfig
from pipeline.training.data import load_fold_data
from pipeline.training.features import missing_store_error, open_frozen_features, store_exists
from pipeline.training.samplers import sampler_class
from refseg_models.build import build_model


@dataclass
class JobOptions:
    """What the driver does besides the per-fold TrainConfig."""

    folds: tuple[int, ...] = (0, 1, 2, 3)
    tracking_uri: str | None = None
    ray_address: str | None = None
    extract_missing: bool = False
    new_run: bool = False
    output_dir: str | None = None
    extraction_workers: int = 1
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)


def fold_configs(base: TrainConfig, options: JobOptions) -> list[TrainConfig]:
    """One validated TrainConfig per fold, with the run's name and absolute storage path."""
    if not options.folds:
        raise ConfigError("no fold to train")
    run_name = base.run_name or base.default_run_name()
    if options.new_run:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = base.storage_path or str(Path("outputs/ray").resolve())
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return [base.replace(fold=fold, run_name=run_name, storage_path=storage) for fold in options.folds]


def _check_paths(cfg: TrainConfig) -> None:
    for what, path in (("--annotations", cfg.annotations if cfg.dataset == "coco20i" else None), ("--images", cfg.images),
                       ("--lists-dir", cfg.lists_dir), ("--sam-checkpoint", cfg.sam.checkpoint),
                       ("--backbone-checkpoint", cfg.backbone.checkpoint)):
        if path and not Path(path).exists():
            raise ConfigError(f"{what}: not found: {path}")
        if path and "://" not in path and not Path(path).is_absolute():  # the command line resolves them
            raise ConfigError(f"{what}: {path} is relative: give absolute paths (the Ray Train workers do not run "
                              "in this process's working directory)")
    if cfg.sampler == "segic_mixed":  # the mix's other datasets (ADE20k, LVIS, FSS-1000) too
        from pipeline.training.segic_mixed import check_source_paths

        check_source_paths(cfg.mix.active_sources())


def prepare_stores(cfg: TrainConfig, extract_missing: bool, workers: int = 1) -> None:
    """Make sure the stores the method reads exist (extracting them with ``extract_missing``)."""
    from pipeline.extraction.config import ExtractionConfig
    from pipeline.extraction.run import run_extraction

    spec = build_model(cfg.method, cfg.method_overrides, allow_random_init=True).feature_spec()
    for role in spec.encoders:
        store: StoreSpec = getattr(cfg, role)
        if store_exists(store.store):
            continue
        if not extract_missing:
            raise missing_store_error(cfg, role)
        print(f"extracting the {role} store {store.store} ({store.encoder}) ...", flush=True)
        summary = run_extraction(
            ExtractionConfig(
                output=store.store, dataset=cfg.feature_dataset, encoder=store.encoder, checkpoint=store.checkpoint,
                encoder_options={**store.options, **store.path_options},
                coco_annotations=cfg.annotations if cfg.dataset == "coco20i" else None,
                image_dir=cfg.images if cfg.dataset == "coco20i" else str(Path(cfg.images) / "JPEGImages"),
                num_actors=workers,
            )
        )
        print(summary.text(), flush=True)
        if summary.written == 0:
            raise DataError(f"extraction of {store.store} wrote no image")


def validate(configs: list[TrainConfig], options: JobOptions) -> str:
    """Everything checked before Ray starts or any training step runs; returns the tracking URI."""
    from pipeline.training import tracking

    for cfg in configs:
        _check_paths(cfg)
    uri = options.tracking_uri or tracking.default_tracking_uri()
    tracking.check_reachable(uri)
    for cfg in configs:
        report = SkipReport(f"fold {cfg.fold} data")
        data = load_fold_data(cfg, report)
        report.print()
        # the sampler's own stores first (SegIC's mix extracts plain images and cached views together)
        sampler_class(cfg.sampler).prepare(cfg, data, options.extract_missing, options.extraction_workers)
        prepare_stores(cfg, options.extract_missing, options.extraction_workers)
        spec = build_model(cfg.method, cfg.method_overrides, allow_random_init=True).feature_spec()
        note = open_frozen_features(cfg, spec, data.image_ids(), live_backbone=False).unchecksummed_note()
        if note:
            print(note, file=sys.stderr, flush=True)
    return uri


def _identities(cfg: TrainConfig) -> dict[str, str]:
    from pipeline.training.features import encoder_identity
    from refseg_models.encoders.sam_proxy import PROXY_ENCODER

    out = {}
    for role in ("sam", "backbone"):
        spec: StoreSpec = getattr(cfg, role)
        if spec.encoder:
            identity = encoder_identity(spec)
            text = f"{identity.encoder_id} (weights sha256 {identity.weights_sha256[:12]}, {identity.preprocessing_id})"
            if identity.encoder_id == PROXY_ENCODER:
                text += (" = the PROXY SAM (a small SAM stand-in trained on coco_mini, docs/proxy_sam.md): these numbers "
                         "show the pipeline trains, they are not comparable to SAM's or the papers'")
            out[role] = text
    return out


def run_training(base: TrainConfig, options: JobOptions) -> dict[str, Any]:
    """Train every fold of ``options.folds``; returns the summary (also printed and saved)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.store.version import code_version
    from pipeline.training import tracking
    from pipeline.training.failures import RAY_TRAIN_LOGGING, StopOnUserError, error_log_folder, fit
    from pipeline.training.loop import train_loop_per_worker

    configs = fold_configs(base, options)
    uri = validate(configs, options)
    first = configs[0]
    experiment_id = tracking.ensure_experiment(uri, first.experiment)
    params = tracking.flatten({k: v for k, v in first.to_dict().items() if k != "fold"})
    tags = {"refseg.code_version": code_version(), "refseg.method": first.method, "refseg.dataset": first.dataset,
            "refseg.storage_path": first.storage_path, **{f"refseg.frozen.{k}": v for k, v in _identities(first).items()}}
    parent_id = tracking.parent_run(uri, experiment_id, first.run_name, params, tags)

    if not ray.is_initialized():
        ray.init(address=options.ray_address, **options.ray_init_kwargs)
    summary: dict[str, Any] = {"run_name": first.run_name, "experiment": first.experiment, "tracking_uri": uri,
                               "parent_run_id": parent_id, "frozen_models": _identities(first), "folds": {}}
    for cfg in configs:
        run_id, status = tracking.fold_run(
            uri, experiment_id, parent_id, cfg.run_name, cfg.fold, cfg.fold_run_name,
            tracking.flatten(cfg.to_dict()), tags,
        )
        metrics = tracking.run_metrics(uri, run_id)
        if status == "FINISHED" and "test_miou" in metrics:
            print(f"fold {cfg.fold}: already finished in MLflow run {run_id} (test mIoU {metrics['test_miou']:.2f})", flush=True)
        else:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"train": cfg.to_dict(), "tracking": {"uri": uri, "run_id": run_id}},
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
                ),
                run_config=RunConfig(
                    name=cfg.fold_run_name,
                    storage_path=cfg.storage_path,
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=1, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
                    ),
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    callbacks=[StopOnUserError(f"fold {cfg.fold}", cfg.max_failures)],  # user errors: never retried
                    logging_config=RAY_TRAIN_LOGGING,
                ),
            )
            started = time.perf_counter()
            try:
                fit(trainer, error_log_folder(cfg.storage_path, cfg.fold_run_name), cfg.fold_run_name)
            except Exception:
                tracking.finish(uri, run_id, "FAILED")
                raise
            metrics = tracking.run_metrics(uri, run_id)
            metrics["wall_s"] = time.perf_counter() - started
        summary["folds"][cfg.fold] = {"run_id": run_id, **{k: v for k, v in metrics.items() if k.startswith(("test_", "val_best"))},
                                      **({"wall_s": metrics["wall_s"]} if "wall_s" in metrics else {})}
    folds = summary["folds"]
    finished = [f for f in folds.values() if "test_miou" in f]
    if finished:
        mean = {key: sum(f[key] for f in finished) / len(finished) for key in ("test_miou", "test_fbiou") if all(key in f for f in finished)}
        tracking.log_metrics(uri, parent_id, {f"mean_{k}": v for k, v in mean.items()})
        summary["mean"] = mean
    if len(finished) == len(configs):
        tracking.finish(uri, parent_id)
    if options.output_dir:
        out = Path(options.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The printed summary: per fold trained / untrained / baselines, the frozen models, how to look."""
    lines = [f"run {summary['run_name']} (MLflow experiment {summary['experiment']}, parent run {summary['parent_run_id']})"]
    for role, text in summary["frozen_models"].items():
        lines.append(f"  frozen {role}: {text}")
    for fold, row in summary["folds"].items():
        parts = [f"fold {fold}: test mIoU {row.get('test_miou', float('nan')):.2f} (FB-IoU {row.get('test_fbiou', float('nan')):.2f})"]
        if "test_untrained_miou" in row:
            parts.append(f"untrained {row['test_untrained_miou']:.2f}")
        for key, value in sorted(row.items()):
            if key.startswith("test_") and key.endswith("_miou") and key not in ("test_miou", "test_untrained_miou"):
                parts.append(f"{key[5:-5]} {value:.2f}")
        lines.append("  " + ", ".join(parts))
    if "mean" in summary and "test_miou" in summary["mean"]:
        lines.append(f"  mean test mIoU over folds: {summary['mean']['test_miou']:.2f}")
    uri = summary["tracking_uri"]
    lines.append(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return "\n".join(lines)
