"""Evaluation in feature space: a method on manifest rows read from the SAME feature stores the
training used (feature reuse, not a second image path), HSNet's metric counts summed across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.evaluation.meter import FewShotMeter
from pipeline.evaluation.resolution import EvalResolution
from pipeline.report import SkipReport
from pipeline.training.episode_features import EpisodeFeatureBuilder
from refseg_models.frames import Frame


def chunks(rows: Sequence[dict], size: int) -> list[list[dict]]:
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


@torch.no_grad()
def evaluate_rows(
    model: Any,
    builder: EpisodeFeatureBuilder,
    rows: Sequence[dict],
    class_ids: Sequence[int],
    resolution: EvalResolution,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    report: SkipReport | None = None,
    keep: int = 0,
) -> tuple[FewShotMeter, list[dict]]:
    """HSNet counts of ``model`` (eval mode) on ``rows``; episodes whose data is bad are counted skips.

    ``keep``: also return the first ``keep`` episodes' predictions (for qualitative overlays):
    [{"row", "prediction" (bool, evaluation resolution), "gt"}].
    """
    was_training = model.training
    model.eval()
    meter = FewShotMeter(class_ids)
    kept: list[dict] = []
    try:
        for chunk in chunks(rows, batch_size):
            try:
                batch = builder(chunk)
            except DataError as error:
                if report is None:
                    raise
                for row in chunk:
                    report.skip(error.reason, f"episode {row['episode_id']}: {error}")
                continue
            logits = model.mask_logits(model(batch.features.to(device))).float().cpu()
            for index, row in enumerate(chunk):
                label = builder.masks.get(row["query_id"], row["class_id"])
                frame = Frame.of(builder.frame_preprocessing, builder.frame_size, label.shape)
                prediction, gt = resolution.prepare(logits[index], label, frame)
                meter.update(prediction, gt, row["class_id"])
                if len(kept) < keep:
                    kept.append({"row": row, "prediction": prediction, "gt": gt})
    finally:
        model.train(was_training)
    return meter, kept


def all_reduce_meter(meter: FewShotMeter, device: torch.device | str = "cpu") -> FewShotMeter:
    """Sum the counts of every rank (torch.distributed) into ``meter``; a no-op in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return meter
    parts = [meter.intersection, meter.union, meter.confusion, meter.episodes[None]]
    flat = torch.from_numpy(np.concatenate([p.ravel() for p in parts]).astype(np.int64)).to(device)
    dist.all_reduce(flat)
    values = flat.cpu().numpy()
    offset = 0
    for part in parts:
        part.ravel()[:] = values[offset : offset + part.size]
        offset += part.size
    meter.episodes = parts[3][0]
    return meter
