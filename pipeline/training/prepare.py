"""The driver prepares each fold once (before Ray starts): the artifact of
:mod:`pipeline.training.prepared`, the only data the training workers read besides the stores.

:class:`FoldWriter` turns the driver's :class:`~pipeline.training.data.FoldData` (read from the raw
dataset) into tables, renders the label masks the fold's episodes may read (only those not rendered
before), lets the training sampler add its own files (SegIC's mix), and writes everything under
``<root>/prepared``, ``fold.json`` last. Preparing the same fold again gives the same bytes, hence
the same folder: it is checked (every file's sha256) instead of written again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.base import SegmentationSource
from pipeline.data.mask_cache import MaskCache, mask_file_key, mask_folder_name
from pipeline.errors import DataError
from pipeline.locations import Root
from pipeline.store.fs import Location, resolve_location
from pipeline.store.masks import write_masks
from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData
from pipeline.training.prepared import (
    FOLD_FILE,
    IMAGES_SCHEMA,
    PAIRS_SCHEMA,
    SCHEMA_VERSION,
    TABLE_SCHEMAS,
    PreparedRef,
)
from refseg_models.checkpoint import EncoderIdentity


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _local_dirs(location: Location) -> Location:
    if location.is_local:
        location.makedirs()
    return location


class FoldWriter:
    """Collects one fold's prepared files and writes them (:meth:`write`, ``fold.json`` last)."""

    def __init__(self, cfg: TrainConfig, data: FoldData, root: Root) -> None:
        self.cfg, self.data, self.root = cfg, data, root
        self._files: dict[str, bytes] = {}
        self._meta: dict[str, Any] = {}
        pairs = [(int(c), str(i)) for c, images in data.train_pairs.items() for i in images]
        self.add_table("train_pairs", pa.Table.from_pylist([{"class_id": c, "image_id": i} for c, i in pairs], PAIRS_SCHEMA))
        self.add_table("val", data.val)
        self.add_table("test", data.test)
        tested = dict.fromkeys(i for row in data.test.to_pylist() for i in (row["query_id"], *row["support_ids"]))
        paths = [{"image_id": i, "path": str(data.source.image_path(data.source.key(i)))} for i in tested]
        self.add_table("images", pa.Table.from_pylist(paths, IMAGES_SCHEMA))
        keys = list(pairs)
        for table in (data.val, data.test):
            for row in table.to_pylist():
                keys += [(row["class_id"], image) for image in (row["query_id"], *row["support_ids"])]
        self._meta["mask_folder"] = self.add_masks("masks", data.source, ((i, c) for c, i in keys), data.masks)

    def add_table(self, name: str, table: pa.Table) -> None:
        expected = TABLE_SCHEMAS.get(name)
        if expected is not None and table.schema != expected:
            raise DataError(f"prepared table {name}: schema {table.schema}, expected {expected}")
        self._files[f"{name}.parquet"] = _parquet_bytes(table)

    def set_frozen(self, stores: Mapping[str, str], identities: Mapping[str, EncoderIdentity]) -> None:
        """The feature stores the fold's workers read (``{role: uri}``) and their encoders' identities."""
        self._meta["stores"] = {role: {"uri": stores[role], "encoder": identities[role].to_dict()} for role in stores}

    def add_json(self, name: str, value: Any) -> None:
        self._files[f"{name}.json"] = json.dumps(value, sort_keys=True, indent=1).encode()

    def add_masks(self, index: str, source: SegmentationSource, keys: Iterable[tuple[Hashable, int]],
                  cache: MaskCache | None = None) -> str:
        """Render (once) the masks ``keys`` of ``source`` into its mask folder under the root and add
        their index as table ``index``; returns the folder's name (the reader needs it)."""
        cache = cache or MaskCache(source)
        folder = mask_folder_name(source)
        location = _local_dirs(resolve_location(f"{self.root.masks}/{folder}"))
        table = write_masks(location, ((str(i), int(c)) for i, c in keys), cache.get,
                            lambda image, class_id: mask_file_key(source.key(image), class_id))
        self.add_table(index, table)
        return folder

    def write(self) -> PreparedRef:
        """Write the fold under ``<root>/prepared`` (or check the copy already there); its reference."""
        cfg, data = self.cfg, self.data
        meta = {
            "schema_version": SCHEMA_VERSION, "dataset": cfg.dataset, "fold": cfg.fold, "shot": cfg.shot,
            "test_protocol": data.test_protocol, "describe": data.describe(f"fold {cfg.fold} data"),
            "report": data.report.as_dict(), **self._meta,
            "files": {name: hashlib.sha256(raw).hexdigest() for name, raw in sorted(self._files.items())},
        }
        raw = json.dumps(meta, sort_keys=True, indent=1).encode()
        sha = hashlib.sha256(raw).hexdigest()
        location = _local_dirs(resolve_location(f"{self.root.prepared}/{cfg.dataset}-fold{cfg.fold}-{sha[:16]}"))
        done = location.exists(FOLD_FILE) and hashlib.sha256(location.read_bytes(FOLD_FILE)).hexdigest() == sha
        for name, content in self._files.items():
            if not (done and location.exists(name)
                    and hashlib.sha256(location.read_bytes(name)).hexdigest() == meta["files"][name]):
                location.write_bytes(name, content)
        if not done:
            location.write_bytes(FOLD_FILE, raw)  # last: its presence says the folder is complete
        return PreparedRef(location.display, sha)
