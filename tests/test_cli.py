import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main


def test_folds_command(capsys):
    assert main(["folds", "--fold", "0"]) == 0
    classes = json.loads(capsys.readouterr().out)
    assert classes["72"] == "refrigerator" and len(classes) == 20


def test_bad_fold_is_a_clean_error(capsys):
    assert main(["folds", "--fold", "9"]) == 2
    assert "fold must be an integer in 0..3" in capsys.readouterr().err


@pytest.mark.real_data
def test_episodes_hsnet_command(coco20i_lists_dir, tmp_path):
    out = tmp_path / "hsnet.parquet"
    assert main(["episodes", "hsnet", "--lists-dir", str(coco20i_lists_dir), "--fold", "0", "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 1000
    first = table.slice(0, 1).to_pylist()[0]
    assert (first["class_id"], first["query_id"], first["support_ids"]) == (72, "507081", ["486122"])


@pytest.mark.real_data
def test_episodes_build_command(coco_mini_dir, coco20i_lists_dir, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    argv = ["episodes", "build", "--annotations", str(coco_mini_dir / "instances.json"), "--images",
            str(coco_mini_dir / "images"), "--lists-dir", str(coco20i_lists_dir), "--fold", "1", "--n", "50",
            "--out", str(out)]
    assert main(argv) == 0
    assert pq.read_table(out).num_rows == 50
    assert "list entry's image not in the dataset" in capsys.readouterr().err


@pytest.mark.real_data
@pytest.mark.parametrize("kind", ["hsnet", "build"])
def test_episode_count_is_validated_where_given(kind, coco20i_lists_dir, coco_mini_dir, tmp_path, capsys):
    argv = ["episodes", kind, "--lists-dir", str(coco20i_lists_dir), "--fold", "0", "--n", "-5",
            "--out", str(tmp_path / "m.parquet")]
    if kind == "build":
        argv += ["--annotations", str(coco_mini_dir / "instances.json"), "--images", str(coco_mini_dir / "images")]
    assert main(argv) == 2
    assert "n (the number of episodes) must be >= 1, got -5" in capsys.readouterr().err
    assert not (tmp_path / "m.parquet").exists()
