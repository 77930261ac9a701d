"""PASCAL VOC+SBD, ADE20k, FSS-1000 and LVIS readers on small datasets the tests write."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import IGNORE_INDEX, Ade20k, Fss1000, LvisInstances, PascalVocAug
from pipeline.errors import DataError


def _write_image(path, shape=(24, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), 90, np.uint8)).save(path)


def _write_labels(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def test_pascal_voc_aug(tmp_path):
    labels = np.zeros((24, 32), np.uint8)
    labels[2:10, 2:10] = 15  # person (class id 14)
    labels[12:20, 12:20] = 1  # aeroplane (class id 0)
    labels[10, :] = 255
    _write_image(tmp_path / "JPEGImages" / "2007_000033.jpg")
    _write_labels(tmp_path / "SegmentationClassAug" / "2007_000033.png", labels)
    voc = PascalVocAug(tmp_path)
    assert voc.image_ids() == ["2007_000033"]
    assert voc.classes_in_image("2007_000033") == [0, 14]
    mask = voc.class_mask("2007_000033", 14)
    assert (mask[2:10, 2:10] == 1).all() and (mask[10] == IGNORE_INDEX).all() and (mask[12:20, 12:20] == 0).all()
    assert voc.load_image("2007_000033").shape == (24, 32, 3)
    labels[0, 0] = 40
    _write_labels(tmp_path / "SegmentationClassAug" / "2007_000033.png", labels)
    with pytest.raises(DataError, match="exceeds the 20 classes"):
        PascalVocAug(tmp_path).class_mask("2007_000033", 0)
    with pytest.raises(DataError, match="not in this dataset"):
        voc.class_mask("2008_000001", 0)


def test_ade20k_ignores_unlabelled(tmp_path):
    labels = np.zeros((24, 32), np.uint8)
    labels[:, :16] = 3  # class id 2
    labels[:, 16:20] = 150  # class id 149
    _write_image(tmp_path / "images" / "training" / "ADE_train_00000001.jpg")
    _write_labels(tmp_path / "annotations" / "training" / "ADE_train_00000001.png", labels)
    ade = Ade20k(tmp_path)
    assert ade.num_classes == 150
    assert ade.classes_in_image("ADE_train_00000001") == [2, 149]
    mask = ade.class_mask("ADE_train_00000001", 2)
    assert (mask[:, :16] == 1).all() and (mask[:, 16:20] == 0).all() and (mask[:, 20:] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match="label folder not found"):
        Ade20k(tmp_path, split="validation")


def test_fss1000(tmp_path):
    for name in ("apple", "zebra"):
        for index in (1, 2):
            _write_image(tmp_path / name / f"{index}.jpg")
            mask = np.zeros((24, 32, 3), np.uint8)
            mask[5:15, 5:15] = 255
            Image.fromarray(mask).save(tmp_path / name / f"{index}.png")
    fss = Fss1000(tmp_path)
    assert fss.class_names == ["apple", "zebra"]
    assert fss.images_of_class(1) == ["zebra/1", "zebra/2"]
    assert (fss.class_mask("zebra/2", 1)[5:15, 5:15] == 1).all()
    assert not fss.class_mask("zebra/2", 0).any()
    with pytest.raises(DataError, match="class folders missing"):
        Fss1000(tmp_path, classes=["apple", "pear"])


def test_fss1000_mask_stored_at_another_size_is_served_at_its_images(tmp_path):
    _write_image(tmp_path / "apple" / "1.jpg", shape=(24, 32))
    mask = np.zeros((12, 16), np.uint8)  # half the image's size, as a few FSS-1000 masks are stored
    mask[2:6, 4:8] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "apple" / "1.png")
    served = Fss1000(tmp_path).class_mask("apple/1", 0)
    assert served.shape == (24, 32) and served.sum() == 4 * 4 * 4 and (served[4:12, 8:16] == 1).all()


def test_lvis_file_names_and_non_exhaustive(tmp_path):
    _write_image(tmp_path / "train2017" / "000000000042.jpg")
    polygon = [[4.0, 4.0, 20.0, 4.0, 20.0, 16.0, 4.0, 16.0]]
    data = {
        "images": [{"id": 42, "height": 24, "width": 32, "coco_url": "http://images.cocodataset.org/train2017/000000000042.jpg",
                    "not_exhaustive_category_ids": [7], "neg_category_ids": [3]}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 7, "segmentation": polygon, "area": 192.0,
                         "bbox": [4, 4, 16, 12]}],
        "categories": [{"id": 3, "name": "aardvark"}, {"id": 7, "name": "apple"}],
    }
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    lvis = LvisInstances(tmp_path / "lvis.json", tmp_path)
    assert lvis.image_path(42) == tmp_path / "train2017" / "000000000042.jpg"
    assert lvis.load_image(42).shape == (24, 32, 3)
    mask = lvis.class_mask(42, 1)
    assert (mask == 1).sum() > 100 and set(np.unique(mask)) == {1, IGNORE_INDEX}
    assert not lvis.class_mask(42, 0).any()  # negative category: all background
