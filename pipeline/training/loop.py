"""``train_loop_per_worker``: one fold's training on one Ray Train worker.

Per epoch, every rank draws the same seeded table of training samples and takes its disjoint share
(``episode_id % world == rank``; the union is the table); what a sample is comes from the
configuration's sampler (:mod:`pipeline.training.samplers`: the fold's base-class episodes by
default, SegIC's mixed datasets with ``sampler="segic_mixed"``). Batches are built from the feature
stores (no frozen-encoder forward pass; the masked-reference layer4 is the one live backbone call),
the method's contract does the rest (forward, criterion, trainable parameters, and its training
hooks: ``after_step`` after each optimizer step, ``extra_state`` saved per rank in the checkpoint).
At each checkpoint point the ranks evaluate their shares of the validation episodes (counts summed
across ranks), rank 0 writes the state atomically and every rank calls ``ray.train.report`` (a
barrier); then rank 0 flushes the metrics that checkpoint covers to MLflow. At the end the best
validation weights are evaluated on the fold's test episodes, and rank 0 logs the test metrics, the
per-class table, a few qualitative overlays and the inference checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.folds import COCO_CLASS_NAMES, PASCAL_CLASS_NAMES, novel_classes
from pipeline.errors import DataError
from pipeline.evaluation.resolution import EvalResolution
from pipeline.inference.mlflow_model import CHECKPOINT_NAME
from pipeline.training.config import TrainConfig
from pipeline.training.epochs import rank_share
from pipeline.training.episode_features import EpisodeFeatureBuilder
from pipeline.training.evaluate import all_reduce_meter, chunks, evaluate_rows
from pipeline.training.failures import keeps_traceback
from pipeline.training.features import open_frozen_features
from pipeline.training.prepared import open_prepared
from pipeline.training.samplers import sampler_class
from pipeline.training.state import gather_extra_state, load_state, save_state, step_seed
from refseg_models.build import build_model, method_class, method_config
from refseg_models.checkpoint import save_inference_checkpoint
from refseg_models.recipes import build_optimizer, build_scheduler


class _Batches(torch.utils.data.Dataset):
    """One epoch's batches of this rank (a map-style dataset so a DataLoader can prefetch them)."""

    def __init__(self, builder: Any, batches: list[list[dict]]) -> None:
        self.builder, self.batches = builder, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.builder(self.batches[index])


def build_method(cfg: TrainConfig, shapes: dict, sam_checkpoint: str | None, method: str | None = None) -> Any:
    """The configured method (or a baseline) adapted to the features at hand (SAM grid, channels)."""
    name = method or cfg.method
    overrides = cfg.method_overrides if name == cfg.method else {}
    config = method_class(name).config_for_features(method_config(name, overrides), shapes)
    if method_class(name).uses_sam_decoder:
        return build_model(name, config, sam_checkpoint=sam_checkpoint)
    return build_model(name, config)


@keeps_traceback  # a user error ends the run without a retry, its traceback kept for the driver's log
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_lines()
    cfg = TrainConfig.from_dict(config["train"])
    tracking = config["tracking"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    recipe = cfg.recipe

    data = open_prepared(config["prepared"])
    report = data.report(f"fold {cfg.fold} rank {rank}")
    spec = method_config(cfg.method, cfg.method_overrides).feature_spec()
    frozen = open_frozen_features(cfg, spec, data.image_ids())
    torch.manual_seed(recipe.seed)  # the same initial weights in every run of this configuration, on any cluster
    model = build_method(cfg, frozen.shapes, cfg.sam.checkpoint).to(device)
    names = COCO_CLASS_NAMES if cfg.dataset == "coco20i" else PASCAL_CLASS_NAMES
    providers = dict(sam=frozen.stores.get("sam"), backbone_features=frozen.stores.get("backbone"), backbone=frozen.backbone)
    sampler = sampler_class(cfg.sampler)(cfg, data, model, frozen)
    eval_builder = EpisodeFeatureBuilder.for_method(model, data.masks, training=False, point_style=cfg.point_style, **providers)
    resolution = EvalResolution("fixed", cfg.eval_size)
    classes = novel_classes(cfg.dataset, cfg.fold)

    n_episodes = sampler.samples_per_epoch()
    steps_per_epoch = n_episodes // recipe.batch_size
    total_steps = steps_per_epoch * recipe.epochs
    checkpoint_every = max(1, steps_per_epoch // cfg.checkpoints_per_epoch)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, total_steps)
    find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    train_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused}) if world > 1 else model

    progress = {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
    best: dict[str, Any] = {"val_miou": -1.0, "step": -1, "model": model.trainable_state_dict()}
    extra: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory, cfg.fingerprint(), source=checkpoint.path)
        model.load_trainable_state_dict(state["model"], "training checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress, best, extra = state["progress"], state["best"], state["extra"]
        if "model_extra" in state or model.extra_state() is not None:  # model-side state, per rank
            per_rank = state.get("model_extra") or []
            if len(per_rank) != world:
                raise DataError(f"the checkpoint holds the model state of {len(per_rank)} rank(s), this run has {world}")
            model.load_extra_state(per_rank[rank])

    logger = None
    if rank == 0:
        from pipeline.training.tracking import RunLogger

        logger = RunLogger(tracking["uri"], tracking["run_id"])
        if checkpoint is None:
            logger.log_dict(cfg.to_dict(), "config.json")
            logger.add(  # flushed with the first checkpoint: a restart before it never logs them twice
                {**sampler.summary(), "data/episodes_per_epoch": n_episodes,
                 "data/steps_per_epoch": steps_per_epoch, "data/val_episodes": data.val.num_rows,
                 "data/test_episodes": data.test.num_rows, "model/trainable_parameters":
                 sum(p.numel() for p in model.trainable_parameters())}, 0,
            )
            logger.set_tags({"refseg.test_protocol": data.test_protocol, "refseg.world_size": str(world)})

    def evaluate(rows_table, keep: int = 0, which: Any = None):
        net = model if which is None else which
        meter, kept = evaluate_rows(
            net, eval_builder, rank_share(rows_table, rank, world), classes, resolution,
            batch_size=cfg.batch_per_worker, device=device, report=report, keep=keep,
        )
        return all_reduce_meter(meter, device).compute(), kept

    if cfg.evaluate_untrained and checkpoint is None:  # the same model before any step
        computed, _ = evaluate(data.test)
        extra["untrained_test"] = {"miou": computed["miou"], "fbiou": computed["fbiou"]}
        if logger is not None:
            logger.add({"test_untrained_miou": computed["miou"], "test_untrained_fbiou": computed["fbiou"]}, 0)

    def save_and_report(metrics: dict[str, float]) -> None:
        directory = None
        model_extra = gather_extra_state(model.extra_state(), world)  # a collective when there is any
        if rank == 0:
            directory = tempfile.mkdtemp(prefix="refseg-ckpt-")
            payload = {
                "fingerprint": cfg.fingerprint(), "model": model.trainable_state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "progress": progress, "best": best, "extra": extra,
            }
            if model_extra is not None:
                payload["model_extra"] = model_extra
            save_state(directory, payload)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
            checkpoint_dir_name=f"checkpoint_step{progress['global_step']:07d}",
        )
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        if logger is not None:
            logger.flush()  # only metrics the reported checkpoint covers

    train_model.train()
    for epoch in range(progress["epoch"], recipe.epochs):
        table = sampler.epoch_table(epoch, n_episodes)
        batches = chunks(rank_share(table, rank, world), cfg.batch_per_worker)[progress["step_in_epoch"]:]
        loader = torch.utils.data.DataLoader(
            _Batches(sampler.build, batches), batch_size=None, shuffle=False, num_workers=cfg.loader_workers,
            collate_fn=lambda batch: batch,
        )
        waited = time.perf_counter()
        for batch in loader:
            data_s = time.perf_counter() - waited
            started = time.perf_counter()
            torch.manual_seed(step_seed(recipe.seed, rank, progress["global_step"]))
            targets = (batch.target_masks == 1).float().to(device)
            valid = (batch.target_masks != 255).float().to(device)
            features = batch.features.to(device)
            outputs = train_model(features)
            losses = model.loss(outputs, targets, valid)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            model.after_step(outputs, features)
            step_s = time.perf_counter() - started
            progress["global_step"] += 1
            progress["step_in_epoch"] += 1
            step = progress["global_step"]
            if logger is not None and (step % cfg.log_every == 0 or step == 1):
                logged = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
                logged.update({"train/lr": optimizer.param_groups[0]["lr"], "time/data_s": data_s,
                               "time/step_s": step_s, "time/data_share": data_s / max(data_s + step_s, 1e-9),
                               "epoch": epoch})
                logger.add(logged, step)
            if progress["step_in_epoch"] == steps_per_epoch:
                progress["epoch"], progress["step_in_epoch"] = epoch + 1, 0
            if step % checkpoint_every == 0 or progress["step_in_epoch"] == 0:
                computed, _ = evaluate(data.val)
                if computed["miou"] > best["val_miou"]:
                    best = {"val_miou": computed["miou"], "step": step, "model": model.trainable_state_dict()}
                if logger is not None:
                    logger.add({"val_miou": computed["miou"], "val_fbiou": computed["fbiou"], "val_best_miou": best["val_miou"],
                                "memory/peak_rss_mb": _peak_rss_mb()}, step)
                save_and_report({"val_miou": computed["miou"], "step": step, "epoch": progress["epoch"]})
                train_model.train()
            waited = time.perf_counter()

    # -- test: the best validation weights on the fold's test episodes, and the comparison rows
    trained = model.trainable_state_dict()
    model.load_trainable_state_dict(best["model"], "best validation weights")
    computed, kept = evaluate(data.test, keep=cfg.overlays if rank == 0 else 0)
    results = {"test_miou": computed["miou"], "test_fbiou": computed["fbiou"], "best_step": best["step"]}
    baseline_rows = {}
    for baseline in cfg.baselines:
        other = build_method(cfg, frozen.shapes, cfg.sam.checkpoint, baseline).to(device)
        baseline_builder = EpisodeFeatureBuilder.for_method(other, data.masks, training=False, point_style=cfg.point_style, **providers)
        meter, _ = evaluate_rows(other, baseline_builder, rank_share(data.test, rank, world), classes, resolution,
                                 batch_size=cfg.batch_per_worker, device=device, report=report)
        baseline_rows[baseline] = all_reduce_meter(meter, device).compute()
        results[f"test_{baseline}_miou"] = baseline_rows[baseline]["miou"]
    if logger is not None:
        # test_untrained_* were logged once, at step 0, when they were measured
        logger.log_now(results, progress["global_step"])
        logger.log_now({f"test_iou/{names[c]}": v for c, v in computed["per_class_iou"].items()}, progress["global_step"])
        logger.log_dict(
            {"protocol": data.test_protocol, "resolution": resolution.describe(), "episodes": computed["episodes"],
             "miou": computed["miou"], "fbiou": computed["fbiou"],
             "per_class_iou": {names[c]: v for c, v in computed["per_class_iou"].items()},
             "episodes_per_class": {names[c]: v for c, v in computed["episodes_per_class"].items()},
             "tpr": computed["tpr"], "tnr": computed["tnr"], "fpr": computed["fpr"], "fnr": computed["fnr"],
             "baselines": {k: {"miou": v["miou"], "fbiou": v["fbiou"]} for k, v in baseline_rows.items()},
             "untrained": extra.get("untrained_test"), "skipped": report.as_dict()},
            "test/results.json",
        )
        _log_overlays(logger, data, kept, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_inference_checkpoint(
                Path(tmp) / CHECKPOINT_NAME, model, frozen.identities,
                {"run_name": cfg.run_name, "fold": cfg.fold, "dataset": cfg.dataset, "best_step": best["step"],
                 "val_miou": best["val_miou"], "test_miou": computed["miou"], "annotation_type": cfg.annotation_type,
                 "shot": cfg.shot, "point_style": cfg.point_style},
            )
            logger.log_file(path, "model")
            logger.log_model(
                path, name=cfg.fold_run_name, registered_name=cfg.registered_model_name, step=progress["global_step"],
                tags={"refseg.run_name": cfg.run_name, "refseg.fold": str(cfg.fold), "refseg.seed": str(cfg.seed),
                      "refseg.method": cfg.method, "refseg.test_protocol": data.test_protocol,
                      **{f"refseg.frozen.{role}": identity.describe() for role, identity in frozen.identities.items()}},
                description=(f"refseg {cfg.method} on {cfg.dataset} ({cfg.shot}-shot, {cfg.annotation_type} references): "
                             "one version per fold and seed (tags refseg.fold, refseg.seed); the frozen encoders it needs "
                             "are named in the refseg.frozen.* tags. Use: refseg predict --checkpoint models:/<name>/<version>"),
            )
        logger.end("FINISHED")
    if "untrained_test" in extra:
        results["test_untrained_miou"] = extra["untrained_test"]["miou"]
    model.load_trainable_state_dict(trained, "last weights")
    ray.train.report({**results, "done": 1})


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every ``ray.train.report`` at INFO ("Reporting training result N: ...", once per
    rank and checkpoint) through a logger named after its source file, not ``ray.train.*``, so
    ``RunConfig(logging_config=LoggingConfig("WARNING"))`` does not reach it: set that logger to WARNING."""
    suffix = "/train/v2/_internal/execution/context.py"
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log_overlays(logger: Any, data: Any, kept: list[dict], cfg: TrainConfig) -> None:
    """A few test episodes as one image each, each panel captioned: reference + annotation |
    prediction (on the target) | ground truth (on the target)."""
    from PIL import Image

    from pipeline.episodes.annotations import reference_annotation
    from pipeline.inference.overlay import captioned_row, overlay_image

    size = 256
    names = COCO_CLASS_NAMES if cfg.dataset == "coco20i" else PASCAL_CLASS_NAMES
    for item in kept:
        row = item["row"]
        support = row["support_ids"][0]
        reference = data.load_image(support)
        annotation = reference_annotation(data.masks.get(support, row["class_id"]), row["annotation_type"], row["annotation_seed"])
        target = data.load_image(row["query_id"])

        def panel(image: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
            img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
            m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
            return overlay_image(img, m, color=color)

        tiles = [
            (panel(reference, annotation > 0, (0, 200, 0)), f"reference + {row['annotation_type']} ({names[row['class_id']]})"),
            (panel(target, item["prediction"], (255, 0, 0)), "prediction"),
            (panel(target, item["gt"] == 1, (0, 120, 255)), "ground truth"),
        ]
        logger.log_image(captioned_row(tiles), f"overlays/episode_{row['episode_id']:05d}.png")
