"""``verify``: every index entry readable and intact, shapes/dtypes as the manifest says, counts consistent.

Full mode reads each shard once, sequentially (:mod:`tarfile` in stream mode), matches every member
against its index row (name, data offset, size, image id), compares the CRC-32 of every payload
with the index's ``crc32`` and decodes every ``.npy`` (dtype, shape, finiteness). ``quick=True``
reads only the tar headers (and the tiny image-id members), seeking over the payloads: layout,
offsets and counts are checked, payload bytes are not.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from pipeline.errors import DataError
from pipeline.store.fs import resolve_location
from pipeline.store.index import CHECKSUM_COLUMN, has_checksums, read_index
from pipeline.store.manifest import Manifest
from pipeline.store.npy import all_finite, decode_npy
from pipeline.store.shard_writer import ID_MEMBER

_MAX_PROBLEMS = 50


@dataclass
class VerifyReport:
    uri: str
    quick: bool = False
    shards: int = 0
    images: int = 0
    entries: int = 0
    bytes_read: int = 0
    checksums_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Images the extraction could not read (manifest failures): the store is sound but incomplete.
    failed: list[dict] = field(default_factory=list)
    planned: int = 0
    allow_failed: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and (self.allow_failed or not self.failed)

    def problem(self, message: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(message)
        elif len(self.problems) == _MAX_PROBLEMS:
            self.problems.append("... (more problems not listed)")

    def summary(self) -> str:
        mode = "quick (headers only, payloads not read)" if self.quick else f"{self.checksums_checked} checksums checked"
        head = (
            f"{self.uri}: {self.shards} shards, {self.images} images, {self.entries} feature entries, "
            f"{self.bytes_read / 1e6:.1f} MB read, {mode}"
        )
        lines = [f"  note: {note}" for note in self.notes]
        if self.failed:
            lines.append(
                f"  {'(allowed) ' if self.allow_failed else ''}{len(self.failed)} of {self.planned} images FAILED "
                "extraction and are not in the store (re-run the extraction to retry them):"
            )
            lines += [f"    {f['image_id']} ({f['path']}): {f['reason']}" for f in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"    ... {len(self.failed) - 10} more in manifest.json 'failures'")
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s), {len(self.failed)} failed image(s)"
        return "\n".join([f"{head}: {verdict}", *lines, *(f"  {p}" for p in self.problems)])


def verify_store(
    uri: str,
    filesystem: pafs.FileSystem | None = None,
    raise_on_error: bool = False,
    quick: bool = False,
    allow_failed: bool = False,
) -> VerifyReport:
    """Check the store at ``uri``; ``report.ok`` is False on any problem and, unless
    ``allow_failed``, when images failed extraction (the store then lacks them)."""
    location = resolve_location(uri, filesystem)
    report = VerifyReport(uri, quick=quick, allow_failed=allow_failed)
    manifest = Manifest.read(location)
    report.failed = list(manifest.failures)
    report.planned = manifest.num_images
    if manifest.num_failed != len(manifest.failures):
        report.problem(f"manifest counts {manifest.num_failed} failed images but lists {len(manifest.failures)}")
    index = read_index(location)
    if not has_checksums(index):
        report.notes.append(
            "the index has no crc32 column (store written before per-entry checksums): corrupted payloads "
            "with intact .npy headers cannot be detected; re-extract into a new location to add them"
        )
    elif not quick and index.column(CHECKSUM_COLUMN).null_count:
        report.notes.append(
            f"{index.column(CHECKSUM_COLUMN).null_count} entries have no crc32 (their shards were written "
            "before per-entry checksums): their payloads are checked for dtype/shape/finiteness only"
        )
    dtype = np.dtype(manifest.feature_set.dtype)
    rows: dict[tuple[str, str], dict] = {}
    for row in index.to_pylist():
        rows[(row["shard"], row["member"])] = row
    images_in_index = {row["image_id"] for row in rows.values()}
    expected_entries = manifest.num_written * len(manifest.feature_shapes)
    if len(rows) != expected_entries:
        report.problem(f"index has {len(rows)} entries, manifest implies {expected_entries}")
    if len(images_in_index) != manifest.num_written:
        report.problem(f"index lists {len(images_in_index)} images, manifest says {manifest.num_written} written")
    seen: set[tuple[str, str]] = set()
    for shard in manifest.shards:
        path = location.join(shard.name)
        info = location.filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            report.problem(f"{path}: shard file missing")
            continue
        if info.size != shard.bytes:
            report.problem(f"{path}: {info.size} bytes, manifest says {shard.bytes}")
        report.shards += 1
        samples = 0
        try:
            pending: list[tuple[tarfile.TarInfo, bytes | None]] = []
            for member, payload in _members(location, path, quick, report):
                if pending and pending[0][0].name.partition(".")[0] != member.name.partition(".")[0]:
                    samples += _check_sample(pending, shard.name, path, rows, seen, manifest, dtype, report)
                    pending = []
                pending.append((member, payload))
            if pending:
                samples += _check_sample(pending, shard.name, path, rows, seen, manifest, dtype, report)
        except (tarfile.TarError, OSError, DataError) as error:
            report.problem(f"{path}: unreadable ({error})")
        report.images += samples
        if samples != shard.written:
            report.problem(f"{path}: {samples} samples, manifest says {shard.written} written")
    missing = set(rows) - seen
    if missing:
        report.problem(f"{len(missing)} index entries not found in their shards, e.g. {sorted(missing)[:3]}")
    if manifest.num_written == 0:  # --allow-failed accepts failed images, never a store without any
        report.problem(
            f"the store holds 0 images (all {manifest.num_images} failed extraction): nothing can be read from it"
        )
    if raise_on_error and not report.ok:
        raise DataError(report.summary())
    return report


def _members(location, path: str, quick: bool, report: VerifyReport):
    """(member, payload) in tar order; quick: payload None except the image-id members (headers via seeks)."""
    if quick:
        with location.filesystem.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                payload = None
                if member.name.partition(".")[2] == ID_MEMBER:
                    payload = tar.extractfile(member).read()
                    report.bytes_read += len(payload)
                yield member, payload
        return
    with location.filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            payload = tar.extractfile(member).read() if member.isfile() else b""
            report.bytes_read += len(payload)
            yield member, payload


def _check_sample(members, shard, path, rows, seen, manifest, dtype, report) -> int:
    """Check one sample's adjacent members against the index; returns 1 if it has an id member."""
    ids = [payload.decode() for member, payload in members if member.name.partition(".")[2] == ID_MEMBER]
    image_id = ids[0] if len(ids) == 1 else None
    if image_id is None:
        report.problem(f"{path}: sample {members[0][0].name.partition('.')[0]} has {len(ids)} {ID_MEMBER} members")
    for member, payload in members:
        if member.name.partition(".")[2] == ID_MEMBER:
            continue
        row = rows.get((shard, member.name))
        if row is None:
            report.problem(f"{path}: member {member.name} is not in the index")
            continue
        seen.add((shard, member.name))
        report.entries += 1
        if row["offset"] != member.offset_data or row["size"] != member.size:
            report.problem(
                f"{path}: {member.name} at {member.offset_data}+{member.size}, index says {row['offset']}+{row['size']}"
            )
        if image_id != row["image_id"]:
            report.problem(f"{path}: {member.name} belongs to image {image_id!r}, index says {row['image_id']!r}")
        if payload is None:  # quick mode: layout only
            continue
        expected_crc = row.get(CHECKSUM_COLUMN)
        if expected_crc is not None:
            report.checksums_checked += 1
            actual_crc = zlib.crc32(payload)
            if actual_crc != expected_crc:
                report.problem(
                    f"{path}: {member.name} (image {row['image_id']!r}, feature {row['feature']!r}) is corrupted: "
                    f"crc32 {actual_crc:08x}, index says {expected_crc:08x}"
                )
                continue
        try:
            array = decode_npy(payload, f"{path} {member.name}")
        except DataError as error:
            report.problem(str(error))
            continue
        expected_shape = tuple(manifest.feature_shapes.get(row["feature"], ()))
        if array.dtype != dtype or array.shape != expected_shape or list(array.shape) != row["shape"]:
            report.problem(
                f"{path}: {member.name} is {array.dtype}{array.shape}, manifest says {dtype}{expected_shape}"
            )
        elif not all_finite(array):
            report.problem(f"{path}: {member.name} has non-finite values")
    return 1 if ids else 0
