"""Reading a feature store by image id (episodes); streaming whole shards is :mod:`pipeline.store.streaming`.

Both are driven by the Parquet index (offset and size of every ``.npy`` member in its shard), on
any pyarrow filesystem (local, S3, GCS):

* random access reads all requested features of an image with ONE ranged read (a sample's members
  are adjacent in its tar) into a buffer of the store's own pool and returns views of it, behind a
  bounded LRU cache in bytes; local stores read with ``os.preadv`` straight into that buffer (one
  copy, no extra allocation), object stores with ``read_at``;
* streaming (:meth:`FeatureStore.stream`) reads each shard front to back in blocks of consecutive
  samples, split by node and then by DataLoader worker.

Nothing is read unchecked: opening a store compares every shard's size with the manifest, and every
payload read on either path is compared with its index crc32 and must hold finite values
(:func:`pipeline.store.npy.checked_view`), so a flipped byte or a NaN is a ``DataError`` naming
shard, image and feature instead of a silently worse model (cost: docs/feature_store.md, "Reads").
The shards stay plain WebDataset tars: ``wds.WebDataset(store.shard_paths())`` reads them too.

A store owns what it reads with: its open shard handles, its read buffers (random access and
streams) and the threads of :meth:`FeatureStore.get_many`; :meth:`FeatureStore.close` releases them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
import webdataset as wds

from pipeline.errors import DataError
from pipeline.store.block_pool import BlockPool
from pipeline.store.feature_set import FeatureSetKey, StoreMismatchError, check_key
from pipeline.store.fs import Location, io_errors, resolve_location
from pipeline.store.index import CHECKSUM_COLUMN, has_checksums, read_index
from pipeline.store.manifest import Manifest
from pipeline.store.npy import checked_view
from pipeline.store.streaming import ShardPlans, shard_stream, stream_buffers

DEFAULT_CACHE_BYTES = 512 * 1024**2
_MAX_OPEN_SHARDS = 16
_SPAN_SLACK_BYTES = 4096  # per feature: tar headers + the image-id member between a sample's features
_NOWAIT = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")


# per-process members: rebuilt when a store is unpickled (DataLoader workers, Ray tasks)
_PROCESS_STATE = ("_lock", "_cache", "_files", "_executor", "_read_buffers", "_stream_buffers")


class FeatureStore:
    """An opened, validated store.

    ``expect``: the feature set the caller needs; a store holding another one is refused with the
    list of differing fields (:class:`~pipeline.store.feature_set.StoreMismatchError`).
    ``expect_shapes``: {name: (C, h, w)} the caller needs (e.g. ``encoder.output_shapes()``); checked
    too, as a second guard for encoders whose ``preprocessing_id`` does not name the input size.
    ``cache_bytes``: bound of the in-process LRU cache of decoded features (0 disables it).
    ``verify`` (on by default; off only to measure its cost): every shard's size is compared with
    the manifest when the store is opened, every payload read (random access and streaming) with its
    index crc32, and its values must be finite; a ``DataError`` names the shard, image and feature.
    Checked arrays are cached, so a cache hit costs nothing. ``refseg verify`` checks whole stores.
    Picklable (DataLoader workers, Ray tasks): open file handles and the cache are per process.
    """

    def __init__(
        self,
        uri: str,
        *,
        expect: FeatureSetKey | None = None,
        expect_shapes: dict[str, Sequence[int]] | None = None,
        filesystem: pafs.FileSystem | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        verify: bool = True,
    ) -> None:
        self.uri = uri
        self.verify = bool(verify)
        self.location: Location = resolve_location(uri, filesystem)
        self.manifest = Manifest.read(self.location)
        if expect is not None:
            check_key(self.manifest.feature_set, expect, self.location.join(""))
        if expect_shapes is not None:
            stored = {name: tuple(shape) for name, shape in self.manifest.feature_shapes.items()}
            wanted = {name: tuple(int(s) for s in shape) for name, shape in expect_shapes.items()}
            if stored != wanted:
                raise StoreMismatchError(
                    f"feature store {uri} holds feature shapes {stored}, requested {wanted}. "
                    "Refusing to use a stale cache."
                )
        self.cache_bytes = int(cache_bytes)
        self._feature_names = tuple(sorted(self.manifest.feature_shapes))
        table = read_index(self.location)
        self._rows: dict[str, dict[str, tuple[str, int, int, int | None]]] = {}
        crcs = (
            table.column(CHECKSUM_COLUMN).to_pylist() if has_checksums(table) else [None] * table.num_rows
        )
        for image_id, shard, feature, offset, size, crc in zip(
            table.column("image_id").to_pylist(),
            table.column("shard").to_pylist(),
            table.column("feature").to_pylist(),
            table.column("offset").to_pylist(),
            table.column("size").to_pylist(),
            crcs,
        ):
            self._rows.setdefault(image_id, {})[feature] = (shard, offset, size, crc)
        if len(self._rows) != self.manifest.num_written:
            raise DataError(
                f"store {uri}: index lists {len(self._rows)} images, manifest says {self.manifest.num_written}"
            )
        self.unchecksummed_entries = sum(crc is None for crc in crcs)
        if self.verify:
            self.check_shard_sizes()
        self._init_process_state()

    def check_shard_sizes(self) -> None:
        """Every shard of the manifest exists with the size the manifest records (one metadata call
        per shard): a truncated or replaced shard is refused when the store is opened, not halfway
        through a read."""
        paths = [self.location.join(shard.name) for shard in self.manifest.shards]
        with io_errors(f"cannot look up the shards of feature store {self.uri}"):
            infos = self.location.filesystem.get_file_info(paths)
        for shard, path, info in zip(self.manifest.shards, paths, infos):
            if info.type != pafs.FileType.File:
                raise DataError(
                    f"feature store {self.uri}: shard {path} is missing; `refseg verify {self.uri}` lists every "
                    "problem; extract the store again into a new location"
                )
            if info.size != shard.bytes:
                raise DataError(
                    f"feature store {self.uri}: shard {path} is {info.size} bytes, its manifest says {shard.bytes} "
                    f"(truncated or overwritten); `refseg verify {self.uri}` lists every problem; extract the store "
                    "again into a new location"
                )

    def _init_process_state(self) -> None:
        self._nowait_ok = True
        self._executor: ThreadPoolExecutor | None = None
        # ~128 MiB of random-read buffers and the streams' buffers, kept between reads (BlockPool)
        self._read_buffers = BlockPool(min_block=0, keep_bytes=128 << 20, keep_blocks=64)
        self._stream_buffers = stream_buffers()
        self._executor_threads = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._files: OrderedDict[str, pafs.NativeFile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in _PROCESS_STATE}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    # ------------------------------------------------------------------ metadata
    @property
    def feature_set(self) -> FeatureSetKey:
        return self.manifest.feature_set

    @property
    def feature_names(self) -> list[str]:
        return list(self._feature_names)

    @property
    def image_ids(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._rows

    def shard_paths(self) -> list[str]:
        return [self.location.join(shard.name) for shard in self.manifest.shards if shard.written > 0]

    # ------------------------------------------------------------------ random access
    def _acquire(self, shard: str) -> list:
        """``[handle, users, retired]`` of an open shard (call with ``self._lock`` held): a raw file
        descriptor (local stores) or a pyarrow random-access file. Reads happen outside the lock
        (``preadv``/``read_at`` are position-free and release the GIL, so threads read in parallel);
        a handle evicted from the LRU while in use is closed by its last user."""
        entry = self._files.get(shard)
        if entry is None:
            path = self.location.join(shard)
            if self.location.is_local:
                try:
                    handle = os.open(path, os.O_RDONLY)
                except OSError as error:
                    raise DataError(f"cannot open shard {path}: {error}") from error
            else:
                handle = self.location.filesystem.open_input_file(path)
            entry = [handle, 0, False]
            self._files[shard] = entry
            if len(self._files) > _MAX_OPEN_SHARDS:
                evicted = self._files.popitem(last=False)[1]
                evicted[2] = True
                if evicted[1] == 0:
                    _close(evicted[0])
        else:
            self._files.move_to_end(shard)
        entry[1] += 1
        return entry

    def _read_range(self, shard: str, start: int, length: int, nowait: bool = False) -> np.ndarray | None:
        """``length`` bytes at ``start`` of ``shard`` as a fresh uint8 array (one read).

        ``nowait``: only from the page cache (``RWF_NOWAIT``); None when the read would wait on the
        device (or cannot be tried: object stores, old kernels)."""
        if nowait and not (self.location.is_local and _NOWAIT and self._nowait_ok):
            return None
        with self._lock:
            entry = self._acquire(shard)
        try:
            handle = entry[0]
            if nowait:
                buffer = self._read_buffers.take(length)
                try:
                    count = os.preadv(handle, [buffer], start, os.RWF_NOWAIT)
                except BlockingIOError:
                    return None
                except OSError:  # e.g. EOPNOTSUPP on this filesystem: never try again
                    self._nowait_ok = False
                    return None
                return buffer if count == length else None
            if isinstance(handle, int):
                buffer = self._read_buffers.take(length)
                done = 0
                while done < length:
                    count = os.preadv(handle, [memoryview(buffer)[done:]], start + done)
                    if count == 0:
                        break
                    done += count
            else:
                data = handle.read_at(length, start)
                done = len(data)
                buffer = np.frombuffer(data, dtype=np.uint8)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[2] and entry[1] == 0:
                    _close(entry[0])
        if done != length:
            raise DataError(f"{self.location.join(shard)}: short read at {start} ({done}/{length} bytes)")
        return buffer

    def _read_uncached(self, image_id: str, names: Sequence[str], nowait: bool = False) -> dict[str, np.ndarray] | None:
        rows = self._rows.get(image_id)
        if rows is None:
            raise KeyError(f"image {image_id!r} is not in feature store {self.uri} ({len(self._rows)} images)")
        for name in names:
            if name not in rows:
                raise KeyError(f"feature {name!r} is not in store {self.uri}; it has {self.feature_names}")
        wanted = [rows[name] for name in names]
        shard = wanted[0][0]
        start = min(offset for _, offset, _, _ in wanted)
        end = max(offset + size for _, offset, size, _ in wanted)
        if all(entry[0] == shard for entry in wanted) and end - start <= sum(e[2] + _SPAN_SLACK_BYTES for e in wanted):
            spans = [(shard, start, end)]  # a sample's members are adjacent: one read for all features
        else:
            spans = [(entry[0], entry[1], entry[1] + entry[2]) for entry in wanted]
        buffers = {}
        for span in spans:
            buffers[span] = self._read_range(span[0], span[1], span[2] - span[1], nowait)
            if buffers[span] is None:
                return None
        out = {}
        for name, (shard, offset, size, crc) in zip(names, wanted):
            span = spans[0] if len(spans) == 1 else (shard, offset, offset + size)
            buffer, base = buffers[span], span[1]
            where = f"{self.location.join(shard)} image {image_id!r} feature {name!r}"
            # read-only: shared
            out[name] = checked_view(buffer, offset - base, offset - base + size, crc, where, self.uri, self.verify)
        return out

    def get(self, image_id: object, features: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{feature name: C x h x w read-only array (store dtype)} for one image."""
        return self._get(image_id, features)

    def _get(self, image_id: object, features: Sequence[str] | None, nowait: bool = False):
        key = image_id if isinstance(image_id, str) else str(image_id)
        names = self._feature_names if features is None else tuple(features)
        if self.cache_bytes <= 0:
            arrays = self._read_uncached(key, names, nowait)
            self.misses += arrays is not None
            return arrays
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and all(name in cached for name in names):
                self._cache.move_to_end(key)
                self.hits += 1
                return {name: cached[name] for name in names}
        arrays = self._read_uncached(key, names, nowait)
        if arrays is None:
            return None
        self.misses += 1
        if self.cache_bytes > 0:
            with self._lock:
                entry = dict(self._cache.pop(key, {}))
                self._cached_bytes -= sum(a.nbytes for a in entry.values())
                entry.update(arrays)
                self._cache[key] = entry
                self._cached_bytes += sum(a.nbytes for a in entry.values())
                while self._cached_bytes > self.cache_bytes and self._cache:
                    _, evicted = self._cache.popitem(last=False)
                    self._cached_bytes -= sum(a.nbytes for a in evicted.values())
        return arrays

    def get_tensors(self, image_id: object, features: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Like :meth:`get`, as (writable, copied) torch tensors."""
        return {name: torch.from_numpy(array.copy()) for name, array in self.get(image_id, features).items()}

    def get_many(
        self, image_ids: Sequence[object], features: Sequence[str] | None = None, threads: int = 4
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`get` for several images, same results. Images whose bytes are in the page cache are
        read at once in this thread (``RWF_NOWAIT``); the others with up to ``threads`` reads in
        flight: on a page-cold disk one 1-2 MB read waits on the device, several use its queue
        (bench/bench_store_reads.py: 0.45x -> 0.84x a raw sequential read for 1.1 MB records), while
        threads on cached data would only add overhead (0.43x)."""
        image_ids = list(image_ids)
        if threads <= 1 or len(image_ids) < 2:
            return [self.get(image_id, features) for image_id in image_ids]
        results = [self._get(image_id, features, nowait=True) for image_id in image_ids]
        waiting = [index for index, result in enumerate(results) if result is None]
        if not waiting:
            return results
        if self._executor is None or self._executor_threads != threads:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="refseg-store-read")
            self._executor_threads = threads
        for index, result in zip(waiting, self._executor.map(lambda i: self.get(image_ids[i], features), waiting)):
            results[index] = result
        return results

    def get_batch(
        self, image_ids: Sequence[object], features: Sequence[str] | None = None, threads: int = 4
    ) -> dict[str, torch.Tensor]:
        """{name: B x C x h x w tensor} for an episode's images (query + supports), read in parallel."""
        per_image = self.get_many(image_ids, features, threads)
        names = list(per_image[0]) if per_image else []
        return {name: torch.from_numpy(np.stack([item[name] for item in per_image])) for name in names}

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            for entry in self._files.values():
                entry[2] = True
                if entry[1] == 0:
                    _close(entry[0])
            self._files.clear()
        self._read_buffers.clear()
        self._stream_buffers.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        features: Sequence[str] | None = None,
        *,
        shuffle_shards: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> wds.DataPipeline:
        """Iterable of ``{"image_id": str, name: C x h x w array}`` in shard order.

        Shards are split by node (``rank``/``world_size`` if given, else torch.distributed's), then by
        DataLoader worker; use it as the dataset of a ``torch.utils.data.DataLoader``.
        """
        names = list(features) if features is not None else self.feature_names
        unknown = sorted(set(names) - set(self.feature_names))
        if unknown:
            raise KeyError(f"features {unknown} are not in store {self.uri}; it has {self.feature_names}")
        return shard_stream(
            self.location, self.uri, self.shard_paths(), self._shard_plans(names), names, self.verify,
            self._stream_buffers, shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size,
        )

    def _shard_plans(self, names: Sequence[str]) -> ShardPlans:
        """{shard path: [(image id, ((offset, size, crc) per name)), ...] in tar order}."""
        plans: dict[str, list[tuple[str, tuple]]] = {}
        for image_id, rows in self._rows.items():
            entries = tuple(rows[name][1:] for name in names)
            plans.setdefault(self.location.join(rows[names[0]][0]), []).append((image_id, entries))
        for samples in plans.values():
            samples.sort(key=lambda sample: sample[1][0][0])
        return plans


def _close(handle) -> None:
    if isinstance(handle, int):
        os.close(handle)
    else:
        handle.close()


def open_store(
    uri: str,
    expect: FeatureSetKey | None = None,
    filesystem: pafs.FileSystem | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    expect_shapes: dict[str, Sequence[int]] | None = None,
    verify: bool = True,
) -> FeatureStore:
    """Open (and validate against ``expect`` / ``expect_shapes``) the store at ``uri``; every read is
    checked (crc32, finite values) unless ``verify=False`` (see :class:`FeatureStore`)."""
    return FeatureStore(
        uri, expect=expect, expect_shapes=expect_shapes, filesystem=filesystem, cache_bytes=cache_bytes, verify=verify,
    )
