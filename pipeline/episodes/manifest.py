"""Episodes are data: seeded Parquet manifests that any process can read a disjoint share of.

One row per episode. The same arguments give the same manifest on any machine (numpy's PCG64
``Generator`` seeded explicitly; no global random state is read or written). Reference annotations
(box, scribble, points) are not stored as pixels: each row carries ``annotation_seed``, from which
:func:`pipeline.episodes.annotations.reference_annotation` regenerates them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.episodes.annotations import ANNOTATION_TYPES
from pipeline.errors import ConfigError, DataError
from pipeline.parquet import read_parquet_table
from pipeline.report import SkipReport

if TYPE_CHECKING:  # pragma: no cover (the HSNet list readers are not imported for a type)
    from pipeline.episodes.hsnet import HsnetEpisode

MANIFEST_SCHEMA = pa.schema(
    [
        ("episode_id", pa.int64()),
        ("dataset", pa.string()),
        ("fold", pa.int8()),
        ("split", pa.string()),
        ("class_id", pa.int32()),
        ("query_id", pa.string()),
        ("support_ids", pa.list_(pa.string())),
        ("shot", pa.int16()),
        ("annotation_type", pa.string()),
        ("annotation_seed", pa.int64()),
        ("seed", pa.int64()),
        ("sampler", pa.string()),
    ]
)


def annotation_seed(seed: int, episode_id: int) -> int:
    """A per-episode seed, independent of how many episodes were drawn before it."""
    return int(np.random.SeedSequence([seed, episode_id]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_common(shot: int, annotation_type: str, n_episodes: int) -> None:
    if shot < 1:
        raise ConfigError(f"shot must be >= 1, got {shot}")
    if annotation_type not in ANNOTATION_TYPES:
        raise ConfigError(f"annotation_type must be one of {ANNOTATION_TYPES}, got {annotation_type!r}")
    if n_episodes < 1:
        raise ConfigError(f"n_episodes must be >= 1, got {n_episodes}")


def build_episode_manifest(
    pairs: Mapping[int, Sequence[Hashable]],
    *,
    dataset: str,
    fold: int,
    split: str,
    n_episodes: int,
    shot: int = 1,
    seed: int = 0,
    annotation_type: str = "mask",
    report: SkipReport | None = None,
) -> pa.Table:
    """Draw ``n_episodes`` episodes HSNet-style from ``pairs`` ({class id: image ids}).

    Per episode: class uniform over the usable classes, query uniform over the class's images,
    ``shot`` supports uniform without replacement among the class's other images (HSNet re-draws
    only against the query, so its k-shot supports can repeat; ours cannot). Classes with fewer than
    ``shot + 1`` distinct images are reported (``report``) and skipped, never looped on.
    """
    _check_common(shot, annotation_type, n_episodes)
    report = report if report is not None else SkipReport(f"{dataset} fold {fold} {split} episodes")
    usable: list[int] = []
    images: dict[int, list[str]] = {}
    for class_id in sorted(pairs):
        distinct = list(dict.fromkeys(str(image_id) for image_id in pairs[class_id]))
        if len(distinct) < shot + 1:
            report.skip(f"class has fewer than shot+1={shot + 1} images", f"class {class_id} ({len(distinct)})")
            continue
        usable.append(class_id)
        images[class_id] = distinct
    if not usable:
        raise DataError(f"{report.context}: no class has at least {shot + 1} images; nothing to sample")

    rng = np.random.Generator(np.random.PCG64(seed))
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for episode_id in range(n_episodes):
        class_id = usable[int(rng.integers(len(usable)))]
        names = images[class_id]
        query_index = int(rng.integers(len(names)))
        others = [index for index in range(len(names)) if index != query_index]
        support_indices = rng.choice(others, size=shot, replace=False)
        _append(rows, episode_id, dataset, fold, split, class_id, names[query_index],
                [names[int(i)] for i in support_indices], shot, annotation_type, seed, "uniform_class")
    return pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA)


SUPPORT_STREAM = 1  # keeps a per-episode support draw apart from ``annotation_seed``'s stream


def support_rng(seed: int, episode_id: int) -> np.random.Generator:
    """The generator an every-query episode draws its supports from: a function of ``(seed,
    episode_id)`` only, so an episode's supports do not depend on the draws of any other episode."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, episode_id, SUPPORT_STREAM])))


def build_every_query_manifest(
    images_of_class: Mapping[int, Sequence[Hashable]],
    *,
    dataset: str,
    fold: int = 0,
    split: str = "test",
    shot: int = 1,
    seed: int = 0,
    annotation_type: str = "mask",
    report: SkipReport | None = None,
) -> pa.Table:
    """Every image of every class is the query of exactly one episode (HSNet's FSS-1000 test,
    ``data/fss.py`` ``DatasetFSS``): classes in sorted id order, a class's images in the given order,
    episode ids consecutive. Each episode's ``shot`` supports are drawn uniformly without replacement
    among the OTHER images of the query's class, from :func:`support_rng` ``(seed, episode_id)``.

    HSNet draws them with numpy's unseeded global state (and with replacement among each other for
    k > 1): these draws are seeded, hence reproducible, and not bit-identical to HSNet's. Classes
    with fewer than ``shot + 1`` distinct images are reported (``report``) and give no episode.
    """
    _check_common(shot, annotation_type, 1)
    report = report if report is not None else SkipReport(f"{dataset} {split} episodes")
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    episode_id = 0
    for class_id in sorted(images_of_class):
        names = list(dict.fromkeys(str(image_id) for image_id in images_of_class[class_id]))
        if len(names) < shot + 1:
            report.skip(f"class has fewer than shot+1={shot + 1} images", f"class {class_id} ({len(names)})")
            continue
        for query_index, query in enumerate(names):
            others = [name for index, name in enumerate(names) if index != query_index]
            chosen = support_rng(seed, episode_id).choice(len(others), size=shot, replace=False)
            _append(rows, episode_id, dataset, fold, split, class_id, query, [others[int(i)] for i in chosen], shot,
                    annotation_type, seed, "every_query")
            episode_id += 1
    if episode_id == 0:
        raise DataError(f"{report.context}: no class has at least {shot + 1} images; nothing to sample")
    return pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA)


def manifest_from_hsnet(
    episodes: Sequence[HsnetEpisode],
    *,
    dataset: str,
    fold: int,
    shot: int,
    seed: int = 0,
    annotation_type: str = "mask",
    image_id_of: Callable[[str], Hashable] = str,
) -> pa.Table:
    """Turn HSNet-identical episodes into a manifest; ``image_id_of`` maps list names to image ids."""
    _check_common(shot, annotation_type, len(episodes))
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for episode_id, episode in enumerate(episodes):
        _append(rows, episode_id, dataset, fold, "test", episode.class_id, str(image_id_of(episode.query)),
                [str(image_id_of(name)) for name in episode.supports], shot, annotation_type, seed, "hsnet")
    return pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA)


def _append(rows, episode_id, dataset, fold, split, class_id, query, supports, shot, annotation_type, seed, sampler):
    rows["episode_id"].append(episode_id)
    rows["dataset"].append(dataset)
    rows["fold"].append(fold)
    rows["split"].append(split)
    rows["class_id"].append(class_id)
    rows["query_id"].append(query)
    rows["support_ids"].append(list(supports))
    rows["shot"].append(shot)
    rows["annotation_type"].append(annotation_type)
    rows["annotation_seed"].append(annotation_seed(seed, episode_id))
    rows["seed"].append(seed)
    rows["sampler"].append(sampler)


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if table.schema != MANIFEST_SCHEMA:
        raise ConfigError(f"manifest schema mismatch:\n{table.schema}\nexpected:\n{MANIFEST_SCHEMA}")
    pq.write_table(table, path)
    return path


def read_manifest(path: str | Path, rank: int = 0, world_size: int = 1) -> pa.Table:
    """Rank ``rank``'s disjoint share of a manifest: the episodes with ``episode_id % world_size == rank``.

    The shares of all ranks are disjoint and their union is the whole manifest; share sizes differ
    by at most one (training loops that need equal steps per rank truncate or pad explicitly).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"episode manifest not found: {path}")
    table = read_parquet_table(str(path))
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DataError(f"{path} is not an episode manifest: missing columns {sorted(missing)}")
    if world_size == 1:
        return table
    keep = np.asarray(table.column("episode_id")) % world_size == rank
    return table.filter(pa.array(keep))
