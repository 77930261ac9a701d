"""Episodes as data: HSNet-identical draws, seeded manifests, rank shares, reference annotations."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data import CocoInstances, pairs_by_pixel_rule
from pipeline.data.folds import novel_classes
from pipeline.data.splits import coco_image_id, map_coco20i_list, read_coco20i_list
from pipeline.episodes import (
    build_episode_manifest,
    hsnet_pascal_test_episodes,
    hsnet_test_episodes,
    manifest_from_hsnet,
    read_manifest,
    reference_annotation,
    write_manifest,
)
from pipeline.errors import ConfigError, DataError
from pipeline.report import SkipReport


@pytest.mark.real_data
def test_hsnet_fold0_first_episode(coco20i_lists_dir):
    episodes = hsnet_test_episodes(coco20i_lists_dir, fold=0, n=1000, shot=1, seed=0)
    assert len(episodes) == 1000
    first = episodes[0]
    assert first.class_id == 72  # refrigerator
    assert first.query == "val2014/COCO_val2014_000000507081.jpg"
    assert first.supports == ("val2014/COCO_val2014_000000486122.jpg",)


@pytest.mark.real_data
@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_hsnet_episodes_are_valid_and_do_not_touch_global_state(coco20i_lists_dir, fold):
    lists = read_coco20i_list(coco20i_lists_dir, "val", fold)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    five = hsnet_test_episodes(coco20i_lists_dir, fold=fold, n=200, shot=5)
    assert np.array_equal(np.random.get_state()[1], before)
    one = hsnet_test_episodes(coco20i_lists_dir, fold=fold, n=200, shot=1)
    assert [e.class_id for e in five[:1]] == [e.class_id for e in one[:1]]  # same first draws
    for episode in five:
        assert episode.class_id in novel_classes("coco20i", fold)
        assert episode.query in lists[episode.class_id]
        assert len(episode.supports) == 5 and episode.query not in episode.supports
        assert all(s in lists[episode.class_id] for s in episode.supports)


def _reference_hsnet(lists, fold, n, shot):
    """HSNet's own loop, on the legacy global state, for comparison."""
    np.random.seed(0)
    out = []
    classes = [fold + 4 * v for v in range(20)]
    for _ in range(n):
        class_sample = np.random.choice(classes, 1, replace=False)[0]
        query = np.random.choice(lists[class_sample], 1, replace=False)[0]
        supports = []
        while True:
            support = np.random.choice(lists[class_sample], 1, replace=False)[0]
            if query != support:
                supports.append(support)
            if len(supports) == shot:
                break
        out.append((int(class_sample), str(query), tuple(str(s) for s in supports)))
    return out


@pytest.mark.real_data
def test_hsnet_matches_the_reference_loop_on_the_global_state(coco20i_lists_dir):
    lists = read_coco20i_list(coco20i_lists_dir, "val", 2)
    ours = [(e.class_id, e.query, e.supports) for e in hsnet_test_episodes(coco20i_lists_dir, 2, n=300, shot=5)]
    assert ours == _reference_hsnet(lists, 2, 300, 5)


@pytest.mark.real_data
def test_hsnet_pascal_queries_follow_file_order(pascal5i_lists_dir):
    from pipeline.data.splits import read_pascal5i_list

    entries = read_pascal5i_list(pascal5i_lists_dir, "val", 0)
    episodes = hsnet_pascal_test_episodes(pascal5i_lists_dir, fold=0, n=1000, shot=1)
    assert len(episodes) == 1000
    for index, episode in enumerate(episodes):
        name, class_id = entries[index % len(entries)]
        assert (episode.query, episode.class_id) == (name, class_id)
        assert episode.supports[0] != episode.query
    assert {e.class_id for e in episodes} == {0, 1, 2, 3, 4}


def test_hsnet_refuses_classes_too_small_to_sample(tmp_path):
    (tmp_path / "val").mkdir()
    lists = {str(c): [f"val2014/COCO_val2014_{c:012d}.jpg", f"val2014/COCO_val2014_{c + 1000:012d}.jpg"]
             for c in range(0, 80, 4)}
    lists["8"] = lists["8"][:1]
    (tmp_path / "val" / "fold0.json").write_text(__import__("json").dumps(lists))
    with pytest.raises(DataError, match=r"classes \[8\]"):
        hsnet_test_episodes(tmp_path, fold=0)


@pytest.fixture(scope="module")
def coco(coco_mini_dir):
    return CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images")


@pytest.mark.real_data
@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_coco_mini_test_manifest_is_reproducible_and_splits_by_rank(coco, coco20i_lists_dir, fold, tmp_path):
    def build():
        report = SkipReport("episodes")
        pairs = map_coco20i_list(read_coco20i_list(coco20i_lists_dir, "val", fold), coco, report)
        pairs = {c: pairs.get(c, []) for c in novel_classes("coco20i", fold)}
        return build_episode_manifest(pairs, dataset="coco", fold=fold, split="test", n_episodes=1000,
                                      shot=1, seed=321, report=report), report

    first, report = build()
    second, _ = build()
    assert first.num_rows == 1000
    assert first.equals(second)
    # classes of coco_mini with < 2 listed images are reported and skipped, not looped on
    skipped = report.counts.get("class has fewer than shot+1=2 images", 0)
    assert len(set(first.column("class_id").to_pylist())) == 20 - skipped
    path = write_manifest(first, tmp_path / "m.parquet")
    whole = read_manifest(path)
    assert whole.equals(first)
    shares = [read_manifest(path, rank=r, world_size=2) for r in range(2)]
    ids = [set(s.column("episode_id").to_pylist()) for s in shares]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range(1000))
    assert abs(shares[0].num_rows - shares[1].num_rows) <= 1
    merged = pa.concat_tables(shares).sort_by("episode_id")
    assert merged.equals(first)
    for row in first.slice(0, 50).to_pylist():
        assert row["query_id"] not in row["support_ids"]
        assert (coco.class_mask(row["query_id"], row["class_id"]) == 1).any()


@pytest.mark.real_data
def test_pixel_rule_fallback_and_k_shot_skips(coco):
    classes = novel_classes("coco20i", 0)
    pairs = pairs_by_pixel_rule(coco, classes)
    for class_id, images in pairs.items():
        for image_id in images:
            assert (coco.class_mask(image_id, class_id) == 1).sum() >= 2048
    report = SkipReport("5-shot")
    table = build_episode_manifest(pairs, dataset="coco", fold=0, split="test", n_episodes=100, shot=5,
                                   seed=1, report=report)
    small = [c for c, images in pairs.items() if len(images) < 6]
    assert report.counts["class has fewer than shot+1=6 images"] == len(small) > 0
    assert not set(table.column("class_id").to_pylist()) & set(small)
    for supports in table.column("support_ids").to_pylist():
        assert len(set(supports)) == 5


def test_manifest_bad_arguments():
    with pytest.raises(ConfigError):
        build_episode_manifest({0: ["a", "b"]}, dataset="x", fold=0, split="test", n_episodes=5, shot=0)
    with pytest.raises(ConfigError):
        build_episode_manifest({0: ["a", "b"]}, dataset="x", fold=0, split="test", n_episodes=5,
                               annotation_type="polygon")
    with pytest.raises(DataError, match="no class has at least"):
        build_episode_manifest({0: ["a"]}, dataset="x", fold=0, split="test", n_episodes=5)
    with pytest.raises(ConfigError):
        read_manifest("whatever.parquet", rank=2, world_size=2)
    with pytest.raises(DataError, match="not found"):
        read_manifest("does-not-exist.parquet")


def test_manifest_from_hsnet_maps_names_to_ids():
    from pipeline.episodes.hsnet import HsnetEpisode

    episodes = [HsnetEpisode(72, "val2014/COCO_val2014_000000507081.jpg", ("val2014/COCO_val2014_000000486122.jpg",))]
    table = manifest_from_hsnet(episodes, dataset="coco20i", fold=0, shot=1, image_id_of=lambda n: coco_image_id(n))
    row = table.to_pylist()[0]
    assert row["query_id"] == "507081" and row["support_ids"] == ["486122"] and row["sampler"] == "hsnet"


def _blob():
    mask = np.zeros((120, 160), np.uint8)
    mask[30:90, 40:120] = 1
    mask[30:40, 40:60] = 255
    return mask


@pytest.mark.parametrize("kind", ["mask", "box", "scribble", "points"])
def test_reference_annotations_are_deterministic_and_inside(kind):
    from refseg_models.annotations import authors_frame

    mask = _blob()
    a = reference_annotation(mask, kind, seed=7)
    b = reference_annotation(mask, kind, seed=7)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    assert a.any()
    # points and scribbles are drawn in the authors' 512 x 512 frame, masks and boxes at the image's size
    inside = authors_frame(mask == 1) if kind in ("scribble", "points") else mask == 1
    assert a.shape == inside.shape
    if kind in ("mask", "scribble", "points"):
        assert not (a & ~inside).any()
    if kind == "box":
        assert a[(mask == 1)].all() and a.sum() == 60 * 80
    if kind == "scribble":
        assert a.sum() < inside.sum()
        c = reference_annotation(mask, kind, seed=8)
        assert not np.array_equal(a, c)


def test_points_count_and_errors():
    from refseg_models.annotations import authors_frame

    mask = _blob()
    # the authors' encoding: single object pixels, min(20, area) at test, 1..20 in training
    points = reference_annotation(mask, "points", seed=3)
    assert points.sum() == 20 and not (points & ~authors_frame(mask == 1)).any()
    counts = {int(reference_annotation(mask, "points", seed=s, training=True).sum()) for s in range(40)}
    assert min(counts) >= 1 and max(counts) <= 20 and len(counts) > 5
    discs = reference_annotation(mask, "points", seed=3, point_style="disc")
    from scipy import ndimage

    assert discs.sum() > 20 and 1 <= ndimage.label(discs)[1] <= 20
    with pytest.raises(DataError, match="no foreground"):
        reference_annotation(np.full((10, 10), 255, np.uint8), "mask", seed=0)
    with pytest.raises(DataError, match="unknown annotation type"):
        reference_annotation(mask, "polygon", seed=0)
