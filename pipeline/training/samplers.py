"""The training loop's data extension point: what one epoch of training samples is, and how a
rank's rows become batches.

``TrainConfig.sampler`` names a :class:`TrainingSampler` (registered in
:mod:`pipeline.training.sampler_registry`, with what it feeds and whose recipe it uses); the loop
is the same for all of them:

* ``epoch_table(epoch, num_samples)``: the epoch's samples as a table (rows are data), a function of
  the configuration's seed and the epoch only: every rank draws the same table and takes its
  disjoint share ``episode_id % world == rank`` (:func:`pipeline.training.epochs.rank_share`), and a
  resumed run draws the same table again and skips the rows it already trained on;
* ``build(rows) -> EpisodeBatch``: features + target label masks {0, 1, 255} (B x S x S, or
  B x n x S x S for several instructions per target); any randomness in it is seeded by the rows;
* ``samples_per_epoch()``, ``summary()`` (logged once).

A sampler reads the fold the driver prepared (:class:`~pipeline.training.prepared.PreparedFold`),
never the raw dataset; what it needs beyond the fold (its stores, its own tables) its driver-side
preparation makes (:func:`~pipeline.training.sampler_registry.sampler_preparation`).

Samplers:

* ``"episodes"`` (default): the fold's base-class episodes (``epoch_episodes`` +
  :class:`~pipeline.training.episode_features.EpisodeFeatureBuilder`), every method;
* ``"segic_mixed"``: SegIC's mixed-dataset training (:mod:`pipeline.training.segic_mixed`).
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa

from pipeline.training.config import TrainConfig
from pipeline.training.epochs import episodes_per_epoch, epoch_episodes
from pipeline.training.episode_features import EpisodeBatch, EpisodeFeatureBuilder
from pipeline.training.prepared import PreparedFold
from pipeline.training.sampler_registry import SAMPLERS


class TrainingSampler(Protocol):
    def __init__(self, cfg: TrainConfig, data: PreparedFold, model: Any, frozen: Any) -> None: ...

    def samples_per_epoch(self) -> int: ...

    def epoch_table(self, epoch: int, num_samples: int) -> pa.Table: ...

    def build(self, rows: list[dict]) -> EpisodeBatch: ...

    def summary(self) -> dict[str, float]: ...


def sampler_class(name: str) -> type[TrainingSampler]:
    """The sampler registered under ``name`` (:data:`~pipeline.training.sampler_registry.SAMPLERS`)."""
    return SAMPLERS.get(name)


class EpisodeSampler:
    """The fold's base-class episodes: exactly the training data of every method before samplers."""

    def __init__(self, cfg: TrainConfig, data: PreparedFold, model: Any, frozen: Any) -> None:
        self.cfg, self.data = cfg, data
        providers = dict(sam=frozen.stores.get("sam"), backbone_features=frozen.stores.get("backbone"), backbone=frozen.backbone)
        self.builder = EpisodeFeatureBuilder.for_method(
            model, data.masks, training=True, point_style=cfg.point_style, **providers
        )

    def samples_per_epoch(self) -> int:
        return episodes_per_epoch(self.cfg, self.data)

    def epoch_table(self, epoch: int, num_samples: int) -> pa.Table:
        return epoch_episodes(self.cfg, self.data, epoch, num_samples)

    def build(self, rows: list[dict]) -> EpisodeBatch:
        return self.builder(rows)

    def summary(self) -> dict[str, float]:
        return {"data/train_pairs": self.data.num_train_pairs}
