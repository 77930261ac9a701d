"""What each epoch trains on, and each rank's share: a function of the seed, the epoch and the
fold's training pairs only (worker side: no dataset file is read here).

Every rank draws the same epoch table and takes its disjoint share (``episode_id % world == rank``;
the union is the table), and a resumed run draws the same table again.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.episodes.manifest import build_episode_manifest
from pipeline.errors import ConfigError
from pipeline.report import SkipReport
from pipeline.training.config import TrainConfig


class TrainingPairs(Protocol):
    """A fold's base-class training pairs (the driver's FoldData or the workers' PreparedFold)."""

    train_pairs: Mapping[int, Sequence[Hashable]]

    @property
    def num_train_pairs(self) -> int: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s episode draw (independent of how many epochs ran before)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 0x7EA1]).generate_state(1, dtype=np.uint32)[0])


def epoch_episodes(cfg: TrainConfig, data: TrainingPairs, epoch: int, num_episodes: int) -> pa.Table:
    """Epoch ``epoch``'s training episodes over the base-class pairs (seeded by seed and epoch)."""
    return build_episode_manifest(
        data.train_pairs, dataset=cfg.dataset, fold=cfg.fold, split="train", n_episodes=num_episodes,
        shot=cfg.shot, seed=epoch_seed(cfg.seed, epoch), annotation_type=cfg.annotation_type,
        report=SkipReport("training episodes"),
    )


def rank_share(table: pa.Table, rank: int, world_size: int) -> list[dict]:
    """Rank ``rank``'s rows: ``episode_id % world_size == rank`` (disjoint; their union is the table)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got {rank} / {world_size}")
    ids = np.asarray(table.column("episode_id"))
    return table.filter(pa.array(ids % world_size == rank)).to_pylist()


def episodes_per_epoch(cfg: TrainConfig, data: TrainingPairs) -> int:
    """HSNet's epoch (one episode per training pair) unless configured, rounded down to whole global
    batches so every rank runs the same number of steps."""
    wanted = cfg.episodes_per_epoch if cfg.episodes_per_epoch is not None else data.num_train_pairs
    batch = cfg.recipe.batch_size
    if wanted < batch:
        raise ConfigError(f"an epoch of {wanted} episodes is less than one global batch ({batch})")
    return (wanted // batch) * batch
