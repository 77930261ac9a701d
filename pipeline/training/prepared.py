"""A fold prepared once by the driver: all the training workers read besides the feature stores.

The driver reads the raw dataset (annotations, official lists) once per fold and writes
(:mod:`pipeline.training.prepare`)::

    <root>/prepared/<dataset>-fold<k>-<sha256[:16]>/
        fold.json            written last: schema version, the fold (dataset, fold, shot, test
                             protocol), the feature stores and their encoders' identities, the
                             driver's description and skip report, every file's sha256
        train_pairs.parquet  (class_id, image_id): the base-class training pairs, in the source's order
        val.parquet          the validation episode manifest
        test.parquet         the test episode manifest
        masks.parquet        the mask index (pipeline/store/masks.py) of every (image, class) an
                             episode of the fold may read
        images.parquet       (image_id, path) of the test episodes' images (the overlays)
        <sampler files>      what the training sampler prepared (SegIC's mix)
    <root>/masks/<source>-<annotation fingerprint>/   the masks' PNG files, shared by folds and runs

The folder's name is the sha256 of ``fold.json`` (which holds every file's sha256), so the same fold
prepared again is the same folder and is not rewritten. Workers open it with the hash the driver
gives them (:func:`open_prepared`), check ``fold.json``'s schema version and every file's sha256
before reading it, and each mask's when reading it; they never import a raw-dataset module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.images import load_rgb
from pipeline.episodes.manifest import MANIFEST_SCHEMA
from pipeline.errors import DataError
from pipeline.parquet import read_parquet_table
from pipeline.report import SkipReport
from pipeline.store.fs import Location, resolve_location
from pipeline.store.masks import MaskStore
from refseg_models.checkpoint import EncoderIdentity

SCHEMA_VERSION = 1
FOLD_FILE = "fold.json"
PAIRS_SCHEMA = pa.schema([("class_id", pa.int32()), ("image_id", pa.string())])
IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string())])
TABLE_SCHEMAS = {"train_pairs": PAIRS_SCHEMA, "val": MANIFEST_SCHEMA, "test": MANIFEST_SCHEMA, "images": IMAGES_SCHEMA}


@dataclass(frozen=True)
class PreparedRef:
    """Where a prepared fold is and the sha256 of its ``fold.json``: what the driver hands the workers."""

    uri: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "sha256": self.sha256}


def mask_folder(artifact_uri: str, folder: str) -> str:
    """``<root>/masks/<folder>`` of the artifact at ``<root>/prepared/<name>``."""
    return f"{artifact_uri.rstrip('/').rsplit('/', 2)[0]}/masks/{folder}"


class PreparedArtifact:
    """A prepared folder, opened and checked: ``fold.json`` and its checked files."""

    def __init__(self, ref: PreparedRef) -> None:
        self.ref = ref
        self.location: Location = resolve_location(ref.uri)
        if not self.location.exists(FOLD_FILE):
            raise DataError(f"prepared fold {ref.uri} has no {FOLD_FILE} (not prepared, or preparation was "
                            "interrupted): run the training job's command again, its driver prepares it")
        raw = self.location.read_bytes(FOLD_FILE)
        if hashlib.sha256(raw).hexdigest() != ref.sha256:
            raise DataError(f"prepared fold {self.location.join(FOLD_FILE)} is not the one this run prepared "
                            f"(sha256 {hashlib.sha256(raw).hexdigest()[:16]}, expected {ref.sha256[:16]}): it changed "
                            "since; run the training job's command again")
        self.meta: dict[str, Any] = json.loads(raw)
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"prepared fold {ref.uri} has schema version {self.meta.get('schema_version')}, this "
                            f"refseg reads {SCHEMA_VERSION}: run the training job's command again to prepare it anew")

    def read_bytes(self, name: str) -> bytes:
        """A file of the artifact, checked against the sha256 ``fold.json`` records."""
        expected = self.meta["files"].get(name)
        if expected is None:
            raise DataError(f"prepared fold {self.ref.uri} has no file {name!r}")
        data = self.location.read_bytes(name)
        if hashlib.sha256(data).hexdigest() != expected:
            raise DataError(f"prepared file {self.location.join(name)} is corrupted (its sha256 is not the one "
                            f"{FOLD_FILE} records): run the training job's command again with --new-run")
        return data

    def read_table(self, name: str, schema: pa.Schema | None = None) -> pa.Table:
        table = read_parquet_table(self.read_bytes(f"{name}.parquet"))
        if schema is not None and table.schema != schema:
            raise DataError(f"prepared table {self.location.join(name)}.parquet: schema {table.schema}, expected {schema}")
        return table

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(f"{name}.json"))

    def masks(self, index_table: str, folder: str) -> MaskStore:
        """The masks of ``index_table`` (a mask index), read from the mask folder ``folder``."""
        return MaskStore(resolve_location(mask_folder(self.ref.uri, folder)), self.read_table(index_table))


class PreparedFold:
    """The fold the workers train and test on (the driver's :class:`~pipeline.training.data.FoldData`,
    as data): training pairs, validation / test manifests, label masks, the test images' paths."""

    def __init__(self, artifact: PreparedArtifact) -> None:
        self.artifact = artifact
        meta = artifact.meta
        self.dataset, self.fold, self.test_protocol = meta["dataset"], int(meta["fold"]), meta["test_protocol"]
        pairs = artifact.read_table("train_pairs", PAIRS_SCHEMA)
        self.train_pairs: dict[int, list[str]] = {}
        for class_id, image_id in zip(pairs.column("class_id").to_pylist(), pairs.column("image_id").to_pylist()):
            self.train_pairs.setdefault(int(class_id), []).append(image_id)
        self.val = artifact.read_table("val", MANIFEST_SCHEMA)
        self.test = artifact.read_table("test", MANIFEST_SCHEMA)
        self.masks = artifact.masks("masks", meta["mask_folder"])
        images = artifact.read_table("images", IMAGES_SCHEMA)
        self._paths = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))

    @property
    def num_train_pairs(self) -> int:
        return sum(len(images) for images in self.train_pairs.values())

    def report(self, context: str) -> SkipReport:
        """A skip report named ``context`` holding what the preparation skipped."""
        report = SkipReport(context)
        report.add(self.artifact.meta["report"])
        return report

    def identities(self) -> dict[str, EncoderIdentity]:
        """The frozen encoders' identities the driver checked the fold's stores against, by role."""
        stores = self.artifact.meta.get("stores", {})
        return {role: EncoderIdentity.from_dict(entry["encoder"], self.artifact.ref.uri) for role, entry in stores.items()}

    def describe(self) -> list[str]:
        """What the fold trains, validates and tests on, and what was left out (the driver's lines)."""
        return list(self.artifact.meta["describe"])

    def image_ids(self) -> set[str]:
        """Every image id any episode of this fold may read (training pairs, val and test)."""
        ids = {image for images in self.train_pairs.values() for image in images}
        for table in (self.val, self.test):
            ids.update(table.column("query_id").to_pylist())
            ids.update(s for supports in table.column("support_ids").to_pylist() for s in supports)
        return ids

    def load_image(self, image_id: str) -> np.ndarray:
        """H x W x 3 uint8 of a test episode's image (the qualitative overlays)."""
        if image_id not in self._paths:
            raise DataError(f"image {image_id} is not one of the prepared fold's test images")
        return load_rgb(self._paths[image_id])


def open_prepared(ref: PreparedRef | dict[str, str]) -> PreparedFold:
    """The prepared fold ``ref`` names, checked (schema version, sha256 of every file)."""
    if isinstance(ref, dict):
        ref = PreparedRef(**ref)
    return PreparedFold(PreparedArtifact(ref))
