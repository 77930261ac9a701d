"""``manifest.json``: the feature-set key, shapes, code versions and writer settings, shard list, counts.

It is a function of the plan and the shards' stats only (never of the invocation that finished
the store: no paths, no progress flags, no timestamps), so a clean run and a killed-and-resumed
run write the same bytes, and a re-run of a finished store does not rewrite it at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline.errors import DataError
from pipeline.store.feature_set import FeatureSetKey
from pipeline.store.fs import Location
from pipeline.store.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, PLAN_NAME
from pipeline.store.status import status_at


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    written: int
    failed: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything needed to trust a store. No timestamps: a resumed run writes the same bytes."""

    feature_set: FeatureSetKey
    feature_shapes: dict[str, tuple[int, ...]]
    code_version: str
    images_per_shard: int
    image_list_sha256: str
    shards: tuple[ShardInfo, ...]
    failures: tuple[dict[str, str], ...] = ()
    # Only in manifests of older versions (the last invocation's config); no longer written.
    config: dict = field(default_factory=dict)
    # Versions that wrote the shards (more than one if the code changed between a crash and a resume).
    shard_code_versions: tuple[str, ...] = ()
    # The distinct per-shard writer settings (batch size, torch threads, device), from the stats.
    writer_settings: tuple[dict, ...] = ()

    @property
    def num_images(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def num_written(self) -> int:
        return sum(shard.written for shard in self.shards)

    @property
    def num_failed(self) -> int:
        return sum(shard.failed for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def to_json(self) -> bytes:
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "feature_set": self.feature_set.to_dict(),
            "feature_shapes": {name: list(shape) for name, shape in sorted(self.feature_shapes.items())},
            "code_version": self.code_version,
            "shard_code_versions": list(self.shard_code_versions),
            "writer_settings": list(self.writer_settings),
            "images_per_shard": self.images_per_shard,
            "image_list_sha256": self.image_list_sha256,
            "counts": {
                "images": self.num_images,
                "written": self.num_written,
                "failed": self.num_failed,
                "shards": len(self.shards),
                "bytes": self.total_bytes,
            },
            "shards": [asdict(shard) for shard in self.shards],
            "failures": list(self.failures),
        }
        if self.config:
            payload["config"] = self.config
        return json.dumps(payload, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "Manifest":
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as error:
            raise DataError(f"manifest {source} is not valid JSON: {error}") from error
        if payload.get("format") != FORMAT_NAME or payload.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"manifest {source}: format {payload.get('format')!r} v{payload.get('format_version')!r}, "
                f"this code reads {FORMAT_NAME!r} v{FORMAT_VERSION}"
            )
        try:
            manifest = cls(
                feature_set=FeatureSetKey.from_dict(payload["feature_set"], source=f"manifest {source}"),
                feature_shapes={name: tuple(shape) for name, shape in payload["feature_shapes"].items()},
                code_version=payload["code_version"],
                images_per_shard=int(payload["images_per_shard"]),
                image_list_sha256=payload["image_list_sha256"],
                shards=tuple(ShardInfo(**shard) for shard in payload["shards"]),
                failures=tuple(payload["failures"]),
                config=payload.get("config", {}),
                shard_code_versions=tuple(payload.get("shard_code_versions", ())),
                writer_settings=tuple(payload.get("writer_settings", ())),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"manifest {source} is incomplete: {error!r}") from error
        counts = payload.get("counts", {})
        if counts.get("written") != manifest.num_written or counts.get("images") != manifest.num_images:
            raise DataError(f"manifest {source}: counts {counts} disagree with its shard list")
        return manifest

    def write(self, location: Location) -> None:
        location.write_bytes(MANIFEST_NAME, self.to_json())

    @classmethod
    def read(cls, location: Location) -> "Manifest":
        if not location.exists(MANIFEST_NAME):
            if location.exists(PLAN_NAME):  # an extraction planned it
                status = status_at(location).describe()
                raise DataError(
                    f"feature store {location.display} {status}: re-run its extraction command, which resumes it "
                    "(finished shards are kept)"
                )
            raise DataError(f"no {MANIFEST_NAME} at {location.join(MANIFEST_NAME)}: not a feature store")
        return cls.from_json(location.read_bytes(MANIFEST_NAME), location.join(MANIFEST_NAME))
