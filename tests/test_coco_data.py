"""The COCO data layer on the real coco_mini images + instances (../shared/data/coco_mini)."""

import json
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.data import IGNORE_INDEX, CocoInstances, MaskCache, load_rgb
from pipeline.data.folds import COCO_CLASS_NAMES
from pipeline.data.splits import map_coco20i_list, read_coco20i_list
from pipeline.episodes.training import training_pairs, training_target
from pipeline.errors import DataError
from pipeline.report import SkipReport

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def coco(coco_mini_dir):
    return CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images")


def test_all_80_classes_load_with_images(coco):
    assert coco.num_classes == 80
    assert tuple(coco.class_names) == COCO_CLASS_NAMES
    assert len(coco.image_ids()) == 543
    for class_id in range(80):
        images = coco.images_of_class(class_id)
        assert len(images) >= 2, COCO_CLASS_NAMES[class_id]
        mask = coco.class_mask(images[0], class_id)
        info = coco.image_info(images[0])
        assert mask.shape == (info["height"], info["width"])
        assert (mask == 1).any()
        assert set(np.unique(mask)) <= {0, 1, IGNORE_INDEX}


def test_loading_prints_nothing_even_where_print_is_patched(coco_mini_dir, monkeypatch):
    """Ray Train workers replace ``print`` by a logger call, so a redirected stdout does not silence
    pycocotools' "creating index..." there: the index is built without it, and is pycocotools' own."""
    import builtins

    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    quiet = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    monkeypatch.undo()
    assert printed == []
    from pycocotools.coco import COCO

    reference = COCO()
    reference.dataset = quiet.coco.dataset
    reference.createIndex()
    for name in ("anns", "imgs", "cats", "imgToAnns", "catToImgs"):
        assert getattr(quiet.coco, name) == getattr(reference, name), name


def test_image_decodes_at_annotated_size(coco):
    image_id = coco.image_ids()[0]
    image = coco.load_image(image_id)
    info = coco.image_info(image_id)
    assert image.shape == (info["height"], info["width"], 3) and image.dtype == np.uint8


def test_instance_areas_match_json(coco):
    # The json area is the polygon's area, the decoded one a pixel count: equal up to rasterisation.
    decoded = np.array([float(mask_utils.area(coco.coco.annToRLE(a))) for a in coco.coco.anns.values()])
    annotated = np.array([a["area"] for a in coco.coco.anns.values()])
    relative = np.abs(decoded - annotated) / np.maximum(annotated, 1)
    assert len(decoded) == 4624
    assert np.median(relative) < 0.01
    assert (np.abs(decoded - annotated) > np.maximum(20, 0.1 * annotated)).mean() < 0.01


def test_crowd_regions_are_ignore(coco):
    crowd = [a for a in coco.coco.anns.values() if a["iscrowd"]]
    assert crowd, "coco_mini has crowd RLEs"
    annotation = crowd[0]
    class_id = coco.category_ids.index(annotation["category_id"])
    mask = coco.class_mask(annotation["image_id"], class_id)
    crowd_pixels = coco.coco.annToMask(annotation).astype(bool)
    assert (mask[crowd_pixels] != 0).all()  # crowd is ignore (or covered by a non-crowd instance)
    assert (mask[crowd_pixels] == IGNORE_INDEX).any()


def test_crowd_regions_are_background_in_hsnet_masks(coco, coco_mini_dir, tmp_path):
    """crowd="background": HSNet's COCO-20i masks (the class label or 0, nothing ignored)."""
    hsnet = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", crowd="background")
    crowd = [a for a in coco.coco.anns.values() if a["iscrowd"]]
    changed = 0
    for annotation in crowd:
        class_id = coco.category_ids.index(annotation["category_id"])
        ignore, background = (source.class_mask(annotation["image_id"], class_id) for source in (coco, hsnet))
        assert set(np.unique(background)) <= {0, 1}
        assert np.array_equal(background, np.where(ignore == IGNORE_INDEX, 0, ignore))  # only crowd pixels differ
        changed += int((ignore == IGNORE_INDEX).sum())
    assert changed > 0
    # Cached masks are keyed by the crowd rule: one cache folder never serves the other's masks.
    assert MaskCache(coco, tmp_path).directory != MaskCache(hsnet, tmp_path).directory
    with pytest.raises(Exception, match="crowd must be one of"):
        CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", crowd="foreground")


def test_unknown_images_and_categories_are_counted_and_strict_raises(coco_mini_dir, tmp_path, capsys):
    data = json.loads((coco_mini_dir / "instances.json").read_text())
    data["annotations"][0]["category_id"] = 999
    data["annotations"][1]["image_id"] = -5
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    source = CocoInstances(broken, coco_mini_dir / "images")
    assert source.report.counts["annotation references an unknown category id"] == 1
    assert source.report.counts["annotation references an unknown image id"] == 1
    assert "skipped 2 item(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown category"):
        CocoInstances(broken, coco_mini_dir / "images", strict=True)


def test_bad_files_name_the_file(coco_mini_dir, tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        CocoInstances(tmp_path / "nope.json", coco_mini_dir / "images")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        CocoInstances(tmp_path / "bad.json", coco_mini_dir / "images")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((coco_mini_dir / "images" / "000000000009.jpg").read_bytes()[:2000])
    with pytest.raises(DataError, match="corrupt.jpg"):
        load_rgb(corrupt)
    with pytest.raises(DataError, match="image file not found"):
        load_rgb(tmp_path / "missing.jpg")


def test_unknown_image_id_and_class_are_clear_errors(coco):
    with pytest.raises(DataError, match="image id 123 is not in"):
        coco.class_mask(123, 0)
    with pytest.raises(DataError, match="class id 80 out of range"):
        coco.class_mask(coco.image_ids()[0], 80)


def test_mask_cache_renders_once_and_reloads_from_disk(coco, tmp_path):
    image_id = coco.images_of_class(0)[0]
    cache = MaskCache(coco, cache_dir=tmp_path)
    first = cache.get(image_id, 0)
    assert cache.get(image_id, 0) is first and cache.hits == 1
    assert not first.flags.writeable
    files = list(cache.directory.glob("*.png"))
    assert len(files) == 1
    fresh = MaskCache(coco, cache_dir=tmp_path)
    assert np.array_equal(fresh.get(str(image_id), 0), coco.class_mask(image_id, 0))
    assert len(list(cache.directory.glob("*.png"))) == 1


def test_hsnet_lists_map_onto_coco_mini_via_image_ids(coco, coco20i_lists_dir):
    report = SkipReport("lists")
    pairs = map_coco20i_list(read_coco20i_list(coco20i_lists_dir, "val", 0), coco, report)
    mapped = sum(len(v) for v in pairs.values())
    assert mapped > 300  # 334 val2014 images in coco_mini, several classes each
    assert report.counts["list entry's image not in the dataset"] + mapped == 35783
    for class_id, images in pairs.items():
        for image_id in images[:3]:
            assert (coco.class_mask(image_id, class_id) == 1).any()


@pytest.mark.parametrize("fold", [0, 1, 2, 3])
@pytest.mark.parametrize("policy", ["background", "drop"])
def test_training_targets_never_mark_novel_pixels(coco, coco20i_lists_dir, fold, policy):
    from pipeline.data.folds import novel_classes

    report = SkipReport("train")
    pairs = training_pairs(
        map_coco20i_list(read_coco20i_list(coco20i_lists_dir, "trn", fold), coco), coco, "coco20i", fold, policy, report
    )
    masks = MaskCache(coco)
    novel = novel_classes("coco20i", fold)
    checked_overlap = 0
    for class_id, images in pairs.items():
        assert class_id not in novel
        for image_id in images:
            target = training_target(masks, image_id, class_id, "coco20i", fold)
            novel_present = [c for c in coco.classes_in_image(image_id) if c in novel]
            if policy == "drop":
                assert not novel_present
            for novel_id in novel_present:
                novel_only = (coco.class_mask(image_id, novel_id) == 1) & (coco.class_mask(image_id, class_id) != 1)
                assert not (target[novel_only] == 1).any()
                checked_overlap += int(novel_only.any())
    if policy == "background":
        assert checked_overlap > 0  # training images with novel objects exist and were checked
    else:
        assert report.counts["image contains a novel class (policy 'drop')"] > 0
    with pytest.raises(DataError, match="never a training target"):
        training_target(masks, coco.images_of_class(novel[0])[0], novel[0], "coco20i", fold)


def test_missing_image_file_is_clear(coco_mini_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(coco_mini_dir / "images" / "000000000009.jpg", images)
    source = CocoInstances(coco_mini_dir / "instances.json", images)
    source.load_image(9)
    with pytest.raises(DataError, match="000000000025.jpg"):
        source.load_image(25)
