"""The end of a fold's training on every rank: the best validation weights on the fold's test
episodes, the training-free baselines on the same episodes, and (rank 0) what MLflow keeps of it:
the test metrics and per-class table, ``test/results.json``, a few captioned overlays and the
inference checkpoint as a registered MLflow model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.folds import COCO_CLASS_NAMES, PASCAL_CLASS_NAMES
from pipeline.episodes.annotations import reference_annotation
from pipeline.inference.mlflow_model import CHECKPOINT_NAME
from pipeline.inference.overlay import captioned_row, overlay_image
from pipeline.training.state import TrainState
from pipeline.training.tracking import RunLogger
from pipeline.training.worker import FoldWorker, build_method
from refseg_models.checkpoint import save_inference_checkpoint

OVERLAY_SIZE = 256


def test_and_export(worker: FoldWorker, state: TrainState, logger: RunLogger | None) -> dict[str, float]:
    """Test the best validation weights (and the baselines) on the fold's test episodes; rank 0 logs
    everything; the test metrics the run reports. The model is left with its last weights."""
    cfg, model = worker.cfg, worker.model
    trained = model.trainable_state_dict()
    model.load_trainable_state_dict(state.best["model"], "best validation weights")
    computed, kept = worker.evaluate(worker.data.test, keep=cfg.overlays if worker.rank == 0 else 0)
    results = {"test_miou": computed["miou"], "test_fbiou": computed["fbiou"], "best_step": state.best["step"]}
    baselines = {}
    for baseline in cfg.baselines:
        other = build_method(cfg, worker.frozen.shapes, cfg.sam.checkpoint, baseline).to(worker.device)
        baselines[baseline], _ = worker.evaluate(worker.data.test, model=other)
        results[f"test_{baseline}_miou"] = baselines[baseline]["miou"]
    if logger is not None:
        _log_test(logger, worker, state, computed, baselines, results)
        _log_overlays(logger, worker, kept)
        _log_model(logger, worker, state, computed["miou"])
        logger.end("FINISHED")
    if "untrained_test" in state.extra:
        results["test_untrained_miou"] = state.extra["untrained_test"]["miou"]
    model.load_trainable_state_dict(trained, "last weights")
    return results


def _class_names(dataset: str) -> list[str]:
    return COCO_CLASS_NAMES if dataset == "coco20i" else PASCAL_CLASS_NAMES


def _log_test(logger: RunLogger, worker: FoldWorker, state: TrainState, computed: dict[str, Any],
              baselines: dict[str, dict[str, Any]], results: dict[str, float]) -> None:
    """The test metrics, the per-class IoU and ``test/results.json`` (test_untrained_* were logged once,
    at step 0, when they were measured)."""
    names = _class_names(worker.cfg.dataset)
    logger.log_now(results, state.step)
    logger.log_now({f"test_iou/{names[c]}": v for c, v in computed["per_class_iou"].items()}, state.step)
    logger.log_dict(
        {"protocol": worker.data.test_protocol, "resolution": worker.resolution.describe(), "episodes": computed["episodes"],
         "miou": computed["miou"], "fbiou": computed["fbiou"],
         "per_class_iou": {names[c]: v for c, v in computed["per_class_iou"].items()},
         "episodes_per_class": {names[c]: v for c, v in computed["episodes_per_class"].items()},
         "tpr": computed["tpr"], "tnr": computed["tnr"], "fpr": computed["fpr"], "fnr": computed["fnr"],
         "baselines": {k: {"miou": v["miou"], "fbiou": v["fbiou"]} for k, v in baselines.items()},
         "untrained": state.extra.get("untrained_test"), "skipped": worker.report.as_dict()},
        "test/results.json",
    )


def _log_overlays(logger: RunLogger, worker: FoldWorker, kept: list[dict]) -> None:
    """A few test episodes as one image each, each panel captioned: reference + annotation |
    prediction (on the target) | ground truth (on the target)."""
    names, data = _class_names(worker.cfg.dataset), worker.data
    for item in kept:
        row = item["row"]
        support = row["support_ids"][0]
        annotation = reference_annotation(data.masks.get(support, row["class_id"]), row["annotation_type"], row["annotation_seed"])
        target = data.load_image(row["query_id"])
        tiles = [
            (_panel(data.load_image(support), annotation > 0, (0, 200, 0)),
             f"reference + {row['annotation_type']} ({names[row['class_id']]})"),
            (_panel(target, item["prediction"], (255, 0, 0)), "prediction"),
            (_panel(target, item["gt"] == 1, (0, 120, 255)), "ground truth"),
        ]
        logger.log_image(captioned_row(tiles), f"overlays/episode_{row['episode_id']:05d}.png")


def _panel(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    img = np.asarray(Image.fromarray(image).resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.BILINEAR))
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.NEAREST)
    return overlay_image(img, np.asarray(resized) > 127, color=color)


def _log_model(logger: RunLogger, worker: FoldWorker, state: TrainState, test_miou: float) -> None:
    """The inference checkpoint, as an artifact and as a version of the method's registered model."""
    cfg, frozen = worker.cfg, worker.frozen
    with tempfile.TemporaryDirectory() as tmp:
        path = save_inference_checkpoint(
            Path(tmp) / CHECKPOINT_NAME, worker.model, frozen.identities,
            {"run_name": cfg.run_name, "fold": cfg.fold, "dataset": cfg.dataset, "best_step": state.best["step"],
             "val_miou": state.best["val_miou"], "test_miou": test_miou, "annotation_type": cfg.annotation_type,
             "shot": cfg.shot, "point_style": cfg.point_style},
        )
        logger.log_file(path, "model")
        logger.log_model(
            path, name=cfg.fold_run_name, registered_name=cfg.registered_model_name, step=state.step,
            tags={"refseg.run_name": cfg.run_name, "refseg.fold": str(cfg.fold), "refseg.seed": str(cfg.seed),
                  "refseg.method": cfg.method, "refseg.test_protocol": worker.data.test_protocol,
                  **{f"refseg.frozen.{role}": identity.describe() for role, identity in frozen.identities.items()}},
            description=(f"refseg {cfg.method} on {cfg.dataset} ({cfg.shot}-shot, {cfg.annotation_type} references): "
                         "one version per fold and seed (tags refseg.fold, refseg.seed); the frozen encoders it needs "
                         "are named in the refseg.frozen.* tags. Use: refseg predict --checkpoint models:/<name>/<version>"),
        )
