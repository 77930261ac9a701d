"""Write one WebDataset shard (fp16 ``.npy`` members) plus its ``_stats.json`` completion marker.

Byte-for-byte reproducible: members are written in a fixed order with fixed mtime/uid/gid/mode and
USTAR headers, so the same images and features always give the same tar. The tar is written under
a temporary name and renamed (local) or uploaded in one PUT (object store); ``_stats.json`` is
written last, so a shard counts as done only when its stats file exists (img2dataset's rule).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds

from pipeline.errors import DataError
from pipeline.store.fs import Location, io_errors
from pipeline.store.layout import ShardSpec
from pipeline.store.version import code_version

ID_MEMBER = "image_id.txt"
_TAR_USER = "refseg"
_TAR_MODE = 0o444


@dataclass
class ShardResult:
    """What ``_stats.json`` records for one shard."""

    shard: str
    count: int
    written: int
    failures: list[dict[str, str]]
    duration_s: float
    bytes: int
    entries: list[dict] = field(repr=False)
    code_version: str = ""
    # What decided this shard's bytes besides the feature set (batch size, torch threads, device).
    writer: dict = field(default_factory=dict)
    # Which run wrote it (run id, host, pid, the caller's config): differs between runs by design.
    run: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        payload = {
            "shard": self.shard,
            "count": self.count,
            "written": self.written,
            "failed": len(self.failures),
            "failures": self.failures,
            "duration_s": round(self.duration_s, 3),
            "bytes": self.bytes,
            "code_version": self.code_version,
            "writer": self.writer,
            "run": self.run,
            "entries": self.entries,
        }
        return json.dumps(payload, indent=1, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "ShardResult":
        try:
            payload = json.loads(data)
            return cls(
                shard=payload["shard"],
                count=int(payload["count"]),
                written=int(payload["written"]),
                failures=list(payload["failures"]),
                duration_s=float(payload["duration_s"]),
                bytes=int(payload["bytes"]),
                entries=list(payload["entries"]),
                code_version=str(payload.get("code_version", "")),
                writer=dict(payload.get("writer", {})),
                run=dict(payload.get("run", {})),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"shard stats file {source} is unreadable or incomplete: {error}") from error


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` bytes of ``array`` (C order, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Stream samples of one :class:`ShardSpec` into a temporary tar, then publish it.

    ``feature_shapes``: {name: (C, h, w)}; every sample must carry exactly these features with these
    shapes and ``dtype``. Use :meth:`add` for each written image, :meth:`fail` for each failed one,
    then :meth:`publish` (or :meth:`abort`).
    """

    def __init__(
        self,
        spec: ShardSpec,
        location: Location,
        scratch_dir: str | Path,
        feature_shapes: dict[str, tuple[int, ...]],
        dtype: str,
        writer_code_version: str | None = None,
        guard: Callable[[], None] | None = None,
        settings: dict | None = None,
        run: dict | None = None,
        started: float | None = None,
    ) -> None:
        self.spec = spec
        self.guard = guard  # called before publishing (the builder's lease check)
        self.settings = dict(settings or {})
        self.run = dict(run or {})
        # Workers on other nodes may not see the checkout: the driver passes its version along.
        self.code_version = writer_code_version or code_version()
        self.location = location
        self.feature_shapes = {name: tuple(shape) for name, shape in feature_shapes.items()}
        self.dtype = np.dtype(dtype)
        self._temp_path = Path(scratch_dir) / f"{spec.name}.partial-{os.getpid()}"
        with io_errors(f"cannot create the temporary shard {self._temp_path}"):
            self._file = self._temp_path.open("wb")
        self._tar = wds.TarWriter(
            self._file,
            user=_TAR_USER,
            group=_TAR_USER,
            mode=_TAR_MODE,
            encoder=False,
            mtime=0,  # an int: a float mtime makes tarfile add a PAX header to every member
        )
        # ``started`` (a perf_counter value): when the run began working on this shard (default: now).
        self._started = time.perf_counter() if started is None else started
        self._positions = {item.image_id: position for position, item in enumerate(spec.items)}
        self._done: set[str] = set()
        self._last_position = -1
        self._written: list[tuple[str, str]] = []  # (image_id, sample key) in tar order
        self._crc32: dict[str, int] = {}  # member name -> crc32 of its bytes (the index's checksum)
        self._failures: list[dict[str, str]] = []

    def _position(self, image_id: str) -> int:
        if image_id not in self._positions:
            raise DataError(f"image {image_id!r} is not planned for {self.spec.name}")
        if image_id in self._done:
            raise DataError(f"image {image_id!r} was given twice to {self.spec.name}")
        position = self._positions[image_id]
        if position < self._last_position:
            # Tar order = planned order, or the shard bytes would depend on arrival order.
            raise DataError(f"image {image_id!r} arrived out of order for {self.spec.name}")
        self._done.add(image_id)
        self._last_position = position
        return position

    def add(self, image_id: str, features: dict[str, np.ndarray]) -> None:
        """Append one image's features ({name: C x h x w array of the store dtype})."""
        position = self._position(image_id)
        if set(features) != set(self.feature_shapes):
            raise DataError(
                f"image {image_id!r}: features {sorted(features)} differ from the store's {sorted(self.feature_shapes)}"
            )
        sample: dict[str, bytes | str] = {"__key__": self.spec.sample_key(position), ID_MEMBER: image_id.encode()}
        for name, array in features.items():
            if tuple(array.shape) != self.feature_shapes[name] or array.dtype != self.dtype:
                raise DataError(
                    f"image {image_id!r}: feature {name!r} is {array.dtype}{tuple(array.shape)}, "
                    f"the store expects {self.dtype}{self.feature_shapes[name]}"
                )
            payload = npy_bytes(array)
            sample[f"{name}.npy"] = payload
            self._crc32[f"{sample['__key__']}.{name}.npy"] = zlib.crc32(payload)
        with io_errors(f"cannot write the temporary shard {self._temp_path}"):
            self._tar.write(sample)
        self._written.append((image_id, str(sample["__key__"])))

    def fail(self, image_id: str, path: str, reason: str) -> None:
        """Record that ``image_id`` could not be extracted (it gets no sample, the run goes on)."""
        self._position(image_id)
        self._failures.append({"image_id": image_id, "path": path, "reason": reason})

    def publish(self) -> ShardResult:
        """Close the tar, move it into the store, then write ``_stats.json`` (the completion marker)."""
        try:
            with io_errors(f"cannot publish {self.location.join(self.spec.name)}"):
                return self._publish()
        except BaseException:
            self.abort()
            raise

    def _publish(self) -> ShardResult:
        missing = [item.image_id for item in self.spec.items if item.image_id not in self._done]
        if missing:
            self.abort()
            raise DataError(f"{self.spec.name}: images {missing[:5]} were neither written nor failed")
        if self.guard is not None:
            self.guard()  # the lease is still ours (publish() aborts the tar otherwise)
        self._tar.close()
        self._file.close()
        size = self._temp_path.stat().st_size
        entries = self._member_entries()
        if self.location.is_local:
            # Same filesystem (the scratch dir lives inside the store): an atomic rename.
            os.replace(self._temp_path, self.location.join(self.spec.name))
        else:
            # One streamed upload; an object store shows the object only once the upload completes.
            with self._temp_path.open("rb") as source, self.location.filesystem.open_output_stream(
                self.location.join(self.spec.name)
            ) as sink:
                while block := source.read(16 << 20):
                    sink.write(block)
            self._temp_path.unlink()
        position_of_failure = {failure["image_id"]: self._positions[failure["image_id"]] for failure in self._failures}
        result = ShardResult(
            shard=self.spec.name,
            count=len(self.spec.items),
            written=len(self._done) - len(self._failures),
            failures=sorted(self._failures, key=lambda failure: position_of_failure[failure["image_id"]]),
            duration_s=time.perf_counter() - self._started,
            bytes=size,
            entries=entries,
            code_version=self.code_version,
            writer=self.settings,
            run=self.run,
        )
        self.location.write_bytes(self.spec.stats_name, result.to_json())
        return result

    def _member_entries(self) -> list[dict]:
        """Index rows (data offset and size of every feature member) read back from the written tar."""
        image_of_key = {key: image_id for image_id, key in self._written}
        entries = []
        with tarfile.open(self._temp_path, "r:") as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                if suffix == ID_MEMBER:
                    continue
                feature = suffix.removesuffix(".npy")
                entries.append(
                    {
                        "image_id": image_of_key[key],
                        "key": key,
                        "feature": feature,
                        "member": member.name,
                        "offset": member.offset_data,
                        "size": member.size,
                        "shape": list(self.feature_shapes[feature]),
                        "crc32": self._crc32[member.name],
                    }
                )
        expected = len(self._written) * len(self.feature_shapes)
        if len(entries) != expected:
            raise DataError(f"{self._temp_path}: found {len(entries)} feature members, wrote {expected}")
        return entries

    def abort(self) -> None:
        """Drop the partial tar (nothing is published)."""
        try:
            self._tar.close()
            self._file.close()
        except (OSError, ValueError):
            pass
        self._temp_path.unlink(missing_ok=True)
