"""Store write/read without Ray: random access, cache bound, streaming splits, verify, refusals."""

from __future__ import annotations

import json
import os
import pickle
import random
import tarfile

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.store import (
    FeatureSetKey,
    StoreBuilder,
    StoreMismatchError,
    open_store,
    resolve_location,
    sorted_items,
    verify_store,
)

SHAPES = {"layer3": (8, 4, 4), "embed": (16, 2, 2)}
KEY = FeatureSetKey("toy", "toy_encoder", "0" * 64, "toy_pre", "float16")


def features_of(image_id: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(image_id))
    return {name: rng.standard_normal(shape).astype(np.float16) for name, shape in SHAPES.items()}


def write_store(
    uri: str, ids: list[int], per_shard: int = 3, failed: tuple[int, ...] = (), filesystem=None,
    written: dict[str, dict[str, np.ndarray]] | None = None, **builder_options
) -> StoreBuilder:
    """``written``: {image id: features} written instead of :func:`features_of` (e.g. with a NaN)."""
    items = sorted_items([(i, f"/data/{i}.jpg") for i in ids])
    builder = StoreBuilder(resolve_location(uri, filesystem), KEY, SHAPES, items, per_shard, **builder_options)
    for spec in builder.prepare():
        writer = builder.writer(spec)
        for item in spec.items:
            if int(item.image_id) in failed:
                writer.fail(item.image_id, item.path, "corrupt test image")
            else:
                writer.add(item.image_id, (written or {}).get(item.image_id) or features_of(item.image_id))
        writer.publish()
    builder.finalize()
    return builder


def test_random_access_round_trip_and_layout(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 11)), failed=(4,))
    store = open_store(uri, expect=KEY)
    assert len(store) == 9 and "4" not in store and 5 in store
    assert store.manifest.num_failed == 1 and store.manifest.failures[0]["reason"] == "corrupt test image"
    for image_id in store.image_ids:
        got = store.get(image_id)
        for name, expected in features_of(image_id).items():
            assert got[name].dtype == np.float16 and np.array_equal(got[name], expected)
    batch = store.get_batch([3, 7, 10], features=["layer3"])
    assert batch["layer3"].shape == (3, 8, 4, 4)
    assert np.array_equal(batch["layer3"][1].numpy(), features_of("7")["layer3"])
    with pytest.raises(KeyError, match="'4' is not in feature store"):
        store.get(4)
    # WebDataset layout: keys without dots, a sample's members adjacent, fixed mtime/owner.
    with tarfile.open(tmp_path / "store" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert all(member.mtime == 0 and member.uname == "refseg" for member in tar.getmembers())
    keys = [name.split(".", 1)[0] for name in names]
    assert keys == sorted(keys) and all("." not in key for key in keys)
    assert names[:3] == ["000000_000000.embed.npy", "000000_000000.image_id.txt", "000000_000000.layer3.npy"]
    stats = json.loads((tmp_path / "store" / "shard-000001_stats.json").read_text())
    assert stats["count"] == 3 and stats["failed"] == 1 and stats["failures"][0]["image_id"] == "4"
    assert verify_store(uri, allow_failed=True).ok


def test_cache_is_bounded_in_bytes(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 9)))
    per_image = sum(np.prod(shape) * 2 for shape in SHAPES.values())
    store = open_store(uri, cache_bytes=int(2.5 * per_image))
    for image_id in ["1", "2", "3", "1"]:
        store.get(image_id)
    assert store.cached_bytes <= 2.5 * per_image
    assert (store.hits, store.misses) == (0, 4)  # "1" was evicted by "3"
    store.get("3")
    assert store.hits == 1
    cached = store.get("3")["layer3"]
    with pytest.raises(ValueError):
        cached[0, 0, 0] = 1  # shared with the cache: read-only
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers / Ray tasks
    assert np.array_equal(clone.get("8")["embed"], features_of("8")["embed"]) and clone.cached_bytes > 0


def test_streaming_splits_by_node_then_worker(tmp_path):
    uri = str(tmp_path / "store")
    ids = list(range(1, 15))
    write_store(uri, ids, per_shard=2)  # 7 shards
    store = open_store(uri)
    everything = [sample["image_id"] for sample in store.stream()]
    assert everything == [str(i) for i in ids]
    parts = [[s["image_id"] for s in store.stream(rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(parts, []), key=int) == everything
    assert all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)
    sample = next(iter(store.stream(features=["embed"])))
    assert set(sample) == {"image_id", "embed"} and np.array_equal(sample["embed"], features_of("1")["embed"])

    import torch

    loader = torch.utils.data.DataLoader(store.stream(rank=1, world_size=3), batch_size=None, num_workers=2)
    assert sorted(s["image_id"] for s in loader) == sorted(parts[1])


def test_mismatched_feature_set_is_refused_on_open_and_on_resume(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, [1, 2, 3])
    other_weights = FeatureSetKey("toy", "toy_encoder", "f" * 64, "toy_pre", "float16")
    with pytest.raises(StoreMismatchError, match="weights_sha256: store has '0000.*requested 'ffff"):
        open_store(uri, expect=other_weights)
    assert len(open_store(uri, expect=KEY, expect_shapes=SHAPES)) == 3
    with pytest.raises(StoreMismatchError, match="feature shapes"):
        open_store(uri, expect=KEY, expect_shapes={**SHAPES, "embed": (16, 4, 4)})
    other_dtype = FeatureSetKey("toy", "toy_encoder", "0" * 64, "toy_pre", "float32")
    builder = StoreBuilder(resolve_location(uri), other_dtype, SHAPES, sorted_items([(1, "a")]), 3)
    with pytest.raises(StoreMismatchError, match="dtype: store has 'float16', requested 'float32'"):
        builder.prepare()
    other_list = StoreBuilder(resolve_location(uri), KEY, SHAPES, sorted_items([(1, "a"), (5, "b")]), 3)
    with pytest.raises(StoreMismatchError, match="image_list_sha256"):
        other_list.prepare()


def test_unfinished_store_and_bad_samples_are_clear_errors(tmp_path):
    uri = str(tmp_path / "store")
    items = sorted_items([(i, f"{i}.jpg") for i in range(1, 5)])
    builder = StoreBuilder(resolve_location(uri), KEY, SHAPES, items, 2)
    first = builder.prepare()[0]
    writer = builder.writer(first)
    with pytest.raises(DataError, match="feature 'layer3' is float32"):
        writer.add("1", {name: a.astype(np.float32) for name, a in features_of("1").items()})
    with pytest.raises(DataError, match="not planned"):
        writer.add("3", features_of("3"))
    writer.abort()
    with pytest.raises(DataError, match=r"feature store \S+ is incomplete \(0 of 2 shards written: its extraction was "
                                        r"interrupted, or is running\): re-run its extraction command"):
        open_store(uri)


def test_verify_detects_corruption(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 7)))
    store = open_store(uri)
    shard, offset, *_ = store._rows["2"]["layer3"]
    path = tmp_path / "store" / shard
    data = bytearray(path.read_bytes())
    data[offset + 2] ^= 0xFF  # break the .npy magic of one member
    path.write_bytes(bytes(data))
    report = verify_store(uri)
    assert not report.ok and any("000000_000001.layer3.npy" in problem for problem in report.problems)
    path.write_bytes(bytes(data[:1500]))  # truncated shard
    report = verify_store(uri)
    assert any("bytes, manifest says" in problem for problem in report.problems)
    with pytest.raises(DataError):
        verify_store(uri, raise_on_error=True)


def test_verify_detects_flipped_payload_bits_by_checksum(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.store.index import INDEX_SCHEMA_V1, write_index

    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 7)))
    assert verify_store(uri).checksums_checked == 6 * len(SHAPES)
    shard, offset, size, crc = open_store(uri)._rows["2"]["layer3"]
    assert crc is not None
    path = tmp_path / "store" / shard
    data = bytearray(path.read_bytes())
    data[offset + size - 40] ^= 0x04  # two flipped bits inside the fp16 values, the .npy header intact
    data[offset + size - 7] ^= 0x20
    path.write_bytes(bytes(data))
    report = verify_store(uri)
    assert not report.ok
    assert any("image '2', feature 'layer3') is corrupted: crc32" in problem for problem in report.problems)
    quick = verify_store(uri, quick=True)  # headers only: layout fine, payloads not read
    assert quick.ok and quick.checksums_checked == 0 and "quick" in quick.summary()
    assert open_store(uri, verify=False).get("2")["layer3"].shape == SHAPES["layer3"]  # unchecked: only to measure
    with pytest.raises(DataError, match="image '2' feature 'layer3' is corrupted"):
        open_store(uri).get("2")

    # A store written before checksums existed: still readable, verify says what it cannot check.
    old_index = pq.read_table(tmp_path / "store" / "index.parquet").select(INDEX_SCHEMA_V1.names)
    write_index(resolve_location(uri), old_index.cast(INDEX_SCHEMA_V1))
    report = verify_store(uri)
    assert report.checksums_checked == 0 and "no crc32 column" in report.summary()
    old_store = open_store(uri)
    assert len(old_store) == 6 and old_store.unchecksummed_entries == 6 * len(SHAPES)
    from pipeline.training.features import FrozenFeatures  # what the training job warns about such stores

    note = FrozenFeatures({"backbone": old_store}, None, {}).unchecksummed_note()
    assert note.startswith(f"warning: entries without a crc32 in backbone {uri} (12 entries)")
    write_store(str(tmp_path / "new"), [1, 2])
    assert FrozenFeatures({"backbone": open_store(str(tmp_path / "new"))}, None, {}).unchecksummed_note() is None


def test_readers_refuse_a_flipped_byte_a_nan_and_a_truncated_shard_naming_them(tmp_path):
    """Every read is checked (issue 20): a flipped payload byte (crc32), an fp16 NaN written with a
    valid crc32 (an encoder that produced it), on random access and streaming; a truncated shard
    when the store is opened, before any read."""
    uri = str(tmp_path / "store")
    nan = features_of("5")
    nan["embed"] = nan["embed"].copy()
    nan["embed"][3, 1, 0] = np.float16("nan")
    write_store(uri, list(range(1, 7)), written={"5": nan})
    store = open_store(uri)
    assert store.get("4")["embed"].shape == SHAPES["embed"]
    where = "shard-000001.tar image '5' feature 'embed' has non-finite values"
    with pytest.raises(DataError, match=where):
        store.get("5")
    with pytest.raises(DataError, match=where):
        list(open_store(uri).stream())
    assert open_store(uri, verify=False).get("5")["embed"][3, 1, 0] != 0  # unchecked (the bench's baseline)

    shard, offset, size, _ = store._rows["2"]["layer3"]
    path = tmp_path / "store" / shard
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x10  # one flipped bit in the values, the .npy header intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000000.tar image '2' feature 'layer3' is corrupted \(crc32"):
        open_store(uri, cache_bytes=0).get("2")
    path.write_bytes(bytes(data[: len(data) - 700]))
    with pytest.raises(DataError, match=r"shard .*shard-000000.tar is \d+ bytes, its manifest says \d+ \(truncated"):
        open_store(uri)
    path.unlink()
    with pytest.raises(DataError, match="shard .*shard-000000.tar is missing"):
        open_store(uri)


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", "<f8"])
def test_all_finite_reads_the_exponent_bits(dtype):
    from pipeline.store.npy import all_finite

    finite = np.array([0.0, -0.0, 1.5, -2.0, np.finfo(np.dtype(dtype)).max, np.finfo(np.dtype(dtype)).tiny / 4], dtype=dtype)
    assert all_finite(finite) and all_finite(np.arange(4, dtype=np.int32))
    for bad in (np.nan, np.inf, -np.inf):
        values = finite.copy()
        values[2] = bad
        assert not all_finite(values)


def test_verify_refuses_a_store_of_0_images_even_with_allow_failed(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, [1, 2], failed=(1, 2))
    report = verify_store(uri, allow_failed=True)
    assert not report.ok and "the store holds 0 images (all 2 failed extraction)" in report.summary()


def test_verify_piped_into_a_closed_reader_stops_quietly(tmp_path):
    """`refseg verify ... | head -2` ended in a BrokenPipeError traceback (issue 20): the reader is
    gone before verify prints, so every write fails; exit 141 (as SIGPIPE), nothing on stderr."""
    import subprocess
    import sys

    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 7)))
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "verify", uri], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the child can print (it needs seconds for its imports)
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141 and stderr == "", stderr


def test_failed_images_fail_verify_and_are_retried_without_touching_good_shards(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 10)), failed=(4,))  # shard 1 = images 4, 5, 6
    report = verify_store(uri)
    assert not report.ok and not report.problems
    assert "1 of 9 images FAILED extraction" in report.summary()
    assert "4 (/data/4.jpg): corrupt test image" in report.summary()
    assert verify_store(uri, allow_failed=True).ok

    root = tmp_path / "store"
    good = ["shard-000000.tar", "shard-000000_stats.json", "shard-000002.tar", "shard-000002_stats.json"]
    before = {name: ((root / name).read_bytes(), (root / name).stat().st_mtime_ns) for name in good}
    items = sorted_items([(i, f"/data/{i}.jpg") for i in range(1, 10)])
    skip = StoreBuilder(resolve_location(uri), KEY, SHAPES, items, 3)
    assert skip.prepare(retry_failed=False) == [] and not skip.lease.held  # opted out: nothing to do

    messages: list[str] = []
    builder = StoreBuilder(resolve_location(uri), KEY, SHAPES, items, 3, log=messages.append)
    pending = builder.prepare()
    assert [spec.name for spec in pending] == ["shard-000001.tar"] and builder.retried == ["shard-000001.tar"]
    assert "retrying 1 failed image(s) of 1 finished shard(s) (shard-000001.tar)" in messages[0]
    assert not (root / "manifest.json").exists() and not (root / "shard-000001_stats.json").exists()
    writer = builder.writer(pending[0])
    for item in pending[0].items:  # the image reads fine now
        writer.add(item.image_id, features_of(item.image_id))
    writer.publish()
    builder.finalize()
    assert verify_store(uri).ok and open_store(uri).manifest.num_failed == 0 and "4" in open_store(uri)
    assert before == {name: ((root / name).read_bytes(), (root / name).stat().st_mtime_ns) for name in good}


def test_manifest_depends_only_on_the_shards_and_a_finished_rerun_writes_nothing(tmp_path):
    settings = {"batch_size": 4, "torch_threads": 1, "dtype": "float16", "device": "cpu"}
    for name, progress in (("a", True), ("b", False)):  # two invocations that differ in everything else
        write_store(str(tmp_path / name), list(range(1, 8)), failed=(5,), writer_settings=settings,
                    run_config={"output": f"relative/{name}", "progress": progress})
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("manifest.json", "index.parquet", "shard-000000.tar", "shard-000001.tar", "_plan.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifest = json.loads((a / "manifest.json").read_text())
    assert "config" not in manifest and manifest["writer_settings"] == [settings]
    stats_a, stats_b = (json.loads((root / "shard-000001_stats.json").read_text()) for root in (a, b))
    assert stats_a["writer"] == settings and stats_a["run"]["config"] == {"output": "relative/a", "progress": True}
    assert stats_a["run"]["run_id"] != stats_b["run"]["run_id"]
    for stats in (stats_a, stats_b):  # the only fields that differ between runs: who wrote it, how long it took
        stats.pop("run"), stats.pop("duration_s")
    assert stats_a == stats_b

    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in a.iterdir() if path.is_file()}
    items = sorted_items([(i, f"/elsewhere/{i}.jpg") for i in range(1, 8)])
    rerun = StoreBuilder(resolve_location(str(a)), KEY, SHAPES, items, 3, run_config={"progress": "changed"})
    assert rerun.prepare(retry_failed=False) == []
    assert rerun.finalize().num_written == 6
    assert before == {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in a.iterdir() if path.is_file()}


def test_streamed_samples_stay_intact_while_read_buffers_are_reused(tmp_path, monkeypatch):
    from pipeline.store import streaming

    monkeypatch.setattr(streaming, "STREAM_BLOCK_BYTES", 2048)  # a read block of ~1 sample: many reuses
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 15)), per_shard=7)
    store = open_store(uri)
    kept = list(store.stream())  # every sample kept alive: no buffer may be reused under them
    assert [sample["image_id"] for sample in kept] == [str(i) for i in range(1, 15)]
    for sample in kept:
        assert all(np.array_equal(sample[name], value) for name, value in features_of(sample["image_id"]).items())
        assert not sample["embed"].flags.writeable
    dropped = 0
    for sample in store.stream():  # dropped one by one: buffers are reused, values still right
        assert np.array_equal(sample["layer3"], features_of(sample["image_id"])["layer3"])
        dropped += 1
    assert dropped == 14
    shard, offset, size, _ = store._rows["9"]["embed"]
    path = tmp_path / "store" / shard
    data = bytearray(path.read_bytes())
    data[offset + size - 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="image '9' feature 'embed' is corrupted"):
        list(open_store(uri).stream())


def test_parallel_reads_equal_single_reads_while_shard_handles_are_evicted(tmp_path, monkeypatch):
    from pipeline.store import reader

    monkeypatch.setattr(reader, "_MAX_OPEN_SHARDS", 1)  # every read of another shard evicts a handle in use
    uri = str(tmp_path / "store")
    ids = list(range(1, 25))
    write_store(uri, ids, per_shard=2)  # 12 shards
    store = open_store(uri, cache_bytes=0)
    order = [str(i) for i in ids] * 3
    random.Random(1).shuffle(order)
    for evicted in (False, True):  # served from the page cache in this thread, or by the read threads
        if evicted:
            for path in (tmp_path / "store").glob("shard-*.tar"):
                descriptor = os.open(path, os.O_RDONLY)
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(descriptor)
        many = store.get_many(order, threads=4)
        for image_id, got in zip(order, many):
            assert all(np.array_equal(got[name], value) for name, value in features_of(image_id).items()), image_id
    kept = store.get("11")  # read buffers are reused only once nothing views them any more
    for _ in range(3):
        store.get_many(order, threads=4)
    assert all(np.array_equal(kept[name], value) for name, value in features_of("11").items())
    batch = store.get_batch(["3", "17", "8"], features=["embed"])
    assert np.array_equal(batch["embed"][1].numpy(), features_of("17")["embed"])
    store.close()
    assert store.get("5")["layer3"].shape == SHAPES["layer3"]  # reopens after close


def test_read_buffers_belong_to_their_store_and_are_released_when_it_closes(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, list(range(1, 7)), per_shard=3)
    first, second = open_store(uri, cache_bytes=0), open_store(uri, cache_bytes=0)
    first.get("2")
    assert list(first.stream())
    assert first._read_buffers._blocks and first._stream_buffers._blocks
    assert not second._read_buffers._blocks and not second._stream_buffers._blocks  # nothing shared
    copy = pickle.loads(pickle.dumps(first))  # another process's store: buffers of its own, empty
    assert copy._read_buffers is not first._read_buffers and not copy._read_buffers._blocks
    first.close()
    assert not first._read_buffers._blocks and not first._stream_buffers._blocks
    assert np.array_equal(first.get("4")["embed"], features_of("4")["embed"])  # usable again after close
