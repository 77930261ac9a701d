"""Per-(image, class) target masks rendered once and cached (memory LRU + optional PNG files).

Rasterising COCO/LVIS polygons is the expensive part of building episodes; each (image, class)
mask is rendered once, then served from a bounded in-memory LRU and, when ``cache_dir`` is given,
from lossless PNGs keyed by the source's fingerprint (a changed annotation file gets a new folder,
so a stale mask is never served).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.base import SegmentationSource


def source_fingerprint(source: SegmentationSource) -> str:
    """A short hash identifying the annotation content of ``source``."""
    annotation_file = getattr(source, "annotation_file", None)
    digest = hashlib.sha256(source.name.encode())
    variant = getattr(source, "mask_variant", "")
    if variant and variant != "crowd=ignore":  # the historical default keeps its cache folders
        digest.update(variant.encode())
    if annotation_file is not None and Path(annotation_file).is_file():
        with open(annotation_file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(repr(getattr(source, "root", id(source))).encode())
    return digest.hexdigest()[:16]


def mask_folder_name(source: SegmentationSource) -> str:
    """The folder of ``source``'s rendered masks: its name and annotation fingerprint."""
    return f"{source.name}-{source_fingerprint(source)}"


def mask_file_key(image_key: Hashable, class_id: int) -> str:
    """The file name (without extension) of one mask: ``<image>_<class>`` ("/" of an id as "__")."""
    return f"{str(image_key).replace('/', '__')}_{int(class_id)}"


class MaskCache:
    def __init__(self, source: SegmentationSource, cache_dir: str | Path | None = None, max_items: int = 2048):
        self.source = source
        self.max_items = max_items
        self._memory: OrderedDict[tuple[Hashable, int], np.ndarray] = OrderedDict()
        self.directory = None
        if cache_dir is not None:
            self.directory = Path(cache_dir) / mask_folder_name(source)
            self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get(self, image_id: Hashable, class_id: int) -> np.ndarray:
        """The uint8 {0, 1, 255} mask of ``class_id`` in ``image_id`` (read-only array)."""
        key = (self.source.key(image_id), int(class_id))
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        self.misses += 1
        mask = self._read_file(key)
        if mask is None:
            mask = self.source.class_mask(*key)
            self._write_file(key, mask)
        mask.setflags(write=False)  # shared between callers: nobody may mutate it
        self._memory[key] = mask
        if len(self._memory) > self.max_items:
            self._memory.popitem(last=False)
        return mask

    def _path(self, key: tuple[Hashable, int]) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{mask_file_key(*key)}.png"

    def _read_file(self, key: tuple[Hashable, int]) -> np.ndarray | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.uint8).copy()

    def _write_file(self, key: tuple[Hashable, int], mask: np.ndarray) -> None:
        path = self._path(key)
        if path is None:
            return
        # write then rename, so a killed process never leaves a half-written mask behind
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
        os.close(handle)
        Image.fromarray(mask, mode="L").save(temporary, format="PNG")
        os.replace(temporary, path)
