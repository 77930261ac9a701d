"""Shard plan, feature-set key and mismatch messages (pure Python, no Ray)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.store import FeatureSetKey, StoreMismatchError, check_key, images_per_shard_for, plan_shards, sorted_items
from pipeline.store.layout import bytes_per_sample, image_list_sha256, sample_key

KEY = FeatureSetKey("coco_mini", "mobilenet_v2", "a" * 64, "vrp512_squash_tf128", "float16")


def test_sorted_items_is_numeric_for_numeric_ids_and_rejects_duplicates():
    items = sorted_items([("100", "c.jpg"), (9, "a.jpg"), ("25", "b.jpg"), ("img_x", "d.jpg")])
    assert [item.image_id for item in items] == ["9", "25", "100", "img_x"]
    with pytest.raises(ConfigError, match="'9' appears more than once"):
        sorted_items([("9", "a.jpg"), (9, "b.jpg")])


def test_plan_is_a_function_of_the_sorted_ids():
    items = sorted_items([(i, f"{i}.jpg") for i in range(10)])
    shuffled = sorted_items([(i, f"{i}.jpg") for i in (3, 7, 0, 9, 1, 2, 8, 4, 6, 5)])
    plan = plan_shards(items, 4)
    assert [len(spec.items) for spec in plan] == [4, 4, 2]
    assert plan == plan_shards(shuffled, 4)
    assert image_list_sha256(items) == image_list_sha256(shuffled)
    assert image_list_sha256(items) != image_list_sha256(items[:-1])
    assert plan[2].name == "shard-000002.tar" and plan[2].stats_name == "shard-000002_stats.json"
    assert "." not in sample_key(2, 1)


def test_images_per_shard_hits_the_target_size():
    # VRP-SAM ResNet-50 taps at 512: 64x64 maps of 512+1024+2048 channels, fp16 -> ~29 MiB per image.
    shapes = {"layer2": (512, 64, 64), "layer3": (1024, 64, 64), "layer4": (2048, 64, 64)}
    per_image = bytes_per_sample(shapes, 2)
    assert 2 * 3584 * 4096 < per_image < 2 * 3584 * 4096 + 8192
    n = images_per_shard_for(shapes, 2, 768 * 1024**2)
    assert 0.5e9 < n * per_image <= 768 * 1024**2
    assert images_per_shard_for(shapes, 2, 10) == 1  # never zero
    with pytest.raises(ConfigError):
        images_per_shard_for(shapes, 2, 0)


def test_key_mismatch_names_every_differing_field():
    other = FeatureSetKey("coco_mini", "mobilenet_v2", "b" * 64, "vrp512_squash_tf128", "float32")
    check_key(KEY, KEY, "somewhere")
    with pytest.raises(StoreMismatchError) as error:
        check_key(KEY, other, "stores/x")
    message = str(error.value)
    assert "weights_sha256" in message and "dtype" in message and "'float32'" in message
    assert "encoder_id" not in message and "stores/x" in message


def test_key_validation():
    with pytest.raises(ConfigError, match="dtype"):
        FeatureSetKey("d", "e", "w", "p", "bfloat16")
    with pytest.raises(ConfigError, match="dataset"):
        FeatureSetKey("", "e", "w", "p")
    assert FeatureSetKey.from_dict(KEY.to_dict()) == KEY
