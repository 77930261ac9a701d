"""Creating/resuming a store: plan check, pending shards, and the final index + manifest.

Life of a store directory::

    _lease.json                the writing run (owner, expiry; see lease.py): one writer at a time
    _plan.json                 written first; a re-run must agree with it (same key, same image list)
    .partial/<run id>/         scratch of each local run (temporary tars; object stores: $TMPDIR)
    shard-000000.tar           published atomically
    shard-000000_stats.json    written last per shard: the shard is done iff this exists
    index.parquet, manifest.json   written when every shard is done (manifest last)

A builder takes the store's lease in :meth:`StoreBuilder.prepare` (unless the store is finished
and there is nothing to do: then it writes nothing at all) and gives it back in
:meth:`StoreBuilder.finalize` / :meth:`StoreBuilder.close`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from pipeline.store.feature_set import FeatureSetKey, StoreMismatchError, check_key
from pipeline.store.fs import Location, io_errors
from pipeline.store.index import build_index_table, write_index
from pipeline.store.lease import (
    DEFAULT_TTL_S,
    LEASE_NAME,
    SCRATCH_NAME,
    TMP_SCRATCH_PREFIX,
    Log,
    RunIdentity,
    StoreLease,
    clean_stale_scratch,
    make_scratch_dir,
    temp_root,
)
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

class StoreBuilder:
    """Writes one feature set for ``items`` (sorted :class:`ImageItem`) into ``location``.

    ``run``: who writes (lease owner, scratch names); ``lease_ttl_s`` / ``lease_settle_s``: see
    :class:`~pipeline.store.lease.StoreLease`; ``log``: where notices (take-overs, removed scratch) go.
    """

    def __init__(
        self,
        location: Location,
        key: FeatureSetKey,
        feature_shapes: dict[str, tuple[int, ...]],
        items: Sequence[ImageItem],
        images_per_shard: int,
        *,
        run: RunIdentity | None = None,
        lease_ttl_s: float = DEFAULT_TTL_S,
        lease_settle_s: float | None = None,
        log: Log | None = None,
        writer_settings: dict | None = None,
        run_config: dict | None = None,
    ) -> None:
        self.location = location
        # Recorded in every shard this builder writes: settings that decide the bytes (``writer``)
        # and this run's identity plus the caller's config (``run``), never in the manifest.
        self.writer_settings = dict(writer_settings or {})
        self.run_config = json.loads(json.dumps(run_config or {}, default=str))
        self.run = run or RunIdentity.new()
        self.lease = StoreLease(location, self.run, ttl_s=lease_ttl_s, settle_s=lease_settle_s, log=log)
        self.log = self.lease.log
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
        self._read_only = False
        self._failed_counts: dict[int, int] = {}
        self.retried: list[str] = []

    # ------------------------------------------------------------------ start / resume
    def prepare(self, retry_failed: bool = True) -> list[ShardSpec]:
        """Take the lease, create or validate the store; return the shards that still have to be written.

        ``retry_failed``: finished shards that recorded failed images are written again (all their
        images: a shard's bytes depend on every position), other finished shards are not touched.
        Their stats files (and the manifest) are removed first, so a run killed during the retry
        leaves an unfinished store that the next run completes, never a stats file describing
        another tar. ``self.retried`` lists them.

        A store that is finished (manifest in place, every shard done, nothing to retry) is only
        checked: no lease, no write, so such a re-run leaves every byte of the store as it was.
        """
        self._check_existing()
        self.retried: list[str] = []
        if self._finished(retry_failed):
            self._read_only = True
            return []
        self.location.makedirs()
        self.lease.acquire()
        self._read_only = False
        self._check_existing()  # again under the lease: another run may have started it meanwhile
        if not self.location.exists(PLAN_NAME):
            self.location.write_bytes(PLAN_NAME, json.dumps(self.plan, indent=1, sort_keys=True).encode())
        existing = set(self.location.list_names())
        for name in existing:
            if name.endswith(".tmp") and name != f"{LEASE_NAME}.tmp":
                # A small file (stats/index/manifest) whose rename a kill prevented; we hold the lease.
                self.location.delete(name)
        self._clean_stale_scratch()
        done = [spec for spec in self.shards if spec.stats_name in existing]
        retry = [spec for spec in done if self._failed_count(spec) > 0] if retry_failed else []
        if retry:
            failed = sum(self._failed_count(spec) for spec in retry)
            self.log(
                f"retrying {failed} failed image(s) of {len(retry)} finished shard(s) "
                f"({', '.join(spec.name for spec in retry[:5])}{', ...' if len(retry) > 5 else ''}); "
                "shards without failures are left as they are"
            )
            if MANIFEST_NAME in existing:
                self.location.delete(MANIFEST_NAME)
            for spec in retry:
                self.location.delete(spec.stats_name)
            self.retried = [spec.name for spec in retry]
        retried = {spec.index for spec in retry}
        return [spec for spec in self.shards if spec.stats_name not in existing or spec.index in retried]

    def _failed_count(self, spec: ShardSpec) -> int:
        if spec.index not in self._failed_counts:
            stats = json.loads(self.location.read_bytes(spec.stats_name))
            self._failed_counts[spec.index] = int(stats.get("failed", len(stats.get("failures", []))))
        return self._failed_counts[spec.index]

    def _finished(self, retry_failed: bool) -> bool:
        if not self.location.exists(MANIFEST_NAME):
            return False
        existing = set(self.location.list_names())
        if not all(spec.stats_name in existing for spec in self.shards):
            return False
        return not (retry_failed and Manifest.read(self.location).num_failed > 0)

    def _check_existing(self) -> None:
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

    def _clean_stale_scratch(self) -> None:
        """Temporary tars of dead runs: in the store (local) and in this machine's temp dir (S3 runs)."""
        if self.location.is_local:
            clean_stale_scratch(Path(self.location.join(SCRATCH_NAME)), self.run, ttl_s=self.lease.ttl_s, log=self.log)
        clean_stale_scratch(temp_root(), self.run, ttl_s=self.lease.ttl_s, prefix=TMP_SCRATCH_PREFIX, log=self.log)

    @property
    def scratch_dir(self) -> Path:
        """This run's scratch for temporary tars: ``.partial/<run id>`` inside a local store (same
        filesystem: atomic rename), ``$TMPDIR/refseg-scratch-<run id>`` for object stores."""
        if self._scratch is None:
            parent = Path(self.location.join(SCRATCH_NAME)) if self.location.is_local else temp_root()
            with io_errors(f"cannot create this run's scratch directory in {parent}"):
                if self.location.is_local:
                    self._scratch = make_scratch_dir(parent, self.run)
                else:
                    self._scratch = make_scratch_dir(parent, self.run, prefix=TMP_SCRATCH_PREFIX)
        return self._scratch

    @property
    def run_record(self) -> dict:
        """What each shard's stats record about the run that wrote it (``"run"``)."""
        return {"run_id": self.run.run_id, "host": self.run.host, "pid": self.run.pid, "config": self.run_config}

    def writer(self, spec: ShardSpec, started: float | None = None) -> ShardWriter:
        self.lease.check()
        return ShardWriter(
            spec, self.location, self.scratch_dir, self.feature_shapes, self.key.dtype, guard=self.lease.check,
            settings=self.writer_settings, run=self.run_record, started=started,
        )

    # ------------------------------------------------------------------ finish
    def read_results(self) -> list[ShardResult]:
        results = []
        for spec in self.shards:
            source = self.location.join(spec.stats_name)
            results.append(ShardResult.from_json(self.location.read_bytes(spec.stats_name), source))
        return results

    def finalize(self) -> Manifest:
        """Index + manifest from every shard's stats (raises if a shard is not done); gives the lease back.

        Both are functions of the plan and the stats alone (see manifest.py). A builder whose
        :meth:`prepare` found the store finished only reads the manifest.
        """
        if self._read_only:
            return Manifest.read(self.location)
        self.lease.check()
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
            writer_settings=tuple(
                json.loads(text) for text in sorted({json.dumps(result.writer, sort_keys=True) for result in results})
            ),
        )
        manifest.write(self.location)
        self.close()
        return manifest

    def close(self) -> None:
        """Remove this run's scratch and give the lease back (also after a failure; idempotent)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            if self.location.is_local:
                try:
                    self._scratch.parent.rmdir()  # .partial/ itself, once no run has scratch in it
                except OSError:
                    pass
            self._scratch = None
        self.lease.release()

