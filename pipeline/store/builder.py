"""Creating/resuming a store: plan check, pending shards, and the final index + manifest.

Life of a store directory::

    _plan.json                 written first; a re-run must agree with it (same key, same image list)
    .partial/                  scratch of local runs (temporary tars, removed on success/restart)
    shard-000000.tar           published atomically
    shard-000000_stats.json    written last per shard: the shard is done iff this exists
    index.parquet, manifest.json   written when every shard is done (manifest last)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.store.feature_set import FeatureSetKey, StoreMismatchError, check_key
from pipeline.store.fs import Location
from pipeline.store.index import build_index_table, write_index
from pipeline.store.layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    ImageItem,
    ShardSpec,
    check_feature_name,
    image_list_sha256,
    plan_shards,
)
from pipeline.store.manifest import Manifest, ShardInfo
from pipeline.store.shard_writer import ShardResult, ShardWriter
from pipeline.store.version import code_version

SCRATCH_NAME = ".partial"


class StoreBuilder:
    """Writes one feature set for ``items`` (sorted :class:`ImageItem`) into ``location``."""

    def __init__(
        self,
        location: Location,
        key: FeatureSetKey,
        feature_shapes: dict[str, tuple[int, ...]],
        items: Sequence[ImageItem],
        images_per_shard: int,
    ) -> None:
        self.location = location
        self.key = key
        self.feature_shapes = {
            check_feature_name(name): tuple(int(s) for s in shape) for name, shape in feature_shapes.items()
        }
        self.items = list(items)
        self.images_per_shard = int(images_per_shard)
        self.shards = plan_shards(self.items, self.images_per_shard)
        self.plan = {
            "format_version": FORMAT_VERSION,
            "feature_set": key.to_dict(),
            "feature_shapes": {name: list(shape) for name, shape in sorted(self.feature_shapes.items())},
            "images_per_shard": self.images_per_shard,
            "num_images": len(self.items),
            "num_shards": len(self.shards),
            "image_list_sha256": image_list_sha256(self.items),
        }
        self._scratch: Path | None = None

    # ------------------------------------------------------------------ start / resume
    def prepare(self) -> list[ShardSpec]:
        """Create or validate the store directory; return the shards that still have to be written."""
        self.location.makedirs()
        where = self.location.join("")
        if self.location.exists(MANIFEST_NAME):
            check_key(Manifest.read(self.location).feature_set, self.key, where)
        if self.location.exists(PLAN_NAME):
            stored = json.loads(self.location.read_bytes(PLAN_NAME))
            check_key(FeatureSetKey.from_dict(stored.get("feature_set", {}), f"{where}/{PLAN_NAME}"), self.key, where)
            differences = [
                f"{name}: store has {stored.get(name)!r}, this run has {value!r}"
                for name, value in self.plan.items()
                if stored.get(name) != value
            ]
            if differences:
                raise StoreMismatchError(
                    f"feature store {where} was started with another plan ({'; '.join(differences)}); "
                    "resuming would misplace images. Use a new location (or delete this one)."
                )
        else:
            self.location.write_bytes(PLAN_NAME, json.dumps(self.plan, indent=1, sort_keys=True).encode())
        existing = set(self.location.list_names())
        for name in existing:
            if name.endswith(".tmp"):  # a small file (stats/index/manifest) whose rename a kill prevented
                self.location.filesystem.delete_file(self.location.join(name))
        return [spec for spec in self.shards if spec.stats_name not in existing]

    @property
    def scratch_dir(self) -> Path:
        """Local scratch for temporary tars: inside the store when local (atomic rename), else /tmp."""
        if self._scratch is None:
            if self.location.is_local:
                self._scratch = Path(self.location.join(SCRATCH_NAME))
                # Leftovers of a killed run are partial tars: never trusted, always removed.
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch.mkdir(parents=True)
            else:
                self._scratch = Path(tempfile.mkdtemp(prefix="refseg-store-"))
        return self._scratch

    def writer(self, spec: ShardSpec) -> ShardWriter:
        return ShardWriter(spec, self.location, self.scratch_dir, self.feature_shapes, self.key.dtype)

    # ------------------------------------------------------------------ finish
    def read_results(self) -> list[ShardResult]:
        results = []
        for spec in self.shards:
            source = self.location.join(spec.stats_name)
            results.append(ShardResult.from_json(self.location.read_bytes(spec.stats_name), source))
        return results

    def finalize(self, config: dict) -> Manifest:
        """Index + manifest from every shard's stats (raises if a shard is not done)."""
        results = self.read_results()
        write_index(self.location, build_index_table((result.shard, result.entries) for result in results))
        manifest = Manifest(
            feature_set=self.key,
            feature_shapes=self.feature_shapes,
            code_version=code_version(),
            images_per_shard=self.images_per_shard,
            image_list_sha256=self.plan["image_list_sha256"],
            shards=tuple(
                ShardInfo(result.shard, result.count, result.written, len(result.failures), result.bytes)
                for result in results
            ),
            failures=tuple(failure for result in results for failure in result.failures),
            shard_code_versions=tuple(sorted({result.code_version for result in results})),
            config=json.loads(json.dumps(config, default=str)),
        )
        manifest.write(self.location)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return manifest

