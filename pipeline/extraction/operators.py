"""The extraction stage's Ray Data operators: decode tasks, encoder actors, shard-writing actors.

Their names are what Ray's process titles show (``ray::MapBatches(_decode_chunk)``,
``ray::MapWorker(MapBatches(_EncodeChunk))``, ``_ShardActor``): docs/feature_store.md and the tests that
find the running operators (tests/process_titles.py) rely on them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from pipeline.extraction.chunks import ChunkEncoder, chunk_rows, decode_chunk, write_chunk
from pipeline.store.fs import Location
from pipeline.store.layout import ImageItem, ShardSpec
from pipeline.store.lease import (
    DEFAULT_TTL_S,
    TMP_SCRATCH_PREFIX,
    RunIdentity,
    StoreLockedError,
    clean_stale_scratch,
    lease_holder,
    make_scratch_dir,
    temp_root,
)
from pipeline.store.shard_writer import ShardWriter

# Per worker process: the encoder resolved from the object store once, not once per task.
_WORKER_ENCODERS: dict[str, Any] = {}


def _worker_encoder(holder: list) -> Any:
    import ray

    ref = holder[0]
    key = ref.hex()
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS.clear()  # one extraction at a time per worker: drop stale encoders
        _WORKER_ENCODERS[key] = ray.get(ref)
    return _WORKER_ENCODERS[key]


def _decode_chunk(batch: dict[str, np.ndarray], holder: list) -> dict[str, np.ndarray]:
    """CPU task: :func:`~pipeline.extraction.chunks.decode_chunk` with the worker's encoder."""
    return decode_chunk(batch, _worker_encoder(holder))


class _EncodeChunk:
    """Encoder actor: one chunk in, its features (store dtype, raw bytes per feature) out
    (:class:`~pipeline.extraction.chunks.ChunkEncoder` on the actor's device)."""

    def __init__(
        self, holder: list, feature_shapes: dict[str, list[int]], dtype: str, use_gpu: bool, torch_threads: int,
        precision: str = "float32", compile: bool = False,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encode = ChunkEncoder(_worker_encoder(holder), feature_shapes, dtype, device, precision, compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.encode(batch)


class _ShardActor:
    """``writer="actors"``: one call = one whole shard, written by the actor itself.

    Decoding still runs in separate CPU tasks (Ray core tasks launched from here, at most
    ``decode_window`` chunks ahead); encoding and tar writing happen in this actor, which publishes
    the shard into the store (object storage or a filesystem every node sees) and returns its stats.
    Chunks and threads are the same as in ``writer="driver"``, so the bytes are too.
    """

    def __init__(
        self,
        encoder_holder: list,
        decode_holder: list,
        location: Location,
        scratch_dir: str | None,
        feature_shapes: dict[str, list[int]],
        dtype: str,
        use_gpu: bool,
        torch_threads: int,
        batch_size: int,
        decode_num_cpus: float,
        decode_memory: int,
        code_version: str,
        run: dict,
        settings: dict,
        run_record: dict,
        lease_ttl_s: float = DEFAULT_TTL_S,
        decode_window: int = 2,
        precision: str = "float32",
        compile: bool = False,
    ) -> None:
        import ray

        self.encode = _EncodeChunk(encoder_holder, feature_shapes, dtype, use_gpu, torch_threads, precision, compile)
        self.decode = ray.remote(_decode_chunk).options(num_cpus=decode_num_cpus, memory=decode_memory)
        self.decode_holder = decode_holder
        self.location = location
        self.scratch_dir = scratch_dir
        self.feature_shapes = {name: tuple(shape) for name, shape in feature_shapes.items()}
        self.dtype = dtype
        self.batch_size = batch_size
        self.decode_window = max(1, decode_window)
        self.code_version = code_version
        self.run_id = run["run_id"]
        self.settings, self.run_record = settings, run_record
        if scratch_dir is None:
            # Object store: scratch in this node's temp dir, owned by this actor process; scratch of
            # dead runs on this node (a killed actor's half shard) is removed first.
            me = RunIdentity.from_dict(run).derived(f"actor{os.getpid()}")
            clean_stale_scratch(temp_root(), me, ttl_s=lease_ttl_s, prefix=TMP_SCRATCH_PREFIX)
            self.scratch_dir = str(make_scratch_dir(temp_root(), me, prefix=TMP_SCRATCH_PREFIX))

    def __del__(self) -> None:
        if self.location is not None and not self.location.is_local:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def _check_lease(self) -> None:
        holder = lease_holder(self.location)
        if holder != self.run_id:
            raise StoreLockedError(
                f"run {self.run_id} no longer holds the lease of {self.location.join('')} (holder: {holder}); "
                "not publishing"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        items = tuple(ImageItem(*item) for item in json.loads(batch["items"][0]))
        spec = ShardSpec(int(batch["shard"][0]), items)
        rows = [{key: np.array([value]) for key, value in row.items()} for row in chunk_rows([spec], self.batch_size)]
        writer = ShardWriter(
            spec, self.location, self.scratch_dir, self.feature_shapes, self.dtype, self.code_version,
            guard=self._check_lease, settings=self.settings, run=dict(self.run_record, actor_pid=os.getpid()),
        )
        try:
            submitted = [self.decode.remote(row, self.decode_holder) for row in rows[: self.decode_window]]
            for index in range(len(rows)):
                decoded = ray.get(submitted[index])
                submitted[index] = None  # drop the reference: the pixels are freed once encoded
                if index + self.decode_window < len(rows):
                    submitted.append(self.decode.remote(rows[index + self.decode_window], self.decode_holder))
                encoded = self.encode(decoded)
                row = {key: value[0] for key, value in encoded.items()}
                write_chunk(writer, row, self.feature_shapes, self.dtype)
            result = writer.publish()
        except BaseException:
            writer.abort()
            raise
        return {"shard": batch["shard"], "result": np.array([result.to_json()], dtype=object)}
