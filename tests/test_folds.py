import pytest

from pipeline.data.folds import COCO_CLASS_NAMES, base_classes, fold_classes, novel_classes
from pipeline.errors import ConfigError

FOLD0_NAMES = (
    "person, airplane, boat, parking meter, dog, elephant, backpack, suitcase, sports ball, skateboard, "
    "wine glass, spoon, sandwich, hot dog, chair, dining table, mouse, microwave, refrigerator, scissors"
).split(", ")


def test_coco20i_folds_are_interleaved_and_partition_the_80_classes():
    all_novel = []
    for fold in range(4):
        novel = novel_classes("coco20i", fold)
        assert novel == [fold + 4 * j for j in range(20)]
        assert sorted(novel + base_classes("coco20i", fold)) == list(range(80))
        all_novel += novel
    assert sorted(all_novel) == list(range(80))
    assert [COCO_CLASS_NAMES[c] for c in novel_classes("coco20i", 0)] == FOLD0_NAMES


def test_pascal5i_folds_are_contiguous_blocks_of_five():
    assert novel_classes("pascal5i", 0) == [0, 1, 2, 3, 4]
    assert novel_classes("pascal5i", 3) == [15, 16, 17, 18, 19]
    assert len(fold_classes("pascal5i", 2, "train")) == 15


@pytest.mark.parametrize("fold", [-1, 4, 1.0, "0"])
def test_fold_out_of_range_is_a_clear_error(fold):
    with pytest.raises(ConfigError, match="fold must be an integer in 0..3"):
        novel_classes("coco20i", fold)


def test_unknown_benchmark_and_split():
    with pytest.raises(ConfigError, match="unknown benchmark"):
        novel_classes("ade20i", 0)
    with pytest.raises(ConfigError, match="split must be"):
        fold_classes("coco20i", 0, "val")
