"""HSNet-identical test episodes, reproduced from the official lists alone (no images needed).

HSNet (and Matcher, which reuses its test) draws episodes from numpy's legacy global RandomState
seeded 0, in one process, per episode in order: the class with ``choice(test_classes, 1,
replace=False)``, the query with ``choice(images_of_class, 1, replace=False)``, then each support
the same way, re-drawn while equal to the query (supports may repeat each other for k > 1: that is
what HSNet does). A ``RandomState(seed)`` instance consumed in the same order yields the same
draws as the seeded global state, without touching global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.folds import novel_classes
from pipeline.data.splits import read_coco20i_list, read_pascal5i_list
from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class HsnetEpisode:
    class_id: int
    query: str
    supports: tuple[str, ...]


def _draw_supports(state: np.random.RandomState, names: list[str], query: str, shot: int) -> tuple[str, ...]:
    supports: list[str] = []
    while True:
        support = state.choice(names, 1, replace=False)[0]
        if support != query:
            supports.append(str(support))
        if len(supports) == shot:
            return tuple(supports)


def _check_counts(n: int, shot: int) -> None:
    # Checked where given: a negative n would otherwise surface later as "got 0 episodes".
    if n < 1:
        raise ConfigError(f"n (the number of episodes) must be >= 1, got {n}")
    if shot < 1:
        raise ConfigError(f"shot must be >= 1, got {shot}")


def hsnet_test_episodes(
    lists_dir: str | Path, fold: int, n: int = 1000, shot: int = 1, seed: int = 0
) -> list[HsnetEpisode]:
    """The ``n`` COCO-20i test episodes of HSNet's test for ``fold``, in order.

    ``lists_dir`` holds HSNet's ``val/fold<i>.json``. Classes with fewer than two distinct images
    would make HSNet loop forever; they raise :class:`DataError` up front instead (the official
    lists have none).
    """
    _check_counts(n, shot)
    lists = read_coco20i_list(lists_dir, "val", fold)
    classes = novel_classes("coco20i", fold)
    too_small = [c for c in classes if len(set(lists.get(c, []))) < 2]
    if too_small:
        raise DataError(f"{lists_dir}: classes {too_small} of fold {fold} have fewer than 2 distinct images")
    state = np.random.RandomState(seed)
    episodes = []
    for _ in range(n):
        class_id = int(state.choice(classes, 1, replace=False)[0])
        names = lists[class_id]
        query = str(state.choice(names, 1, replace=False)[0])
        episodes.append(HsnetEpisode(class_id, query, _draw_supports(state, names, query, shot)))
    return episodes


def hsnet_pascal_test_episodes(
    lists_dir: str | Path, fold: int, n: int = 1000, shot: int = 1, seed: int = 0
) -> list[HsnetEpisode]:
    """HSNet's PASCAL-5i test episodes: query = list entry ``i mod len`` in file order (class given
    by the entry), supports drawn uniformly from that class's list, re-drawn while equal to the query.
    ``class_id`` is 0-based (0 = aeroplane)."""
    _check_counts(n, shot)
    entries = read_pascal5i_list(lists_dir, "val", fold)
    if not entries:
        raise DataError(f"{lists_dir}: PASCAL-5i val list of fold {fold} is empty")
    by_class: dict[int, list[str]] = {}
    for name, class_id in entries:
        by_class.setdefault(class_id, []).append(name)
    too_small = sorted(c for c, names in by_class.items() if len(set(names)) < 2)
    if too_small:
        raise DataError(f"{lists_dir}: classes {too_small} of fold {fold} have fewer than 2 distinct images")
    state = np.random.RandomState(seed)
    episodes = []
    for index in range(n):
        query, class_id = entries[index % len(entries)]
        episodes.append(HsnetEpisode(class_id, query, _draw_supports(state, by_class[class_id], query, shot)))
    return episodes
