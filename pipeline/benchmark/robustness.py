"""The prompt-noise curve of a trained SAM-prompt cell (ProSAM's robustness measurement).

The cell's registered inference model is read back from MLflow, rebuilt on the features of the
SAME stores it was trained and tested on, and evaluated on the fold's test episodes with Gaussian
noise N(0, s^2) (``relative``: s times each episode's prompt-token RMS) added to every prompt-token
entry before SAM's decoder (:func:`refseg_models.modeling.robustness.prompt_robustness_curve`). A
point of the curve is the mean per-episode mask IoU (%) over the episodes at that noise scale (not
HSNet's summed-area mIoU: the measurement is per prompt). The noise is drawn from one seeded
generator, so the curve is a function of the model, the episodes and the seed.

It runs as a Ray task (the driver only logs the result), reserving the cell's CPUs (and GPU share).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from pipeline.errors import DataError

NOISE_SEED = 0


def noise_curve(train: dict[str, Any], model_uri: str, tracking_uri: str, scales: list[float], relative: bool,
                max_episodes: int | None, batch_size: int) -> list[tuple[float, float, int]]:
    """[(scale, mean IoU %, episodes)] of the model ``model_uri`` trained with ``train`` (a
    ``TrainConfig.to_dict()``), on that configuration's test episodes."""
    from pipeline.report import SkipReport
    from pipeline.training import tracking
    from pipeline.training.config import TrainConfig
    from pipeline.training.data import load_fold_data
    from pipeline.training.episode_features import EpisodeFeatureBuilder
    from pipeline.training.evaluate import chunks
    from pipeline.training.features import open_frozen_features
    from refseg_models.checkpoint import load_inference_checkpoint, model_from_checkpoint
    from refseg_models.modeling.robustness import prompt_robustness_curve

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # this task's process only
    cfg = TrainConfig.from_dict(train)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.model_checkpoint(model_uri, tracking_uri, tmp)
        checkpoint = load_inference_checkpoint(path)
    model = model_from_checkpoint(checkpoint, sam_checkpoint=cfg.sam.checkpoint)
    data = load_fold_data(cfg, SkipReport(f"noise curve fold {cfg.fold}"))
    rows = data.test.to_pylist()[: max_episodes or None]
    frozen = open_frozen_features(cfg, model.feature_spec(), {r["query_id"] for r in rows} | {s for r in rows for s in r["support_ids"]})
    builder = EpisodeFeatureBuilder.for_method(model, data.masks, training=False, point_style=cfg.point_style,
                                               sam=frozen.stores.get("sam"), backbone_features=frozen.stores.get("backbone"),
                                               backbone=frozen.backbone)
    generator = torch.Generator().manual_seed(NOISE_SEED)
    sums = [0.0] * len(scales)
    count = 0
    for chunk in chunks(rows, batch_size):
        batch = builder(chunk)
        gt = (batch.target_masks == 1).float()
        curve = prompt_robustness_curve(model, batch.features, gt, scales, generator=generator, relative=relative)
        for index, value in enumerate(curve):
            sums[index] += value * len(chunk)
        count += len(chunk)
    if count == 0:
        raise DataError(f"the noise curve of {model_uri}: no test episode to measure it on")
    return [(float(scale), 100.0 * total / count, count) for scale, total in zip(scales, sums)]
