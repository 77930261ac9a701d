"""Streaming a feature store: each shard read front to back in blocks of consecutive samples.

The index's offsets drive the reads (no tar parsing, no per-member reads): consecutive samples are
grouped into reads of >= ``STREAM_BLOCK_BYTES`` (or one sample), and each sample comes out as checked,
read-only views of its block (:func:`~pipeline.store.npy.checked_view`). Shards are split by node and
then by DataLoader worker (WebDataset's splitters, OpenCLIP style), so every rank x worker reads a
disjoint set of whole shards.
"""

from __future__ import annotations

import os
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds

from pipeline.errors import DataError
from pipeline.store.block_pool import BlockPool
from pipeline.store.fs import Location
from pipeline.store.npy import checked_view

STREAM_BLOCK_BYTES = 16 << 20  # a streaming read covers consecutive samples up to this size
_STREAM_BUFFER_BYTES = 1 << 20  # object stores: the input stream's buffer

# {shard path: [(image id, ((offset, size, crc) per feature name)), ...] in tar order}
ShardPlans = dict[str, list[tuple[str, tuple]]]


def stream_buffers() -> BlockPool:
    """The buffers a store's streams read into: ~3 x max(16 MiB, a sample) kept between reads."""
    return BlockPool(min_block=STREAM_BLOCK_BYTES, keep_bytes=3 * STREAM_BLOCK_BYTES, keep_blocks=3)


def shard_stream(
    location: Location, uri: str, shards: list[str], plans: ShardPlans, names: Sequence[str], verify: bool,
    buffers: BlockPool, *, shuffle_shards: bool, seed: int, rank: int | None, world_size: int | None,
) -> wds.DataPipeline:
    """Iterable of ``{"image_id": str, name: C x h x w array}`` over ``shards`` (in that order, or
    shuffled with ``seed``), split by node (``rank``/``world_size`` if given, else torch.distributed's)
    and then by DataLoader worker."""
    shards = list(shards)
    if shuffle_shards:
        random.Random(seed).shuffle(shards)
    if rank is None:
        node_split = wds.split_by_node
    else:
        if world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} is not a valid split")
        node_split = _explicit_node_split(rank, world_size)
    return wds.DataPipeline(
        wds.SimpleShardList(shards), node_split, wds.split_by_worker, ShardReader(location, uri, plans, names, verify, buffers),
    )


class ShardReader:
    """Pipeline stage: shard URLs in, ``{"image_id", name: array}`` samples out."""

    def __init__(
        self, location: Location, uri: str, plans: ShardPlans, names: Sequence[str], verify: bool, buffers: BlockPool
    ) -> None:
        self.location, self.uri, self.plans, self.names, self.verify = location, uri, plans, list(names), verify
        self.buffers = buffers

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        for item in source:
            yield from self._shard(item["url"])

    def _blocks(self, samples: list) -> Iterator[tuple[int, int, list]]:
        """Consecutive samples grouped into (start, end, samples) reads of >= STREAM_BLOCK_BYTES."""
        group: list = []
        for sample in samples:
            group.append(sample)
            start = min(entry[0] for entry in group[0][1])
            end = max(entry[0] + entry[1] for entry in sample[1])
            if end - start >= STREAM_BLOCK_BYTES:
                yield start, end, group
                group = []
        if group:
            yield min(entry[0] for entry in group[0][1]), max(e[0] + e[1] for e in group[-1][1]), group

    def _shard(self, path: str) -> Iterator[dict]:
        samples = self.plans.get(path, [])
        if self.location.is_local:
            yield from self._local_shard(path, samples)
            return
        position = 0
        with self.location.filesystem.open_input_stream(path, buffer_size=_STREAM_BUFFER_BYTES) as stream:
            for start, end, group in self._blocks(samples):
                if start > position:
                    stream.read(start - position)  # tar headers between blocks: tiny
                data = stream.read(end - start)
                if len(data) != end - start:
                    raise DataError(f"{path}: shorter than its index says (read {start + len(data)} bytes)")
                position = end
                yield from self._samples(path, np.frombuffer(data, dtype=np.uint8), start, group)

    def _local_shard(self, path: str, samples: list) -> Iterator[dict]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            # No POSIX_FADV_SEQUENTIAL: measured to slow warm streaming to 0.66-0.79x raw (from
            # 0.87-0.98x); the 16 MiB reads already get the device's readahead.
            for start, end, group in self._blocks(samples):
                buffer = self.buffers.take(end - start)
                done = 0
                while done < len(buffer):
                    count = os.preadv(descriptor, [memoryview(buffer)[done:]], start + done)
                    if count == 0:
                        raise DataError(f"{path}: shorter than its index says (read {start + done} bytes)")
                    done += count
                yield from self._samples(path, buffer, start, group)
                del buffer  # only the samples (if kept) hold the block now: see BlockPool
        finally:
            os.close(descriptor)

    def _samples(self, path: str, buffer: np.ndarray, base: int, group: list) -> Iterator[dict]:
        for image_id, entries in group:
            out: dict = {"image_id": image_id}
            for name, (offset, size, crc) in zip(self.names, entries):
                where = f"{path} image {image_id!r} feature {name!r}"
                out[name] = checked_view(buffer, offset - base, offset - base + size, crc, where, self.uri, self.verify)
            yield out


def _explicit_node_split(rank: int, world_size: int):
    def split(source: Iterable) -> Iterator:
        for index, item in enumerate(source):
            if index % world_size == rank:
                yield item

    return split
