"""Cached augmented views for SegIC: seeded plans, exact rendering, feature flips/warps; and the bench
harness that measures them (bench/view_serving.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from environment import import_or_missing
from pipeline.errors import DataError
from pipeline.training.views import (
    AugmentationConfig,
    apply_view,
    apply_view_to_instances,
    apply_view_to_mask,
    base_view,
    flip_features,
    nearest_view,
    parse_view_id,
    plan_views,
    read_plan,
    render_view_items,
    segic_instance_config,
    segic_semantic_config,
    view_id,
    warp_features,
    write_plan,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from view_serving import encode_views, evaluate_view_serving, flip_equivariance, sample_view_episodes  # noqa: E402
from pipeline.data.images import load_rgb

SIZES = {"139": (426, 640), "285": (640, 586), "632": (483, 640)}
CONFIGS = {
    "lsj": segic_semantic_config(canvas=96),
    "rrc": replace(segic_instance_config(canvas=96), jitter_prob=0.5, flip_prob=0.5),
}


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_plan_is_seeded_nested_and_independent_of_other_images(mode):
    config = CONFIGS[mode]
    plan = plan_views(SIZES, 8, seed=7, config=config)
    assert plan == plan_views(SIZES, 8, seed=7, config=config)
    assert plan != plan_views(SIZES, 8, seed=8, config=config)
    # the first V views of a larger plan are the V-view plan; other images do not matter
    small = plan_views({"285": SIZES["285"]}, 3, seed=7, config=config)
    assert small == [view for view in plan if view.image_id == "285"][:3]
    assert [(v.image_id, v.view) for v in plan] == [(i, k) for i in sorted(SIZES) for k in range(8)]
    flips = [view.flip for view in plan_views({str(i): (50, 60) for i in range(40)}, 4, 0, config)]
    assert 0.3 < np.mean(flips) < 0.7  # the flip probability is used
    if mode == "lsj":
        assert all(config.scale_range[0] <= v.scale <= config.scale_range[1] for v in plan)
        assert all((v.crop_w, v.crop_h) == (v.width, v.height) for v in plan)
    else:
        areas = [v.crop_w * v.crop_h / (v.width * v.height) for v in plan]
        assert min(areas) >= 0.29 and max(areas) <= 1.0
        assert any(v.has_colour_jitter for v in plan)


def test_plan_round_trips_through_parquet_and_json(tmp_path):
    plan = plan_views(SIZES, 4, seed=1, config=CONFIGS["rrc"])
    assert read_plan(write_plan(plan, tmp_path / "plan.parquet")) == plan
    assert read_plan(write_plan(plan, tmp_path / "plan.json")) == plan
    rows = json.loads((tmp_path / "plan.json").read_text())
    rows[2]["crop_w"] = 10_000
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad.json.*row 2.*not inside"):
        read_plan(tmp_path / "bad.json")
    del rows[0]["flip"]
    (tmp_path / "bad2.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad2.json: row 0 lacks \['flip'\]"):
        read_plan(tmp_path / "bad2.json")


def test_view_ids_are_valid_store_keys():
    for view in plan_views(SIZES, 3, seed=0, config=CONFIGS["lsj"]):
        key = view.view_id
        assert "." not in key and "/" not in key and key == f"{view.image_id}_v{view.view}"
        assert parse_view_id(key) == (view.image_id, view.view)
    with pytest.raises(DataError, match="no dots"):
        view_id("a.b", 0)
    with pytest.raises(DataError, match="not a view id"):
        parse_view_id("139")


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_image_and_masks_get_the_same_geometry(mode):
    """An image whose pixels encode their own coordinates, rendered through the mask path, lands where
    the view's affine map (the one the feature warp uses) says."""
    height, width = 120, 200
    xs = np.tile(np.arange(width, dtype=np.int64), (height, 1))
    ys = np.tile(np.arange(height, dtype=np.int64)[:, None], (1, width))
    for view in plan_views({"1": (height, width)}, 8, seed=3, config=CONFIGS[mode]):
        rx = apply_view_to_mask((xs % 250).astype(np.uint8), view, fill=255)
        ry = apply_view_to_mask(ys.astype(np.uint8), view, fill=255)
        inside = rx != 255
        canvas = view.canvas
        cy, cx = torch.meshgrid(torch.arange(canvas) + 0.5, torch.arange(canvas) + 0.5, indexing="ij")
        ox, oy = view.from_canvas(cx.double(), cy.double())
        expected_inside = (ox >= 0) & (ox < width) & (oy >= 0) & (oy < height)
        assert (torch.from_numpy(inside) == expected_inside).float().mean() > 0.99
        both = inside & expected_inside.numpy()
        dx = np.abs(np.floor(ox.numpy())[both] - rx[both])
        dy = np.abs(np.floor(oy.numpy())[both] - ry[both])
        assert dx.max() <= 1 and dy.max() <= 1  # PIL rounds pixel centres on exact boundaries
        assert (dx == 0).mean() > 0.9 and (dy == 0).mean() > 0.9
        # the RGB path: a white box in a black image lands where its mask lands
        image = np.zeros((height, width, 3), np.uint8)
        box = np.zeros((height, width), bool)
        box[30:90, 50:150] = True
        image[box] = 255
        plain = replace(view, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
        rendered, mask = apply_view(image, plain)[..., 0] > 127, apply_view_to_mask(box, plain)
        assert mask.dtype == bool and rendered.shape == mask.shape == (canvas, canvas)
        if mask.sum() > 20:
            assert (rendered ^ mask).sum() <= 0.15 * mask.sum() + 4 * canvas / 10


def test_flip_and_colour_commute_so_feature_flip_is_a_pixel_flip(coco_mini_dir):
    image = load_rgb(coco_mini_dir / "images" / sorted((coco_mini_dir / "images").iterdir())[0].name)
    config = replace(segic_instance_config(canvas=128), jitter_prob=1.0, flip_prob=0.0)
    view = plan_views({"1": image.shape[:2]}, 1, seed=0, config=config)[0]
    assert view.has_colour_jitter and not view.flip
    np.testing.assert_array_equal(apply_view(image, replace(view, flip=True)), apply_view(image, view)[:, ::-1])
    assert not np.array_equal(apply_view(image, view), apply_view(image, replace(view, brightness=1.0, contrast=1.0,
                                                                                  saturation=1.0, hue=0.0)))


def test_instances_follow_the_view(coco_mini_dir):
    from pipeline.data import CocoInstances

    source = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    image_id = source.image_ids()[0]
    info = source.image_info(image_id)
    view = plan_views({str(image_id): (info["height"], info["width"])}, 1, 0, AugmentationConfig("rrc", canvas=64))[0]
    rendered = apply_view_to_instances(source.instance_masks(image_id), view)
    assert rendered and all(mask.shape == (64, 64) and mask.dtype == bool for _, mask in rendered)
    union = np.zeros((info["height"], info["width"]), bool)
    for _, mask in source.instance_masks(image_id):
        union |= mask
    assert np.array_equal(np.logical_or.reduce([m for _, m in rendered]), apply_view_to_mask(union, view))


def test_feature_flip_equals_torch_flip_and_the_warp():
    features = {"layer4": torch.randn(5, 8, 8), "layer2": torch.randn(3, 32, 32)}
    flipped = flip_features(features)
    for name, value in features.items():
        assert torch.equal(flipped[name], torch.flip(value, dims=(-1,)))
    # the warp between two views differing only in their flip is exactly the feature flip
    view = plan_views({"1": (300, 400)}, 1, seed=0, config=AugmentationConfig("rrc", canvas=512, flip_prob=0.0))[0]
    warped, valid = warp_features(features, view, replace(view, flip=True))
    for name in features:
        assert valid[name].all()
        torch.testing.assert_close(warped[name], flipped[name], rtol=0, atol=1e-5)
    # the identity warp is the identity
    same, _ = warp_features(features, view, view)
    torch.testing.assert_close(same["layer2"], features["layer2"], rtol=0, atol=1e-5)
    # content outside the cached view is zero and flagged invalid
    left_half = replace(view, crop_w=view.crop_w // 2)
    out, valid = warp_features(features, left_half, view)
    assert valid["layer4"][:, :3].all() and not valid["layer4"][:, 5:].any()
    assert out["layer4"][:, ~valid["layer4"]].abs().max() == 0 and out["layer4"][:, valid["layer4"]].abs().min() > 0
    # a view scaled down on the canvas still holds everything: all valid
    assert warp_features(features, replace(view, resize_w=256, resize_h=256), view)[1]["layer4"].all()


def test_nearest_view_prefers_coverage_at_a_similar_scale():
    base = base_view("1", 400, 400, 512)
    plan = plan_views({"1": (400, 400)}, 8, seed=2, config=AugmentationConfig("rrc", canvas=512))
    query = plan[5]
    assert nearest_view(query, [base, *plan]) == query
    with pytest.raises(DataError, match="no cached view"):
        nearest_view(query, [])


@pytest.fixture(scope="module")
def mobilenet(mobilenet_v2_weights):
    from refseg_models.encoders import build_encoder

    return build_encoder("mobilenet_v2", mobilenet_v2_weights)


def test_render_items_feed_the_store_keys(tmp_path, coco_mini_dir):
    from pipeline.data import CocoInstances

    source = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    ids = [str(i) for i in source.image_ids()[:2]]
    plan = plan_views({i: (source.image_info(i)["height"], source.image_info(i)["width"]) for i in ids}, 2, 0,
                      segic_semantic_config(canvas=64))
    items = render_view_items(plan, lambda i: source.load_image(source.key(i)), tmp_path)
    assert [key for key, _ in items] == [view.view_id for view in plan]
    for (key, path), view in zip(items, plan):
        # lossless: what the stage decodes is exactly the view
        np.testing.assert_array_equal(load_rgb(path), apply_view(source.load_image(source.key(view.image_id)), view))


def test_measurement_on_real_images(coco_mini_dir, mobilenet):
    from pipeline.data import CocoInstances
    from refseg_models.build import build_model

    torch.set_num_threads(2)
    source = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    ids = [str(i) for i in source.image_ids()[:3]]
    images = [source.load_image(source.key(i)) for i in ids[:2]]
    # (a) flip equivariance: near, not exactly, equivariant (TF padding, learned filters)
    flip = flip_equivariance(encode_views(mobilenet, images),
                             encode_views(mobilenet, [np.ascontiguousarray(i[:, ::-1]) for i in images]))
    assert set(flip) == {"layer2", "layer3", "layer4"}
    for values in flip.values():
        assert 0.0 < values["rel_l2"] < 1.0 and 0.5 < values["cosine"] < 1.0
    # (b) episodes with a fresh augmented query view; cached views computed online here
    config = segic_semantic_config(canvas=512)
    episodes = sample_view_episodes(source, ids, 2, seed=0, config=config)
    assert len(episodes) == 2 and episodes == sample_view_episodes(source, ids, 2, seed=0, config=config)
    sizes = {i: (source.image_info(i)["height"], source.image_info(i)["width"]) for i in ids}
    plan = plan_views(sizes, 1, seed=0, config=config)
    computed: dict = {}

    def cached(view):
        key = (view.image_id, view.view)
        if key not in computed:
            computed[key] = encode_views(mobilenet, [apply_view(source.load_image(source.key(view.image_id)), view)])[0]
        return computed[key]

    models = {layer: build_model("prototype_matching", feature=layer) for layer in ("layer3", "layer4")}
    result = evaluate_view_serving(source, episodes, plan, mobilenet, cached, models, num_views=(1,))
    per_episode = result.pop("per_episode")
    assert [e["episode"] for e in per_episode] == [e.episode for e in episodes]
    assert all(e["iou"]["recompute"]["layer4"] >= 0 and e["zoom"] > 0 for e in per_episode)
    assert set(result) == {"recompute", "feature_flip", "original_warp", "cached_v1_warp"}
    assert result["recompute"]["rel_l2"] == {"layer2": 0.0, "layer3": 0.0, "layer4": 0.0}
    assert result["recompute"]["coverage"] == 1.0 and result["recompute"]["delta_iou"]["layer4"] == [0.0, 0.0]
    for values in result.values():
        assert values["episodes"] == 2 and set(values["miou"]) == {"layer3", "layer4"}
        assert all(0.0 <= miou <= 100.0 for miou in values["miou"].values())
    assert result["recompute"]["miou"]["layer4"] > 0.0
    assert 0.0 < result["feature_flip"]["rel_l2"]["layer4"] < 1.0 and result["feature_flip"]["coverage"] == 1.0
    assert result["original_warp"]["rel_l2"]["layer4"] > 0.0 and 0.0 < result["original_warp"]["coverage"] <= 1.0
    # by hand, the recompute and feature-flip arms: prototype matching on the exact query view's
    # features (flipped: the toggled view's, flipped back), HSNet's summed per-class IoU
    from pipeline.training.views import base_view
    from refseg_models.modeling.inputs import EpisodeFeatures

    for arm in ("recompute", "feature_flip"):
        for layer, model in models.items():
            inter, union, per_episode_iou = {}, {}, []
            for episode in episodes:
                view = episode.query_view if arm == "recompute" else replace(episode.query_view, flip=not episode.query_view.flip)
                query = encode_views(mobilenet, [apply_view(source.load_image(source.key(episode.query_id)), view)])[0]
                if arm == "feature_flip":
                    query = flip_features(query)
                info = source.image_info(episode.reference_id)
                reference = cached(base_view(episode.reference_id, int(info["height"]), int(info["width"]), 512))
                features = EpisodeFeatures(
                    reference_masks=torch.from_numpy((source.class_mask(episode.reference_id, episode.class_id) == 1)
                                                     .astype(np.float32))[None, None],
                    target_backbone={k: v[None] for k, v in query.items()},
                    reference_backbone={k: v[None, None] for k, v in reference.items()},
                )
                with torch.no_grad():
                    logits = model.mask_logits(model(features))
                logits = torch.nn.functional.interpolate(logits, (512, 512), mode="bilinear", align_corners=False)
                prediction = (logits[0, 0] > 0).numpy()
                gt = apply_view_to_mask(source.class_mask(episode.query_id, episode.class_id), episode.query_view, fill=255)
                valid, foreground = gt != 255, gt == 1
                i = int((prediction & foreground & valid).sum())
                u = int(((prediction | foreground) & valid).sum())
                inter[episode.class_id] = inter.get(episode.class_id, 0) + i
                union[episode.class_id] = union.get(episode.class_id, 0) + u
                per_episode_iou.append(i / u if u else 0.0)
            by_hand = 100.0 * float(np.mean([inter[c] / max(union[c], 1) for c in sorted(inter)]))
            assert result[arm]["miou"][layer] == pytest.approx(by_hand, abs=1e-6), (arm, layer)
            assert [e["iou"][arm][layer] for e in per_episode] == pytest.approx(per_episode_iou, abs=1e-9), (arm, layer)


@pytest.mark.real_data
@pytest.mark.real_weights
def test_unchanged_extraction_stage_caches_the_views(tmp_path, coco_mini_dir, mobilenet_v2_weights, mobilenet, monkeypatch):
    ray = import_or_missing("ray")
    from pipeline.data import CocoInstances
    from pipeline.extraction import RegistryEncoder, extract_store
    from pipeline.store import open_store

    monkeypatch.setenv("REFSEG_CODE_VERSION", "refseg-test")
    source = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    ids = [str(i) for i in source.image_ids()[:2]]
    plan = plan_views({i: (source.image_info(i)["height"], source.image_info(i)["width"]) for i in ids}, 2, 0,
                      segic_semantic_config(canvas=512))
    items = render_view_items(plan, lambda i: source.load_image(source.key(i)), tmp_path / "views")
    items += [(i, str(source.image_path(i))) for i in ids]  # the plain images share the store
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = extract_store(items, str(tmp_path / "store"), RegistryEncoder("mobilenet_v2", str(mobilenet_v2_weights)),
                                "coco_mini_views", batch_size=4, progress=False)
    finally:
        ray.shutdown()
    assert (summary.written, summary.failed) == (6, 0)
    store = open_store(str(tmp_path / "store"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the encoder actor's thread count: same kernels, same bits
    try:
        for view in plan[:2]:
            expected = encode_views(mobilenet, [apply_view(source.load_image(source.key(view.image_id)), view)])[0]
            stored = store.get(view.view_id)
            for name, value in expected.items():
                np.testing.assert_array_equal(stored[name], value.to(torch.float16).numpy())
        plain = store.get(ids[0])
        expected = encode_views(mobilenet, [source.load_image(source.key(ids[0]))])[0]
        np.testing.assert_array_equal(plain["layer4"], expected["layer4"].to(torch.float16).numpy())
    finally:
        torch.set_num_threads(threads)


def test_base_view_matches_the_plain_store_preprocessing():
    from refseg_models.encoders.transforms import squash_resize
    from segment_anything.utils.transforms import ResizeLongestSide

    image = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_view(image, base_view("1", 90, 140, 64)), squash_resize(image, 64))
    letterbox = apply_view(image, base_view("1", 90, 140, 64, keep_aspect=True))
    resized = ResizeLongestSide(64).apply_image(image)
    assert letterbox.shape == (64, 64, 3) and resized.shape == (41, 64, 3)
    assert (letterbox[41:] == 0).all()
    assert np.abs(letterbox[:41].astype(int) - resized.astype(int)).max() <= 1  # PIL vs torchvision resize
