"""The feature stores a table's cells read (one extraction per encoder and dataset), whether they
exist, and what their extraction cost, from the stores' own records.

Every shard's ``_stats.json`` (written when the shard is published) records ``duration_s``, the wall
time the extraction spent on it (pipeline/extraction/stage.py: from the previous shard's publish, the
first from the pipeline's start, so they add up to the extraction's wall time), its bytes and its
images: a store's extraction time is their sum, whichever run (or resumed runs) wrote it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.benchmark.cells import TrainingCell
from pipeline.errors import DataError
from pipeline.store.fs import resolve_location
from pipeline.store.shard_writer import ShardResult
from pipeline.store.status import store_status
from refseg_models.build import build_model

_STATS = re.compile(r"^shard-\d{6}_stats\.json$")


@dataclass(frozen=True)
class StoreCost:
    """What an extracted store holds and cost: images written, bytes of its shards, extraction seconds."""

    images: int
    bytes: int
    extract_s: float


@dataclass(frozen=True)
class StoreNeed:
    """A store some cells read: ``role`` (sam / backbone), encoder, location, whether it is finished,
    and the cells reading it."""

    role: str
    encoder: str
    uri: str
    finished: bool
    state: str
    cells: int
    example: TrainingCell

    def cost(self) -> StoreCost | None:
        return store_cost(self.uri) if self.finished else None


def store_cost(uri: str) -> StoreCost:
    """Sum of the shards' stats of a store (images written, bytes, extraction seconds)."""
    location = resolve_location(uri)
    images = size = 0
    seconds = 0.0
    for name in sorted(n for n in location.list_names() if _STATS.match(n)):
        result = ShardResult.from_json(location.read_bytes(name), location.join(name))
        images += result.written
        size += result.bytes
        seconds += result.duration_s
    if images == 0:
        raise DataError(f"feature store {uri}: no shard stats (not an extracted store)")
    return StoreCost(images, size, seconds)


def stores_needed(cells: tuple[TrainingCell, ...]) -> list[StoreNeed]:
    """The distinct stores the training cells read (their methods' and baselines' feature specs), in
    first-use order."""
    reads: dict[str, set[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    first: dict[tuple[str, str], TrainingCell] = {}
    for cell in cells:
        cfg = cell.config
        for name in (cfg.method, *cfg.baselines):
            if name not in reads:
                reads[name] = set(build_model(name, cfg.method_overrides if name == cfg.method else {},
                                              allow_random_init=True).feature_spec().encoders)
        roles = set(reads[cfg.method]).union(*(reads[b] for b in cfg.baselines))
        for role in ("sam", "backbone"):
            if role in roles:
                key = (role, getattr(cfg, role).store)
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, cell)
    needs = []
    for (role, uri), count in counts.items():
        status = store_status(uri)
        encoder = getattr(first[(role, uri)].config, role).encoder
        needs.append(StoreNeed(role, encoder, uri, status.finished, status.describe(), count, first[(role, uri)]))
    return needs
