"""Evaluate a predictor on a share of an episode manifest, and on all shares with Ray tasks.

A predictor is any callable ``predict(episode) -> (logits, frame)`` (h x w logits over the method's
input frame, > 0 = foreground; :class:`refseg_models.frames.Frame`) built
per worker by a picklable factory, so the same runner serves training-free baselines now and
trained checkpoints later. Episodes whose images are missing/corrupt, or whose reference mask is
empty, are counted and reported, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.base import SegmentationSource
from pipeline.data.mask_cache import MaskCache
from pipeline.episodes.annotations import reference_annotation
from pipeline.episodes.manifest import read_manifest
from pipeline.errors import DataError
from pipeline.evaluation.meter import FewShotMeter
from pipeline.evaluation.resolution import EvalResolution
from pipeline.ray_session import init_ray
from pipeline.report import SkipReport
from refseg_models.frames import Frame


@dataclass(frozen=True)
class Episode:
    episode_id: int
    class_id: int
    query_image: np.ndarray  # H x W x 3 uint8
    query_mask: np.ndarray  # H x W uint8 {0, 1, 255}
    support_images: tuple[np.ndarray, ...]
    # uint8 {0, 1} reference annotations, each covering its whole support image: at the image's size
    # (mask, box) or in the authors' 512 x 512 frame (points, scribble; refseg_models.annotations)
    support_annotations: tuple[np.ndarray, ...]


# predict(episode) -> (h x w logits over the method's input frame, that Frame); > 0 = foreground.
Predictor = Callable[[Episode], tuple[torch.Tensor, Frame]]


def iter_episodes(table: pa.Table, source: SegmentationSource, masks: MaskCache, report: SkipReport) -> Iterator[Episode]:
    for row in table.to_pylist():
        try:
            query_image = source.load_image(row["query_id"])
            query_mask = masks.get(row["query_id"], row["class_id"])
            support_images, annotations = [], []
            for offset, support_id in enumerate(row["support_ids"]):
                support_images.append(source.load_image(support_id))
                annotations.append(
                    reference_annotation(
                        masks.get(support_id, row["class_id"]),
                        row["annotation_type"],
                        seed=row["annotation_seed"] + offset,
                    )
                )
        except DataError as error:
            report.skip(error.reason, f"episode {row['episode_id']}: {error}")
            continue
        yield Episode(row["episode_id"], row["class_id"], query_image, query_mask, tuple(support_images), tuple(annotations))


def evaluate_share(
    table: pa.Table,
    source: SegmentationSource,
    predict: Predictor,
    class_ids: list[int],
    resolution: EvalResolution,
    report: SkipReport,
) -> FewShotMeter:
    meter = FewShotMeter(class_ids)
    masks = MaskCache(source)
    with torch.no_grad():
        for episode in iter_episodes(table, source, masks, report):
            logits, frame = predict(episode)
            prediction, gt = resolution.prepare(logits, episode.query_mask, frame)
            meter.update(prediction, gt, episode.class_id)
    return meter


def evaluate_manifest_with_ray(
    manifest_path: str | Path,
    source_factory: Callable[[], SegmentationSource],
    predictor_factory: Callable[[], Predictor],
    class_ids: list[int],
    resolution: EvalResolution,
    num_workers: int,
    cpus_per_worker: float = 1.0,
) -> tuple[FewShotMeter, SkipReport]:
    """Each Ray task evaluates the disjoint share ``episode_id % num_workers == rank``; their I/U
    counts are summed before any division (HSNet's metric, docs/protocol.md), so the result equals a single-process run."""
    import ray  # pipeline-side only

    @ray.remote(num_cpus=cpus_per_worker)
    def evaluate_rank(rank: int) -> tuple[dict, dict]:
        torch.set_num_threads(max(1, int(cpus_per_worker)))
        report = SkipReport(f"evaluation rank {rank}")
        share = read_manifest(manifest_path, rank=rank, world_size=num_workers)
        meter = evaluate_share(share, source_factory(), predictor_factory(), class_ids, resolution, report)
        return meter.state_dict(), report.as_dict()

    results = ray.get([evaluate_rank.remote(rank) for rank in range(num_workers)])
    meter = FewShotMeter(class_ids)
    report = SkipReport("evaluation")
    for state, rank_report in results:
        meter.merge(FewShotMeter.from_state_dict(state))
        report.add(rank_report)
    return meter, report


class Evaluation(Protocol):
    """Where an evaluation job's manifests are evaluated: ``start()`` once, after every input is
    checked, then one call per manifest (the arguments of :func:`evaluate_manifest_with_ray`)."""

    def start(self) -> None: ...

    def __call__(self, manifest_path: str | Path, source_factory: Callable[[], SegmentationSource],
                 predictor_factory: Callable[[], Predictor], class_ids: list[int], resolution: EvalResolution,
                 num_workers: int) -> tuple[FewShotMeter, SkipReport]: ...


@dataclass(frozen=True)
class RayEvaluation:
    """The jobs' evaluation: Ray tasks over the manifest's rank shares, on the cluster at ``address``
    (None: ``RAY_ADDRESS``, else an embedded local Ray; :func:`pipeline.ray_session.init_ray`)."""

    address: str | None = None

    def start(self) -> None:
        init_ray(self.address, include_dashboard=False, log_to_driver=True)

    def __call__(self, manifest_path: str | Path, source_factory: Callable[[], SegmentationSource],
                 predictor_factory: Callable[[], Predictor], class_ids: list[int], resolution: EvalResolution,
                 num_workers: int) -> tuple[FewShotMeter, SkipReport]:
        return evaluate_manifest_with_ray(manifest_path, source_factory, predictor_factory, class_ids, resolution, num_workers)
