"""Label masks rendered once on the driver, read by the training workers: PNG files, keyed, checksummed.

A dataset's ``(image, class)`` label masks (uint8 {0, 1, 255}) are rendered once into a mask folder
as lossless PNGs named ``<image>_<class>-<sha256 of the file>.png`` (the folder is named after the
annotation content, as :class:`pipeline.data.mask_cache.MaskCache`'s, so a changed annotation file
gets a new folder and a stale mask is never served). A name carries its file's checksum, so one
listing of the folder tells the driver which masks exist and what they must hash to, without
reading them. What one prepared fold reads is listed in an index table, one row per mask:
``image_id, class_id, file, sha256``.

Workers read masks only through :class:`MaskStore`: each file is checked against its sha256 when it
is read (a flipped byte or a truncated file is a :class:`~pipeline.errors.DataError` naming it),
decoded, and kept in a bounded LRU. They never open a dataset's annotations.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError
from pipeline.store.fs import Location

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("class_id", pa.int32()),
    ("file", pa.string()),
    ("sha256", pa.string()),
])
DEFAULT_CACHED_MASKS = 2048
_CHECKSUMMED = re.compile(r"^(?P<key>.+)-(?P<sha>[0-9a-f]{64})\.png$")


def encode_png(mask: np.ndarray) -> bytes:
    """H x W uint8 -> lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """PNG bytes -> H x W uint8 (``where`` names the file in errors)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"mask {where} is not a readable PNG: {error}") from error


def write_masks(
    location: Location,
    keys: Iterable[tuple[str, int]],
    render: Callable[[str, int], np.ndarray],
    file_key: Callable[[str, int], str],
) -> pa.Table:
    """Make sure every ``(image id, class id)`` of ``keys`` has its PNG in ``location`` and return
    the index of ``keys`` (in their order, duplicates once). Only missing masks are rendered (each
    file written atomically); ``file_key(image, class)`` is the file name before its checksum."""
    existing = {}
    for name in location.list_names():
        match = _CHECKSUMMED.match(name)
        if match:
            existing.setdefault(match.group("key"), (name, match.group("sha")))
    rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    seen: set[tuple[str, int]] = set()
    for image_id, class_id in keys:
        key = (str(image_id), int(class_id))
        if key in seen:
            continue
        seen.add(key)
        stem = file_key(*key)
        if stem not in existing:
            data = encode_png(render(*key))
            sha = hashlib.sha256(data).hexdigest()
            existing[stem] = (f"{stem}-{sha}.png", sha)
            location.write_bytes(existing[stem][0], data)
        name, sha = existing[stem]
        rows["image_id"].append(key[0])
        rows["class_id"].append(key[1])
        rows["file"].append(name)
        rows["sha256"].append(sha)
    return pa.Table.from_pydict(rows, schema=INDEX_SCHEMA)


class MaskStore:
    """``get(image_id, class_id)``: the uint8 {0, 1, 255} mask (read-only) from ``location``, through
    ``index`` (:data:`INDEX_SCHEMA`); every file checked against its sha256 when read."""

    def __init__(self, location: Location, index: pa.Table, max_items: int = DEFAULT_CACHED_MASKS) -> None:
        if index.schema != INDEX_SCHEMA:
            raise DataError(f"mask index of {location.display}: schema {index.schema}, expected {INDEX_SCHEMA}")
        self.location = location
        self.max_items = max_items
        self._files = {
            (image, int(class_id)): (name, sha)
            for image, class_id, name, sha in zip(*(index.column(c).to_pylist() for c in INDEX_SCHEMA.names))
        }
        self._memory: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._files)

    def get(self, image_id: object, class_id: int) -> np.ndarray:
        key = (str(image_id), int(class_id))
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if key not in self._files:
            raise DataError(f"no prepared mask of class {key[1]} in image {key[0]} in {self.location.display}")
        name, sha = self._files[key]
        data = self.location.read_bytes(name)
        if hashlib.sha256(data).hexdigest() != sha:
            raise DataError(f"mask {self.location.join(name)} is corrupted (its sha256 is not the one in its name): "
                            "delete it and run the same command again (the driver renders missing masks)")
        mask = decode_png(data, self.location.join(name))
        mask.setflags(write=False)  # shared between callers: nobody may mutate it
        self._memory[key] = mask
        if len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return mask
