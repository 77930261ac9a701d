"""The Ray Data extraction stage on real coco_mini images with the real MobileNetV2 weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from environment import import_or_missing
from pipeline.data.images import load_rgb
from pipeline.extraction import FactoryEncoder, RegistryEncoder, extract_store
from pipeline.extraction.sources import coco_items
from pipeline.errors import ConfigError
from pipeline.store import StoreMismatchError, feature_provider, open_store, sha256_file, verify_store
from pipeline.store.lease import RunIdentity, make_scratch_dir

from process_titles import RayProcessTitles
from test_store_s3 import s3_endpoint, s3_filesystem  # noqa: F401  (module-scoped moto S3 server fixtures)

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]
ray = import_or_missing("ray")


@pytest.fixture(scope="module")
def ray_local():
    # address="local": our own instance even if a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def fixed_code_version(monkeypatch):
    # Stores record the git commit; the lead may commit while these tests run.
    monkeypatch.setenv("REFSEG_CODE_VERSION", "refseg-test")


@pytest.fixture(scope="module")
def coco_images(coco_mini_dir):
    return sorted(coco_items(coco_mini_dir / "instances.json", coco_mini_dir / "images"), key=lambda i: int(i.image_id))


def mobilenet(weights: Path, **options) -> RegistryEncoder:
    return RegistryEncoder("mobilenet_v2", str(weights), options=options)


def test_round_trip_is_bit_exact_on_real_images(ray_local, coco_images, mobilenet_v2_weights, tmp_path):
    items = coco_images[:6]
    encoder = mobilenet(mobilenet_v2_weights)
    with RayProcessTitles() as titles:
        summary = extract_store(
            items, str(tmp_path / "store"), encoder, "coco_mini", batch_size=4, images_per_shard=4, progress=False
        )
    assert (summary.written, summary.failed, summary.shards) == (6, 0, 2)
    # Decode ran in Ray tasks, encoding in the actor pool: different processes (seen from outside).
    decode, encode = titles.running("_decode_chunk"), titles.running("_EncodeChunk")
    assert decode and encode and decode.isdisjoint(encode), dict(titles.pids)
    assert summary.decode_weightless  # decode tasks got a meta-device copy, not the weights
    # The summary's rate excludes start-up; the shards' durations add up to the pipeline's wall time.
    assert summary.startup_seconds > 0 and summary.extract_seconds > 0
    assert summary.images_per_second == pytest.approx(6 / summary.extract_seconds)
    durations = [json.loads((tmp_path / "store" / f"shard-00000{i}_stats.json").read_text())["duration_s"]
                 for i in range(2)]
    assert 0.8 * summary.extract_seconds <= sum(durations) <= summary.extract_seconds + 0.01

    store = open_store(str(tmp_path / "store"))
    assert store.feature_set.weights_sha256 == sha256_file(mobilenet_v2_weights)
    assert store.feature_set.encoder_id == "mobilenet_v2" and store.feature_set.dtype == "float16"
    direct_encoder = encoder.build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actor ran with 1 thread (actor_num_cpus=1): CPU kernels depend on it
    try:
        pixels = torch.stack([direct_encoder.preprocess(load_rgb(item.path)) for item in items])
        with torch.inference_mode():
            direct = {name: value.to(torch.float16) for name, value in direct_encoder(pixels).items()}
    finally:
        torch.set_num_threads(threads)
    assert set(direct) == {"layer2", "layer3", "layer4"}
    for index, item in enumerate(items):
        stored = store.get(item.image_id)
        for name, value in direct.items():
            assert np.array_equal(stored[name], value[index].numpy()), (item.image_id, name)
    streamed = {sample["image_id"]: sample for sample in store.stream()}
    assert np.array_equal(streamed[items[5].image_id]["layer4"], direct["layer4"][5].numpy())
    assert verify_store(str(tmp_path / "store")).ok

    # Cache mode and online mode serve the same numbers through one interface.
    ids = [items[1].image_id, items[4].image_id]
    cached_provider = feature_provider(
        "cache", store_uri=str(tmp_path / "store"), expect=store.feature_set, encoder=direct_encoder
    )
    cached = cached_provider.get_batch(ids)
    torch.set_num_threads(1)
    try:
        online_provider = feature_provider("online", encoder=direct_encoder, images=items, expect=store.feature_set)
        online = online_provider.get_batch(ids)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(cached[name], online[name]) for name in ("layer2", "layer3", "layer4"))
    with pytest.raises(ConfigError, match="expected feature-set key"):
        feature_provider("cache", store_uri=str(tmp_path / "store"))


def test_corrupt_and_missing_images_are_reported_not_fatal(ray_local, coco_images, mobilenet_v2_weights, tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    items = []
    for item in coco_images[10:14]:
        shutil.copy(item.path, image_dir / Path(item.path).name)
        items.append((item.image_id, str(image_dir / Path(item.path).name)))
    truncated = image_dir / "truncated.jpg"
    truncated.write_bytes(Path(coco_images[20].path).read_bytes()[:3000])
    garbage = image_dir / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 100)
    items += [("900001", str(truncated)), ("900002", str(garbage)), ("900003", str(image_dir / "missing.jpg"))]

    summary = extract_store(
        items, str(tmp_path / "store"), mobilenet(mobilenet_v2_weights, input_size=128), "coco_mini",
        batch_size=3, images_per_shard=4, progress=False,
    )
    assert (summary.images, summary.written, summary.failed) == (7, 4, 3)
    reasons = {failure["image_id"]: failure["reason"] for failure in summary.failures}
    assert "truncated.jpg" in reasons["900001"] and "garbage.jpg" in reasons["900002"]
    assert "not found" in reasons["900003"] and "missing.jpg" in reasons["900003"]
    assert "FAILED 900002" in summary.text()
    stats = json.loads((tmp_path / "store" / "shard-000001_stats.json").read_text())
    assert stats["count"] == 3 and stats["failed"] == 3 and {f["image_id"] for f in stats["failures"]} == set(reasons)
    store = open_store(str(tmp_path / "store"))
    assert sorted(store.image_ids) == sorted(item[0] for item in items[:4])
    assert verify_store(str(tmp_path / "store"), allow_failed=True).ok


def _store_files(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(root.iterdir()) if path.is_file()}


def test_interrupted_extraction_resumes_to_an_identical_store(ray_local, coco_images, mobilenet_v2_weights, tmp_path):
    items = coco_images[30:39] + [("999999", str(tmp_path / "missing" / "refseg.jpg"))]
    encoder = mobilenet(mobilenet_v2_weights, input_size=128)
    kwargs = dict(batch_size=2, images_per_shard=3, progress=False)
    clean = extract_store(items, str(tmp_path / "clean"), encoder, "coco_mini", **kwargs)
    assert clean.shards == 4 and clean.failed == 1

    class Killed(Exception):
        pass

    done: list[str] = []

    def kill_after_two(result):
        done.append(result.shard)
        if len(done) == 2:
            raise Killed("simulated crash")

    with pytest.raises(Killed):
        extract_store(items, str(tmp_path / "resumed"), encoder, "coco_mini", on_shard_done=kill_after_two, **kwargs)
    resumed_dir = tmp_path / "resumed"
    assert not (resumed_dir / "manifest.json").exists()
    finished = sorted(p.name for p in resumed_dir.glob("*_stats.json"))
    assert finished == ["shard-000000_stats.json", "shard-000001_stats.json"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = make_scratch_dir(resumed_dir / ".partial", RunIdentity.new(pid=int(gone.stdout)))  # a killed run's
    (ghost / "shard-000002.tar.partial-1").write_bytes(b"half a shard")
    (resumed_dir / "shard-000002_stats.json.tmp").write_bytes(b"{")  # a stats write cut short

    again: list[str] = []
    summary = extract_store(
        items, str(resumed_dir), encoder, "coco_mini", on_shard_done=lambda r: again.append(r.shard), **kwargs
    )
    assert again == ["shard-000002.tar", "shard-000003.tar"]
    assert (summary.shards_extracted, summary.shards_skipped) == (2, 2)

    clean_files, resumed_files = _store_files(tmp_path / "clean"), _store_files(resumed_dir)
    assert sorted(clean_files) == sorted(resumed_files)
    assert not (resumed_dir / ".partial").exists()
    for name, data in clean_files.items():
        if name.endswith("_stats.json"):  # identical except who wrote it and the measured duration
            a, b = json.loads(data), json.loads(resumed_files[name])
            for stats in (a, b):
                stats.pop("duration_s"), stats.pop("run")
            assert a == b, name
        else:
            assert data == resumed_files[name], name

    # Shards written by the encoder actors themselves (multi-node mode) are the same bytes.
    with RayProcessTitles() as titles:
        by_actors = extract_store(items, str(tmp_path / "actors"), encoder, "coco_mini", writer="actors", **kwargs)
    assert by_actors.shards_extracted == 4 and by_actors.failed == 1
    decode, encode = titles.running("_decode_chunk"), titles.running("_ShardActor")
    assert decode and encode and decode.isdisjoint(encode), dict(titles.pids)
    actor_files = _store_files(tmp_path / "actors")
    assert sorted(actor_files) == sorted(clean_files)
    assert all(actor_files[n] == clean_files[n] for n in clean_files if not n.endswith("_stats.json"))

    # A finished store re-run does nothing; other weights are refused before any work.
    rerun = extract_store(items, str(resumed_dir), encoder, "coco_mini", retry_failed=False, **kwargs)
    assert rerun.shards_extracted == 0 and rerun.written == 9
    other = FactoryEncoder(encoder.build, weights="0" * 64)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        extract_store(items, str(resumed_dir), other, "coco_mini", **kwargs)
    with pytest.raises(StoreMismatchError, match="dtype: store has 'float16', requested 'float32'"):
        extract_store(items, str(resumed_dir), encoder, "coco_mini", dtype="float32", **kwargs)


def test_job_entry_point_and_verify_command(ray_local, coco_mini_dir, mobilenet_v2_weights, tmp_path, capsys):
    import importlib.util

    from pipeline.extraction.commands import main as commands_main

    job_path = Path(__file__).resolve().parents[1] / "jobs" / "extract_features.py"
    spec = importlib.util.spec_from_file_location("extract_features_job", job_path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    output = str(tmp_path / "cli_store")

    def argv_of_job(out):
        return [
            "--output", out, "--dataset", "coco_mini", "--encoder", "mobilenet_v2",
            "--checkpoint", str(mobilenet_v2_weights), "--encoder-options", '{"input_size": 128}',
            "--coco-annotations", str(coco_mini_dir / "instances.json"), "--image-dir", str(coco_mini_dir / "images"),
            "--limit", "5", "--batch-size", "2", "--images-per-shard", "2", "--no-progress",
        ]

    assert job.main(argv_of_job(output)) == 0
    manifest_bytes = (tmp_path / "cli_store" / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    assert manifest["counts"]["written"] == 5 and "config" not in manifest
    assert manifest["writer_settings"] == [{"batch_size": 2, "device": "cpu", "dtype": "float16", "torch_threads": 1}]
    assert manifest["code_version"] == "refseg-test" and manifest["shard_code_versions"] == ["refseg-test"]
    stats = json.loads((tmp_path / "cli_store" / "shard-000002_stats.json").read_text())
    assert stats["writer"] == manifest["writer_settings"][0]  # what wrote each shard, in its own stats
    assert stats["run"]["config"]["extraction"]["limit"] == 5 and stats["run"]["pid"] > 0
    assert stats["run"]["config"]["extraction"]["encoder_options"] == {"input_size": 128}
    # A finished re-run from another directory, other batch size, progress on: manifest bytes unchanged.
    rerun = [arg if arg != "--no-progress" else "--batch-size" for arg in argv_of_job(output)] + ["3"]
    assert job.main(rerun) == 0
    assert (tmp_path / "cli_store" / "manifest.json").read_bytes() == manifest_bytes
    assert commands_main(["verify", output]) == 0
    assert "OK" in capsys.readouterr().out
    (tmp_path / "cli_store" / "shard-000001.tar").write_bytes(b"broken")
    assert commands_main(["verify", output]) == 1
    assert commands_main(["extract", "--output", output, "--dataset", "x", "--encoder", "mobilenet_v2"]) == 2


def test_extraction_into_s3(ray_local, coco_images, mobilenet_v2_weights, s3_filesystem):
    uri = "s3://refseg-test/stores/extracted"
    summary = extract_store(
        coco_images[40:43], uri, mobilenet(mobilenet_v2_weights, input_size=128), "coco_mini",
        batch_size=2, images_per_shard=2, filesystem=s3_filesystem, progress=False, writer="actors",
    )  # the actors upload their shards to S3 themselves
    assert (summary.written, summary.shards) == (3, 2)
    store = open_store(uri, expect=open_store(uri, filesystem=s3_filesystem).feature_set, filesystem=s3_filesystem)
    assert store.get(coco_images[41].image_id)["layer4"].shape == (1280, 4, 4)
    assert verify_store(uri, filesystem=s3_filesystem).ok


def test_failed_images_exit_1_fail_verify_and_a_rerun_retries_only_their_shards(
    ray_local, coco_images, mobilenet_v2_weights, tmp_path, capsys
):
    from pipeline.extraction.commands import main as commands_main

    chosen = coco_images[50:54]
    wrong, right = tmp_path / "wrong.txt", tmp_path / "right.txt"
    # A wrong folder for the second shard's images (the "wrong --image-dir" case, for one shard).
    wrong.write_text("".join(f"{item.image_id}\t{tmp_path / 'nowhere' / Path(item.path).name if n >= 2 else item.path}\n"
                             for n, item in enumerate(chosen)))
    right.write_text("".join(f"{item.image_id}\t{item.path}\n" for item in chosen))
    output = tmp_path / "store"
    args = ["extract", "--output", str(output), "--dataset", "coco_mini", "--encoder", "mobilenet_v2",
            "--checkpoint", str(mobilenet_v2_weights), "--encoder-options", '{"input_size": 128}',
            "--batch-size", "2", "--images-per-shard", "2", "--no-progress"]
    assert commands_main(args + ["--image-list", str(wrong)]) == 1
    captured = capsys.readouterr()
    assert "2 of 4 images failed and are not in the store" in captured.err and "FAILED" in captured.out
    assert commands_main(["verify", str(output)]) == 1
    assert "2 of 4 images FAILED extraction" in capsys.readouterr().out
    assert commands_main(["verify", "--allow-failed", str(output)]) == 0
    assert commands_main(args + ["--image-list", str(wrong), "--no-retry-failed"]) == 1  # opted out: as it was
    assert "extracted now 0, already done 2" in capsys.readouterr().out

    good = {name: (output / name).read_bytes() for name in ("shard-000000.tar", "shard-000000_stats.json")}
    assert commands_main(args + ["--image-list", str(right)]) == 0
    assert "extracted now 1, already done 1 (retried 1 with failed images)" in capsys.readouterr().out
    assert good == {name: (output / name).read_bytes() for name in good}  # the good shard untouched
    assert commands_main(["verify", str(output)]) == 0 and len(open_store(str(output))) == 4


@pytest.mark.timeout(180)  # before the guard, the driver writer hung here forever
@pytest.mark.parametrize("writer", ["driver", "actors"])
def test_actors_holding_every_cpu_are_refused_up_front(ray_local, coco_images, mobilenet_v2_weights, tmp_path, writer):
    with pytest.raises(ConfigError, match=r"1 encoder actor\(s\) x 2 CPU .* = 2 of the cluster's 2 CPUs leave 0 "
                                          r"for decode tasks, each needs 1 .*would hang"):
        extract_store(coco_images[:2], str(tmp_path / "store"), mobilenet(mobilenet_v2_weights, input_size=128),
                      "coco_mini", actor_num_cpus=2, progress=False, writer=writer)
    assert not (tmp_path / "store" / "_lease.json").exists()  # the refused run gave the store back


def test_cli_reaches_an_s3_compatible_server_through_aws_endpoint_url(
    ray_local, coco_mini_dir, mobilenet_v2_weights, s3_endpoint, monkeypatch, capsys  # noqa: F811
):
    from pipeline.cli import main as refseg

    for name, value in {"AWS_ENDPOINT_URL": f"http://{s3_endpoint}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    uri = "s3://refseg-test/stores/from-cli"
    assert refseg([
        "extract", "--output", uri, "--dataset", "coco_mini", "--encoder", "mobilenet_v2",
        "--checkpoint", str(mobilenet_v2_weights), "--encoder-options", '{"input_size": 128}',
        "--coco-annotations", str(coco_mini_dir / "instances.json"), "--image-dir", str(coco_mini_dir / "images"),
        "--limit", "3", "--batch-size", "2", "--images-per-shard", "2", "--no-progress",
    ]) == 0
    assert refseg(["verify", uri]) == 0 and "3 images" in capsys.readouterr().out
