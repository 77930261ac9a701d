"""The training job's driver: validate everything, make sure the feature stores exist, create the
MLflow runs, then one Ray Train ``TorchTrainer`` per fold, and a summary.

Thin by design (open_clip's ``main.py``): the work happens in
:func:`pipeline.training.loop.train_loop_per_worker`. Runs on an embedded local Ray by default and
unchanged under ``ray job submit`` (Ray then provides ``RAY_ADDRESS``).

Durable locations (stores, checkpoints, the MLflow store, the summary) derive from one root
(``--root`` / ``REFSEG_ROOT``, :mod:`pipeline.locations`); one inside the temporary working-dir
copy of ``ray job submit --working-dir`` is refused before any Ray work.

Resume: a fold's Ray run is ``<run name>-fold<k>`` under ``storage_path``; running the same command
again resumes every unfinished fold from its last checkpoint into the same MLflow child run (Ray
Train V2 restores a run from the same ``(storage_path, name)``), and skips finished folds.
``--new-run`` starts a fresh run under a new, timestamped name instead.

MLflow run statuses: the parent and the fold being trained are RUNNING while this driver works on
them (set again on resume), FAILED when training fails, KILLED when the driver is interrupted
(SIGINT, SIGTERM: ``ray job stop``), FINISHED when done. A SIGKILL leaves them RUNNING until the same
command runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError
from pipeline.locations import Root, check_durable, resolve_root
from pipeline.ray_session import init_ray
from pipeline.training.config import StoreSpec, TrainConfig
from pipeline.training.data import load_fold_data
from pipeline.training.features import missing_store_error, open_frozen_features, store_exists
from pipeline.training.prepare import FoldWriter
from pipeline.training.prepared import PreparedRef
from pipeline.training.sampler_registry import sampler_preparation
from refseg_models.build import method_config

# Ray Train's preemption watcher (one actor per worker group) only logs node drains for
# `ray.train.get_preemption_info()`, which refseg does not use (a lost node restarts the worker group
# from the last checkpoint either way); Ray 2.60 logs an error-level line each time it creates it
# ("has constructor arguments in the object store and max_restarts > 0"). Off unless the user sets it.
_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_CHECKPOINT_DIR = re.compile(r"^checkpoint_step(\d+)$")


@dataclass
class JobOptions:
    """What the driver does besides the per-fold TrainConfig.

    ``root``: where durable outputs go by default (None: ``REFSEG_ROOT`` or the working directory);
    ``output_dir``: the summary's folder (default ``<root>/outputs/<run name>``); ``gpus_per_worker``:
    GPUs each Ray Train worker reserves with ``use_gpu`` (None: one; a fraction lets several runs
    share a GPU, ``refseg benchmark``'s ``scaling.gpus_per_worker``)."""

    folds: tuple[int, ...] = (0, 1, 2, 3)
    tracking_uri: str | None = None
    ray_address: str | None = None
    extract_missing: bool = False
    new_run: bool = False
    output_dir: str | None = None
    extraction_workers: int = 1
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)
    root: Root | None = None
    gpus_per_worker: float | None = None

    @property
    def resolved_root(self) -> Root:
        return self.root or resolve_root()


def fold_configs(base: TrainConfig, options: JobOptions) -> list[TrainConfig]:
    """One validated TrainConfig per fold, with the run's name and absolute storage path."""
    if not options.folds:
        raise ConfigError("no fold to train")
    run_name = base.run_name or base.default_run_name()
    if options.new_run:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = base.storage_path or options.resolved_root.ray_storage
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return [base.replace(fold=fold, run_name=run_name, storage_path=storage) for fold in options.folds]


def tracking_uri(options: JobOptions) -> str:
    """``--tracking-uri``, else MLFLOW_TRACKING_URI, else ``sqlite:///<root>/mlflow.db``."""
    from pipeline.training import tracking

    return options.tracking_uri or tracking.default_tracking_uri(options.resolved_root)


def output_dir(options: JobOptions, run_name: str) -> str:
    return options.output_dir or options.resolved_root.outputs(run_name)


def check_locations(configs: list[TrainConfig], options: JobOptions) -> None:
    """Every durable location of the run, refused in one line if a Ray job's temporary working dir
    would hold it (before anything is read, extracted or started). The root itself only matters
    through the defaults it gives."""
    first = configs[0]
    locations = {f"the {role} feature store": getattr(first, role).store for role in ("sam", "backbone")}
    root = options.resolved_root
    locations.update({"the Ray Train checkpoints": first.storage_path, "the MLflow store": tracking_uri(options),
                      "the summary folder": output_dir(options, first.run_name), "the prepared folds": root.prepared,
                      "the label masks": root.masks})
    check_durable(locations)


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
        from pipeline.training.segic_mixed.sources import check_source_paths

        check_source_paths(cfg.mix.active_sources())


def prepare_stores(cfg: TrainConfig, extract_missing: bool, workers: int = 1) -> dict[str, str]:
    """Make sure the stores the method reads exist (extracting them with ``extract_missing``);
    returns {role: "found" | "extracted"}."""
    from pipeline.extraction.config import ExtractionConfig
    from pipeline.extraction.run import run_extraction

    spec = method_config(cfg.method, cfg.method_overrides).feature_spec()
    how = {}
    for role in spec.encoders:
        store: StoreSpec = getattr(cfg, role)
        if store_exists(store.store):
            how[role] = "found"
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
                num_actors=workers, precision=store.precision,
            )
        )
        print(summary.text(), flush=True)
        if summary.written == 0:
            raise DataError(f"extraction of {store.store} wrote no image")
        how[role] = "extracted"
    return how


def validate(configs: list[TrainConfig], options: JobOptions) -> tuple[str, dict[int, PreparedRef]]:
    """Everything checked and prepared before Ray starts or any training step runs: the tracking
    URI, and each fold's prepared data (all its workers read besides the stores).

    Prints what each fold trains and tests on, and which stores it uses (once per store)."""
    from pipeline.training import tracking

    for cfg in configs:
        _check_paths(cfg)
    uri = tracking_uri(options)
    tracking.check_reachable(uri)
    said: set[str] = set()
    return uri, {cfg.fold: _prepare_fold(cfg, options, said) for cfg in configs}


def _prepare_fold(cfg: TrainConfig, options: JobOptions, said: set[str]) -> PreparedRef:
    """Read the fold from the raw dataset (once), make sure its stores exist and hold its images,
    and write its prepared artifact (:mod:`pipeline.training.prepare`)."""
    data = load_fold_data(cfg)
    print("\n".join(data.describe(f"fold {cfg.fold} data")), flush=True)
    writer = FoldWriter(cfg, data, options.resolved_root)
    preparation = sampler_preparation(cfg.sampler)
    if preparation is not None:  # the sampler's own stores first (SegIC's mix extracts plain images and views together)
        preparation(cfg, data, writer, options.extract_missing, options.extraction_workers)
    how = prepare_stores(cfg, options.extract_missing, options.extraction_workers)
    spec = method_config(cfg.method, cfg.method_overrides).feature_spec()
    frozen = open_frozen_features(cfg, spec, data.image_ids(), live_backbone=False)
    note = frozen.unchecksummed_note()
    if note:
        print(note, file=sys.stderr, flush=True)
    for role, store in frozen.stores.items():
        location = getattr(cfg, role).store
        if location not in said:
            said.add(location)
            state = "extracted now" if how.get(role) == "extracted" else "found, used as is"
            print(f"{role} feature store {location}: {state} ({len(store.image_ids)} images of "
                  f"{frozen.identities[role].describe(12)})", flush=True)
    writer.set_frozen({role: getattr(cfg, role).store for role in frozen.stores}, frozen.identities)
    return writer.write()


def _identities(cfg: TrainConfig) -> dict[str, str]:
    from pipeline.training.features import encoder_identity
    from refseg_models.encoders.sam_proxy import PROXY_ENCODER

    out = {}
    for role in ("sam", "backbone"):
        spec: StoreSpec = getattr(cfg, role)
        if spec.encoder:
            identity = encoder_identity(spec)
            text = identity.describe(12)
            if identity.encoder_id == PROXY_ENCODER:
                text += (" = the PROXY SAM (a small SAM stand-in trained on coco_mini, docs/proxy_sam.md): these numbers "
                         "show the pipeline trains, they are not comparable to SAM's or the papers'")
            out[role] = text
    return out


def run_training(base: TrainConfig, options: JobOptions) -> dict[str, Any]:
    """Train every fold of ``options.folds``; returns the summary (also saved as summary.json)."""
    from pipeline.store.version import code_version
    from pipeline.training import tracking

    configs = fold_configs(base, options)
    check_locations(configs, options)
    uri, prepared = validate(configs, options)
    first = configs[0]
    metric_keys = ["test_miou", "test_fbiou", "val_best_miou"] + (["test_untrained_miou"] if first.evaluate_untrained else [])
    metric_keys += [f"test_{name}_miou" for name in first.baselines]
    experiment_id = tracking.ensure_experiment(uri, first.experiment, metric_keys)
    params = tracking.flatten({k: v for k, v in first.to_dict().items() if k != "fold"})
    tags = {"refseg.code_version": code_version(), "refseg.method": first.method, "refseg.dataset": first.dataset,
            "refseg.storage_path": first.storage_path, **{f"refseg.frozen.{k}": v for k, v in _identities(first).items()}}
    parent_id = tracking.parent_run(uri, experiment_id, first.run_name, params, tags)

    init_ray(options.ray_address, **options.ray_init_kwargs)
    summary: dict[str, Any] = {"run_name": first.run_name, "experiment": first.experiment, "tracking_uri": uri,
                               "parent_run_id": parent_id, "frozen_models": _identities(first), "folds": {},
                               "results_view": tracking.results_view_url(uri, experiment_id)}
    working = [parent_id]  # the runs this driver works on now: ended KILLED / FAILED if it stops
    with _sigterm_interrupts(), tracking.ended_with_the_driver(uri, working):
        for cfg in configs:
            summary["folds"][cfg.fold] = _run_fold(cfg, prepared[cfg.fold], uri, experiment_id, parent_id, tags, working,
                                                   options.gpus_per_worker)
    folds = summary["folds"]
    finished = [f for f in folds.values() if "test_miou" in f]
    if finished:
        keys = sorted({k for f in finished for k in f if k.startswith("test_") and not k.startswith("test_iou/")})
        mean = {key: sum(f[key] for f in finished) / len(finished) for key in keys if all(key in f for f in finished)}
        # the parent row of MLflow's runs table shows the mean over its folds under the folds' metric names
        logged = tracking.run_metrics(uri, parent_id)
        fresh = {k: v for k, v in {**mean, "folds_finished": len(finished)}.items() if logged.get(k) != v}
        if fresh:
            tracking.log_metrics(uri, parent_id, fresh, step=len(finished))
        summary["mean"] = mean
    if len(finished) == len(configs):
        tracking.finish(uri, parent_id)
    else:
        tracking.end_unfinished(uri, [parent_id], "FAILED")
    _write_summary(summary, output_dir(options, first.run_name))
    return summary


def _run_fold(cfg: TrainConfig, prepared: PreparedRef, uri: str, experiment_id: str, parent_id: str,
              tags: dict[str, str], working: list[str], gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Train and test one fold (or report it finished already); its row of the summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training import tracking
    from pipeline.training.failures import RAY_TRAIN_LOGGING, StopOnUserError, error_log_folder, fit
    from pipeline.training.loop import train_loop_per_worker

    run_id, status = tracking.fold_run(
        uri, experiment_id, parent_id, cfg.run_name, cfg.fold, cfg.fold_run_name, tracking.flatten(cfg.to_dict()), tags,
    )
    metrics = tracking.run_metrics(uri, run_id)
    if status == "FINISHED" and "test_miou" in metrics:
        print(f"fold {cfg.fold}: already finished in MLflow run {run_id} (test mIoU {metrics['test_miou']:.2f})", flush=True)
    else:
        for run in (parent_id, run_id):  # a resumed run that an earlier driver ended KILLED / FAILED
            tracking.set_running(uri, run)
        working.append(run_id)
        step = latest_checkpoint_step(cfg.storage_path, cfg.fold_run_name)
        if step is None:
            print(f"training {cfg.run_name} fold {cfg.fold} on {cfg.num_workers} worker(s) (Ray run "
                  f"{cfg.storage_path}/{cfg.fold_run_name}, MLflow run {run_id})", flush=True)
        else:
            print(f"resuming {cfg.run_name} fold {cfg.fold} from step {step} (its last checkpoint in "
                  f"{cfg.storage_path}/{cfg.fold_run_name}; MLflow run {run_id}); to start anew instead, run the same "
                  "command with --new-run", flush=True)
        os.environ.setdefault(_PREEMPTION_WATCHER_ENV, "0")  # read by the Train controller (see above)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train": cfg.to_dict(), "prepared": prepared.to_dict(),
                               "tracking": {"uri": uri, "run_id": run_id}},
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus_per_worker} if cfg.use_gpu and gpus_per_worker else {})},
            ),
            run_config=RunConfig(
                name=cfg.fold_run_name,
                storage_path=cfg.storage_path,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
                ),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                callbacks=[StopOnUserError(f"fold {cfg.fold}", cfg.max_failures)],  # user errors: never retried
                # Ray Train's own console lines (worker group started, every report, "a run snapshot was
                # found", a failed worker's traceback: refseg prints what it does instead, one line per
                # failure) stay in the session's log files.
                logging_config=RAY_TRAIN_LOGGING,
            ),
        )
        started = time.perf_counter()
        sigint = signal.getsignal(signal.SIGINT)
        try:
            fit(trainer, error_log_folder(cfg.storage_path, cfg.fold_run_name), cfg.fold_run_name)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)  # fit() leaves Ray Train's handler in place
        working.remove(run_id)
        metrics = tracking.run_metrics(uri, run_id)
        metrics["wall_s"] = time.perf_counter() - started
    model = tracking.run_model_uri(uri, run_id)
    return {"run_id": run_id, **{k: v for k, v in metrics.items() if k.startswith(("test_", "val_best"))},
            **({"wall_s": metrics["wall_s"]} if "wall_s" in metrics else {}), **({"model": model} if model else {})}


def latest_checkpoint_step(storage_path: str, run_name: str) -> int | None:
    """The step of the latest checkpoint of a Ray Train run (``checkpoint_step<N>`` folders), or None."""
    from pipeline.store.fs import resolve_location

    location = resolve_location(f"{storage_path.rstrip('/')}/{run_name}")
    try:
        names = location.list_names()
    except DataError:
        return None
    steps = [int(m.group(1)) for name in names if (m := _CHECKPOINT_DIR.match(name))]
    return max(steps) if steps else None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``ray job stop``, ``kill``) raises KeyboardInterrupt in the driver, as SIGINT does,
    so that the MLflow runs are ended KILLED (Python's default for SIGTERM ends the process at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_summary(summary: dict[str, Any], folder: str) -> None:
    """``<folder>/summary.json``; a folder that cannot be written is one printed line, not a failed
    job (the training is done and MLflow holds every result)."""
    from pipeline.store.fs import resolve_location

    try:
        location = resolve_location(folder)
        if location.is_local:
            location.makedirs()
        location.write_bytes("summary.json", json.dumps(summary, indent=1, default=str).encode())
    except (DataError, ConfigError) as error:
        print(f"the summary was not written: {error}", flush=True)
        return
    summary["summary_file"] = location.join("summary.json") if location.is_local else f"{folder.rstrip('/')}/summary.json"


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
        if "model" in row:
            lines.append(f"    model: {row['model']} (refseg predict --checkpoint {row['model']} ...)")
    if "mean" in summary and "test_miou" in summary["mean"]:
        lines.append(f"  mean test mIoU over folds: {summary['mean']['test_miou']:.2f}")
    uri = summary["tracking_uri"]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    lines.append(f"  the runs with their test metrics: {summary['results_view']}")
    if "summary_file" in summary:
        lines.append(f"  summary: {summary['summary_file']}")
    return "\n".join(lines)
