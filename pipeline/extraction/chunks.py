"""The extraction stage's work on one chunk, without Ray: plan, decode, encode, write.

A chunk is up to ``batch_size`` consecutive images of one shard (one encoder batch). The Ray Data
stage (:mod:`pipeline.extraction.stage`) runs :func:`decode_chunk` in CPU tasks, :class:`ChunkEncoder`
in the encoder actors and :func:`write_chunk` in the driver's (or an actor's) shard writer; the rows
between them are dicts of one-element numpy arrays (JSON strings and raw bytes), the form Ray Data
moves. ``bench/gpu_suite.py`` runs the same three functions in one process on machines without Ray.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.data.images import load_rgb
from pipeline.errors import ConfigError, DataError
from pipeline.store.layout import ShardSpec
from pipeline.store.shard_writer import ShardWriter
from refseg_models.encoders.precision import check_precision, encoder_autocast

# The keys a chunk row carries through decode and encode (encode adds ``feature_<name>``).
ROW_KEYS = ("shard", "chunk", "last", "image_ids", "paths", "ok_ids", "failures")


def chunk_rows(shards: Sequence[ShardSpec], batch_size: int) -> list[dict]:
    """One row per chunk, in plan order: ``shard``, ``chunk``, ``last`` and the images' ids and paths."""
    rows = []
    for spec in shards:
        starts = range(0, len(spec.items), batch_size)
        for chunk, start in enumerate(starts):
            items = spec.items[start : start + batch_size]
            rows.append(
                {
                    "shard": spec.index,
                    "chunk": chunk,
                    "last": chunk == len(starts) - 1,
                    "image_ids": json.dumps([item.image_id for item in items]),
                    "paths": json.dumps([item.path for item in items]),
                }
            )
    return rows


def decode_chunk(batch: dict[str, np.ndarray], encoder: Any) -> dict[str, np.ndarray]:
    """Decode + ``encoder.preprocess`` one chunk (a batch of one row); bad images become failures
    with a reason. Returns the row with ``ok_ids``, ``failures`` and the float32 ``pixels`` (raw bytes
    of the stacked B x 3 x S x S tensor, ``pixels_shape`` [] when no image decoded)."""
    (image_ids,) = [json.loads(x) for x in batch["image_ids"]]
    (paths,) = [json.loads(x) for x in batch["paths"]]
    ok_ids, failures, tensors = [], [], []
    for image_id, path in zip(image_ids, paths):
        try:
            image = load_rgb(path)
        except DataError as error:
            failures.append({"image_id": image_id, "path": path, "reason": str(error)})
            continue
        try:
            tensor = encoder.preprocess(image)
        except (ValueError, RuntimeError, TypeError) as error:
            failures.append({"image_id": image_id, "path": path, "reason": f"preprocessing failed: {error}"})
            continue
        ok_ids.append(image_id)
        tensors.append(tensor)
    if tensors:
        pixels = torch.stack(tensors).numpy()
        if pixels.dtype != np.float32:
            raise ConfigError(f"{type(encoder).__name__}.preprocess returned {pixels.dtype}, expected float32")
        shape, payload = list(pixels.shape), pixels.tobytes()
    else:
        shape, payload = [], b""
    return {
        "shard": batch["shard"],
        "chunk": batch["chunk"],
        "last": batch["last"],
        "image_ids": batch["image_ids"],
        "paths": batch["paths"],
        "ok_ids": np.array([json.dumps(ok_ids)]),
        "failures": np.array([json.dumps(failures)]),
        "pixels_shape": np.array([json.dumps(shape)]),
        "pixels": np.array([payload], dtype=object),
    }


class ChunkEncoder:
    """The encoder actor's work: preprocessed pixels in, features in the store dtype out.

    On a CUDA device the pixels are copied once into pinned (page-locked) host memory and sent with a
    non-blocking copy, and the features come back cast to the store dtype ON the device (half the
    bytes over PCIe for fp16) into pinned host buffers; PyTorch's caching host allocator reuses
    those buffers, so pinning costs nothing per chunk after the first. On the CPU nothing is
    staged (the bytes are those of a plain ``encoder(pixels).to(dtype)``).

    ``precision``: ``"float32"`` or ``"bfloat16"`` (autocast; :mod:`refseg_models.encoders.precision`).
    ``compile``: run the encoder through ``torch.compile`` (opt-in: it pays only where measured).
    """

    def __init__(
        self,
        encoder: Any,
        feature_shapes: dict[str, Sequence[int]],
        dtype: str,
        device: torch.device | str,
        precision: str = "float32",
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device) if hasattr(encoder, "to") else encoder
        self.forward = torch.compile(self.encoder) if compile else self.encoder
        self.feature_shapes = {name: tuple(int(s) for s in shape) for name, shape in feature_shapes.items()}
        self.dtype = dtype
        self.torch_dtype = getattr(torch, dtype)
        self.precision = check_precision(precision)
        self.staged = self.device.type == "cuda"

    def encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """B x 3 x S x S float32 -> {name: B x C x h x w array of the store dtype}."""
        if self.staged:
            host = torch.empty(pixels.shape, dtype=torch.float32, pin_memory=True)
            host.numpy()[...] = pixels  # the one host copy: straight into page-locked memory
            batch = host.to(self.device, non_blocking=True)
        else:
            batch = torch.from_numpy(np.array(pixels, dtype=np.float32, copy=True))
        with torch.inference_mode(), encoder_autocast(self.device, self.precision):
            features = self.forward(batch)
        if set(features) != set(self.feature_shapes):
            raise DataError(f"encoder returned features {sorted(features)}, expected {sorted(self.feature_shapes)}")
        out = {}
        for name, expected in self.feature_shapes.items():
            value = features[name]
            if tuple(value.shape) != (pixels.shape[0], *expected):
                raise DataError(f"encoder feature {name!r} has shape {tuple(value.shape)}, expected (B, *{expected})")
            # The store dtype cast happens here, exactly as a direct `tensor.to(dtype)` would do it.
            value = value.to(self.torch_dtype)
            if self.staged:
                host = torch.empty(value.shape, dtype=self.torch_dtype, pin_memory=True)
                out[name] = host.copy_(value, non_blocking=True)
            else:
                out[name] = value.contiguous()
        if self.staged:
            torch.cuda.current_stream(self.device).synchronize()  # the non-blocking copies have landed
        return {name: value.numpy() for name, value in out.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded chunk row -> the row with ``feature_<name>`` (raw bytes of the store dtype)."""
        shape = json.loads(batch["pixels_shape"][0])
        out = {key: batch[key] for key in ROW_KEYS}
        if not shape:
            for name in self.feature_shapes:
                out[f"feature_{name}"] = np.array([b""], dtype=object)
            return out
        pixels = np.frombuffer(batch["pixels"][0], dtype=np.float32).reshape(shape)
        for name, array in self.encode(pixels).items():
            out[f"feature_{name}"] = np.array([array.tobytes()], dtype=object)
        return out


def write_chunk(writer: ShardWriter, row: dict, feature_shapes: dict, dtype: str) -> int:
    """Append one encoded chunk (its images in plan order) to ``writer``; returns the image count.
    ``row``: an encoded chunk row with its one-element arrays unpacked (``{key: value[0]}``)."""
    ok_ids = json.loads(row["ok_ids"])
    failures = {f["image_id"]: f for f in json.loads(row["failures"])}
    arrays = {
        name: np.frombuffer(row[f"feature_{name}"], dtype=dtype).reshape(len(ok_ids), *shape)
        for name, shape in feature_shapes.items()
    }
    ok_position = {image_id: i for i, image_id in enumerate(ok_ids)}
    image_ids = json.loads(row["image_ids"])
    for image_id, path in zip(image_ids, json.loads(row["paths"])):
        if image_id in ok_position:
            writer.add(image_id, {name: a[ok_position[image_id]] for name, a in arrays.items()})
        else:
            failure = failures.get(image_id, {"reason": "no features and no failure reason"})
            writer.fail(image_id, path, failure["reason"])
    return len(image_ids)
