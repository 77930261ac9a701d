"""The training layer's data side, without Ray: configs, per-epoch episode draws, rank shares,
validation / test manifests, and the checks that refuse bad input before any training step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from environment import import_or_missing
from pipeline.errors import ConfigError, DataError
from pipeline.training.config import StoreSpec, TrainConfig
from pipeline.training.data import load_fold_data
from pipeline.training.epochs import epoch_episodes, epoch_seed, episodes_per_epoch, rank_share

pytestmark = [pytest.mark.real_data]


@pytest.fixture(scope="module")
def fold_config(coco_mini_dir: Path, coco20i_lists_dir: Path) -> TrainConfig:
    return TrainConfig(
        annotations=str(coco_mini_dir / "instances.json"), images=str(coco_mini_dir / "images"),
        lists_dir=str(coco20i_lists_dir), fold=0, val_episodes=50, test_episodes=100, feature_dataset="coco_mini",
    )


@pytest.fixture(scope="module")
def fold_data(fold_config):
    return load_fold_data(fold_config)


def test_config_round_trips_and_names_runs_deterministically(fold_config: TrainConfig) -> None:
    again = TrainConfig.from_dict(json.loads(json.dumps(fold_config.to_dict())))
    assert again == fold_config
    assert again.default_run_name() == fold_config.default_run_name()
    # folds share one configuration (parent run); the recipe is the paper's unless overridden
    assert fold_config.replace(fold=2).default_run_name() == fold_config.default_run_name()
    assert fold_config.replace(shot=5).default_run_name() != fold_config.default_run_name()
    # a bf16 run is another configuration; at fp32 (the default) the name is the one it had before
    # the precision field existed (the field is left out of the fingerprint at its default)
    assert fold_config.replace(precision="bfloat16").default_run_name() != fold_config.default_run_name()
    bf16_store = fold_config.replace(backbone=fold_config.backbone.replace(precision="bfloat16"))
    assert bf16_store.default_run_name() != fold_config.default_run_name()
    # the fingerprint of the configuration as it was before the fields added later (sampler, mix, the
    # precisions): all at their defaults, so earlier runs keep their names
    payload = {k: v for k, v in fold_config.to_dict().items()
               if k not in ("fold", "run_name", "storage_path", "experiment", "max_failures", "log_every", "overlays",
                            "sampler", "mix", "precision")}
    for role in ("sam", "backbone"):
        payload[role] = {k: v for k, v in payload[role].items() if k != "precision"}
    assert fold_config.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
    assert fold_config.recipe.lr == 1e-4 and fold_config.recipe.epochs == 50 and fold_config.batch_per_worker == 4
    assert fold_config.replace(recipe_overrides={"epochs": 3}).recipe.epochs == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fold": 4}, "fold"),
        ({"method": "vrp_samm"}, "unknown method 'vrp_samm'"),
        ({"num_workers": 3}, "split evenly"),
        ({"annotation_type": "polygon"}, "annotation type"),
        ({"baselines": ("nope",)}, "unknown baseline"),
        ({"recipe_overrides": {"schedule": "linear"}}, "schedule"),
        ({"method_overrides": {"num_querys": 3}}, "unknown option"),
        ({"precision": "float16"}, "precision must be one of"),
        ({"backbone": StoreSpec("mobilenet_v2", precision="fp8")}, "backbone.precision must be one of"),
    ],
)
def test_bad_configurations_are_refused_up_front(fold_config: TrainConfig, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fold_config.replace(**change)


def test_no_novel_class_is_ever_a_training_target(fold_data, fold_config: TrainConfig) -> None:
    from pipeline.data.folds import novel_classes

    novel = set(novel_classes("coco20i", 0))
    assert fold_data.train_pairs and not novel & set(fold_data.train_pairs)
    table = epoch_episodes(fold_config, fold_data, 0, 64)
    assert not novel & set(table.column("class_id").to_pylist())
    # test and validation episodes are novel classes only, and disjoint from each other
    assert set(fold_data.test.column("class_id").to_pylist()) <= novel
    assert set(fold_data.val.column("class_id").to_pylist()) <= novel
    test = set(zip(fold_data.test.column("query_id").to_pylist(), map(tuple, fold_data.test.column("support_ids").to_pylist())))
    val = set(zip(fold_data.val.column("query_id").to_pylist(), map(tuple, fold_data.val.column("support_ids").to_pylist())))
    assert not test & val
    assert "not HSNet-identical" in fold_data.test_protocol  # coco_mini holds a subset of the list images


def test_epoch_draws_are_seeded_and_rank_shares_are_disjoint_and_complete(fold_data, fold_config: TrainConfig) -> None:
    first = epoch_episodes(fold_config, fold_data, 3, 48)
    assert first.equals(epoch_episodes(fold_config, fold_data, 3, 48))  # a resumed run draws the same
    assert not first.equals(epoch_episodes(fold_config, fold_data, 4, 48))  # each epoch its own draw
    assert epoch_seed(321, 3) != epoch_seed(321, 4) and epoch_seed(321, 3) != epoch_seed(322, 3)
    for world in (1, 2, 4):
        shares = [rank_share(first, rank, world) for rank in range(world)]
        ids = [row["episode_id"] for share in shares for row in share]
        assert sorted(ids) == list(range(48)) and len(set(ids)) == 48
        assert {len(share) for share in shares} == {48 // world}
    with pytest.raises(ConfigError):
        rank_share(first, 2, 2)


def test_epoch_length_is_hsnet_rounded_to_global_batches(fold_data, fold_config: TrainConfig) -> None:
    assert episodes_per_epoch(fold_config, fold_data) == (fold_data.num_train_pairs // 8) * 8
    assert episodes_per_epoch(fold_config.replace(episodes_per_epoch=21), fold_data) == 16
    with pytest.raises(ConfigError, match="less than one global batch"):
        episodes_per_epoch(fold_config.replace(episodes_per_epoch=5), fold_data)


def test_missing_and_mismatched_stores_are_named(fold_config: TrainConfig, tmp_path: Path, mobilenet_v2_weights: Path) -> None:
    from pipeline.extraction import FactoryEncoder, extract_store
    from pipeline.training.features import open_frozen_features
    from refseg_models import build_model
    from refseg_models.checkpoint import weights_sha256
    from refseg_models.encoders import build_encoder

    spec = build_model("prototype_matching").feature_spec()  # reads the backbone store only
    cfg = fold_config.replace(backbone=StoreSpec("mobilenet_v2", str(mobilenet_v2_weights), str(tmp_path / "absent")))
    with pytest.raises(DataError, match=r"(?s)the backbone feature store \S*absent does not exist yet; build it with:"
                                        r"\n  refseg extract --output \S*absent"):
        open_frozen_features(cfg, spec, live_backbone=False)

    ray = import_or_missing("ray")
    images = sorted(Path(cfg.images).glob("*.jpg"))[:2]
    items = [(str(int(p.stem)), str(p)) for p in images]
    sha = weights_sha256(mobilenet_v2_weights)
    encoder = FactoryEncoder(lambda: build_encoder("mobilenet_v2", allow_random_init=True), sha)

    class Stopped(Exception):
        pass

    def stop(result):
        raise Stopped("the extraction is interrupted after its first shard")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        extract_store(items, str(tmp_path / "small"), encoder, "coco_mini", progress=False)
        extract_store(items, str(tmp_path / "small_bf16"), encoder, "coco_mini", progress=False, precision="bfloat16")
        with pytest.raises(Stopped):
            extract_store(items, str(tmp_path / "cut"), encoder, "coco_mini", progress=False, images_per_shard=1,
                          on_shard_done=stop)
    finally:
        ray.shutdown()
    # an interrupted store is not "absent" (issue 20): incomplete, and the same command resumes it
    cut = cfg.replace(backbone=StoreSpec("mobilenet_v2", str(mobilenet_v2_weights), str(tmp_path / "cut")))
    with pytest.raises(DataError, match=r"(?s)the backbone feature store \S*cut is incomplete \(1 of 2 shards written: "
                                        r"its extraction was interrupted, or is running\); the same command resumes it"
                                        r" .*\n  refseg extract --output \S*cut"):
        open_frozen_features(cut, spec, live_backbone=False)
    cfg = cfg.replace(backbone=StoreSpec("mobilenet_v2", str(mobilenet_v2_weights), str(tmp_path / "small")))
    assert open_frozen_features(cfg, spec, {items[0][0]}, live_backbone=False).stores["backbone"]
    # the episodes need images the store lacks: named, with the count
    with pytest.raises(DataError, match=r"lacks 1 image\(s\) the episodes need \(e.g. \['999999'\]\)"):
        open_frozen_features(cfg, spec, {items[0][0], "999999"}, live_backbone=False)
    # a store made from other weights than the configuration says: refused, the difference named
    other = cfg.replace(backbone=StoreSpec("mobilenet_v2", None, str(tmp_path / "small")))
    with pytest.raises(DataError, match=f"weights_sha256: store has '{sha}', requested 'random-init'"):
        open_frozen_features(other, spec, live_backbone=False)
    # a bf16 extraction is read by a configuration that says so, and by no other
    bf16 = cfg.replace(backbone=StoreSpec("mobilenet_v2", str(mobilenet_v2_weights), str(tmp_path / "small_bf16"),
                                          precision="bfloat16"))
    assert open_frozen_features(bf16, spec, {items[0][0]}, live_backbone=False).stores["backbone"]
    with pytest.raises(DataError, match="precision: store has 'bfloat16', requested 'float32'"):
        open_frozen_features(bf16.replace(backbone=bf16.backbone.replace(precision="float32")), spec, live_backbone=False)
    with pytest.raises(DataError, match="precision: store has 'float32', requested 'bfloat16'"):
        open_frozen_features(cfg.replace(backbone=cfg.backbone.replace(precision="bfloat16")), spec, live_backbone=False)
    with pytest.raises(ConfigError, match="training-free: nothing to train"):
        cfg.replace(method="prototype_matching")


def test_unreachable_tracking_uri_is_refused_before_training() -> None:
    from pipeline.training.tracking import check_reachable

    with pytest.raises(ConfigError, match="unreachable"):
        check_reachable("http://127.0.0.1:9/", timeout_s=2)
    with pytest.raises(ConfigError, match="not writable|does not exist"):
        check_reachable("sqlite:////nonexistent-folder/mlflow.db")


def test_relative_paths_are_refused_before_ray_starts(fold_config: TrainConfig, monkeypatch, tmp_path: Path) -> None:
    """The command line makes every path absolute; a TrainConfig built in Python with a relative one
    would fail deep inside a Ray Train worker (another working directory), so the job refuses it.
    (The relative folder is made here: how ``../shared`` is laid out, symbolic links included, does
    not matter.)"""
    from pipeline.training.job import JobOptions, validate

    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = fold_config.replace(images="images")
    with pytest.raises(ConfigError, match=r"--images: images is relative: give absolute paths"):
        validate([relative], JobOptions(folds=(0,), tracking_uri="sqlite:////nonexistent-folder/mlflow.db"))


def test_the_fold_data_is_described_in_words(fold_data, fold_config: TrainConfig) -> None:
    """What the driver prints per fold: validation episodes dropped for repeating a test episode are
    counted, and the HSNet list entries a subset of COCO lacks are named as such (not "skipped")."""
    from pipeline.data.splits import LIST_IMAGE_MISSING

    lines = fold_data.describe("fold 0 data")
    assert lines[0].startswith(f"fold 0 data: {fold_data.num_train_pairs} training pairs") and "validation 37 episodes" in lines[0]
    assert fold_data.val_drawn == fold_config.val_episodes == 50 and fold_data.val.num_rows == 37
    assert "  validation: 13 of the 50 episodes drawn repeat a test episode (same query and supports) and were dropped; " \
           "37 remain (more: --val-episodes)" in lines
    missing = fold_data.report.counts[LIST_IMAGE_MISSING]
    assert missing > 100_000 and any(f"the official lists name {missing} (class, image) entries whose image is not in this "
                                     "dataset" in line for line in lines)
    assert not any("skipped" in line for line in lines)


def test_a_bf16_store_is_named_by_the_command_line_and_gets_a_location_of_its_own(tmp_path: Path) -> None:
    import argparse

    from pipeline.training.commands import add_train_arguments, configs_from_args
    from pipeline.training.features import extraction_command

    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    common = ["--annotations", "a.json", "--images", "images", "--backbone-checkpoint", "b.pth", "--root", str(tmp_path)]
    plain, _ = configs_from_args(parser.parse_args(common), "coco20i")
    bf16, _ = configs_from_args(parser.parse_args([*common, "--sam-precision", "bfloat16"]), "coco20i")
    assert (plain.sam.precision, bf16.sam.precision, bf16.backbone.precision) == ("float32", "bfloat16", "float32")
    assert bf16.sam.store == plain.sam.store + "-bfloat16" and bf16.backbone.store == plain.backbone.store
    assert "--precision bfloat16" in extraction_command(bf16, "sam")
    assert "--precision" not in extraction_command(plain, "sam")
    assert bf16.default_run_name() != plain.default_run_name()
