"""Deterministic shard layout: which image goes into which shard, and what the files are called.

The layout is a pure function of the sorted image ids and ``images_per_shard``, so an interrupted
run and a clean run agree on every shard's content, and a re-run only has to look for the stats
files to know what is left to do.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from pipeline.errors import ConfigError

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
PLAN_NAME = "_plan.json"
FORMAT_NAME = "refseg-feature-store"
FORMAT_VERSION = 1

# Default shard size: the WebDataset sweet spot of 0.5-1 GB per tar.
DEFAULT_TARGET_SHARD_BYTES = 768 * 1024**2
NPY_HEADER_BYTES = 128  # np.save's v1.0 header, padded to 64-byte alignment (128 for <= 4-D shapes)
TAR_HEADER_BYTES = 512
_FEATURE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its dataset id (stringified) and where its file lives."""

    image_id: str
    path: str


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` holds ``items`` (already sorted), at positions 0..n-1."""

    index: int
    items: tuple[ImageItem, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def stats_name(self) -> str:
        return stats_name(self.index)

    def sample_key(self, position: int) -> str:
        return sample_key(self.index, position)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}_stats.json"


def sample_key(shard_index: int, position: int) -> str:
    """WebDataset sample key: no dots (wds splits member names at the first dot), unique across shards."""
    return f"{shard_index:06d}_{position:06d}"


def check_feature_name(name: str) -> str:
    if not _FEATURE_NAME.match(name):
        raise ConfigError(f"feature name {name!r} must match [A-Za-z0-9_]+ (it becomes a tar member extension)")
    return name


def _natural(image_id: str) -> tuple[int, int, str]:
    # Numeric ids (COCO) sort numerically, everything else lexicographically after them.
    return (0, int(image_id), "") if image_id.isdigit() else (1, 0, image_id)


def sorted_items(items: Iterable[tuple[object, str] | ImageItem]) -> list[ImageItem]:
    """Normalise ``(image_id, path)`` pairs to sorted :class:`ImageItem`; duplicate ids are an error."""
    normalised = [
        item if isinstance(item, ImageItem) else ImageItem(str(item[0]), str(item[1])) for item in items
    ]
    seen: set[str] = set()
    for item in normalised:
        if item.image_id in seen:
            raise ConfigError(f"image id {item.image_id!r} appears more than once in the image list")
        seen.add(item.image_id)
    return sorted(normalised, key=lambda item: _natural(item.image_id))


def bytes_per_sample(feature_shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    """Tar bytes one image takes (payload + npy and tar headers + 512-byte padding + the id member)."""
    total = 2 * TAR_HEADER_BYTES  # the image_id.txt member: header + one padded block
    for shape in feature_shapes.values():
        payload = NPY_HEADER_BYTES + itemsize * _prod(shape)
        total += TAR_HEADER_BYTES + -(-payload // TAR_HEADER_BYTES) * TAR_HEADER_BYTES
    return total


def images_per_shard_for(
    feature_shapes: dict[str, tuple[int, ...]], itemsize: int, target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES
) -> int:
    if target_shard_bytes <= 0:
        raise ConfigError(f"target shard size must be positive, got {target_shard_bytes}")
    return max(1, target_shard_bytes // bytes_per_sample(feature_shapes, itemsize))


def plan_shards(items: Sequence[ImageItem], images_per_shard: int) -> list[ShardSpec]:
    """Consecutive runs of ``images_per_shard`` sorted items; the last shard may be shorter."""
    if images_per_shard <= 0:
        raise ConfigError(f"images_per_shard must be positive, got {images_per_shard}")
    return [
        ShardSpec(index, tuple(items[start : start + images_per_shard]))
        for index, start in enumerate(range(0, len(items), images_per_shard))
    ]


def image_list_sha256(items: Sequence[ImageItem]) -> str:
    """Fingerprint of the (sorted) image ids: a resume against another list would misplace images.
    Paths are left out on purpose: the same dataset may live at another path on another machine."""
    return hashlib.sha256(json.dumps([item.image_id for item in items]).encode()).hexdigest()


def _prod(shape: Iterable[int]) -> int:
    result = 1
    for size in shape:
        result *= int(size)
    return result
