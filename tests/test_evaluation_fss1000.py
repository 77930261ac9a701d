"""FSS-1000 one-shot evaluation (HSNet's test protocol) on an FSS-1000-format copy of real coco_mini
images (tests/segic_mix_data.py ``derive_fss1000``) with real MobileNetV2 features, through Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.episodes import read_manifest
from pipeline.episodes.manifest import support_rng
from pipeline.errors import ConfigError, DataError, run_cli
from pipeline.evaluation import EvalResolution
from pipeline.evaluation.fss1000 import (
    MANIFEST_NAME,
    Fss1000EvaluateConfig,
    Fss1000SourceFactory,
    fss1000_test_manifest,
    read_class_list,
    run,
)
from pipeline.evaluation.runner import evaluate_share
from pipeline.report import SkipReport

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]

SUBSET = 120  # coco_mini images -> 14 test classes with 1..4 images each (2 with a single image)
PER_CLASS = 4
INPUT_SIZE = 128  # backbone input: small, to be fast
EVAL_SIZE = 128


@pytest.fixture(scope="module")
def fss_root(coco_mini_dir, tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from coco_helpers import coco_subset
    from segic_mix_data import derive_fss1000

    root = tmp_path_factory.mktemp("fss1000")
    subset = coco_subset(coco_mini_dir / "instances.json", SUBSET, root / "subset.json")
    return derive_fss1000(subset, coco_mini_dir / "images", root / "FSS-1000", per_class=PER_CLASS)


@pytest.fixture(scope="module")
def fss_test_split(fss_root):
    return Fss1000SourceFactory(str(fss_root), tuple(read_class_list(fss_root / "test.txt")))()


def _config(fss_root, weights, tmp_path, **changes) -> Fss1000EvaluateConfig:
    base = dict(root=str(fss_root), backbone_checkpoint=str(weights), backbone_options={"input_size": INPUT_SIZE},
                resolution_size=EVAL_SIZE, num_workers=2, output_dir=str(tmp_path / "out"))
    return Fss1000EvaluateConfig(**{**base, **changes})


@pytest.mark.parametrize("shot", [1, 2])
def test_every_test_image_is_a_query_once_with_seeded_supports_of_its_class(fss_test_split, shot):
    report = SkipReport("x")
    table = fss1000_test_manifest(fss_test_split, shot=shot, seed=3, report=report)
    rows = table.to_pylist()
    sizes = {c: len(fss_test_split.images_of_class(c)) for c in range(len(fss_test_split.class_names))}
    usable = {c for c, n in sizes.items() if n >= shot + 1}
    assert len(fss_test_split.class_names) == 14 and len(usable) < 14  # some classes are too small: reported
    assert report.total == 14 - len(usable)
    # complete: every image of every usable test class is the query of exactly one episode
    expected = sorted(i for c in usable for i in fss_test_split.images_of_class(c))
    assert sorted(row["query_id"] for row in rows) == expected and len(rows) == len(expected)
    assert [row["episode_id"] for row in rows] == list(range(len(rows)))
    for row in rows:
        folder = fss_test_split.class_names[row["class_id"]]
        supports = row["support_ids"]
        assert row["query_id"].split("/")[0] == folder and row["query_id"] not in supports
        assert len(supports) == len(set(supports)) == shot == row["shot"]
        assert all(s.split("/")[0] == folder for s in supports)
        assert row["dataset"] == "fss1000" and row["split"] == "test" and row["sampler"] == "every_query"
        # the draw of an episode is a function of (seed, episode_id) alone
        others = [i for i in fss_test_split.images_of_class(row["class_id"]) if i != row["query_id"]]
        again = support_rng(3, row["episode_id"]).choice(len(others), size=shot, replace=False)
        assert supports == [others[int(i)] for i in again]
    # seeded: the same seed gives the same manifest, another seed other supports
    assert fss1000_test_manifest(fss_test_split, shot=shot, seed=3).equals(table)
    other = fss1000_test_manifest(fss_test_split, shot=shot, seed=4)
    assert other.column("query_id").equals(table.column("query_id"))
    assert other.column("support_ids").to_pylist() != table.column("support_ids").to_pylist()


def test_the_job_equals_the_runner_and_meter_on_its_own_manifest(local_ray, fss_root, fss_test_split,
                                                                 mobilenet_v2_weights, tmp_path):
    config = _config(fss_root, mobilenet_v2_weights, tmp_path)
    results = run(config)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "complete" and saved["miou"] == results["miou"]
    classes = read_class_list(fss_root / "test.txt")
    assert list(saved["per_class_iou"]) == classes and saved["classes"] == 14
    assert saved["resolution"] == f"{EVAL_SIZE}x{EVAL_SIZE} (resized GT)" and saved["shot"] == 1
    assert saved["skipped_sampling"]["total"] == 2  # hot_dog and scissors have one image each
    assert "cat" in saved["coco_named_classes"] and "not bit-identical" in saved["protocol"]
    assert json.loads((out / "config.json").read_text())["backbone_options"] == {"input_size": INPUT_SIZE}
    assert 0.0 < saved["miou"] < 100.0 and 0.0 < saved["fbiou"] < 100.0
    print(f"FSS-1000 copy, prototype_matching: mIoU {saved['miou']:.2f} FB-IoU {saved['fbiou']:.2f} "
          f"({saved['episodes']} episodes)")

    table = read_manifest(out / MANIFEST_NAME)
    assert table.num_rows == saved["episodes"] == saved["manifest_episodes"]  # every episode once, no double count
    assert table.equals(fss1000_test_manifest(fss_test_split, shot=1, seed=0))

    from pipeline.evaluation.common import PredictorFactory

    predictor = PredictorFactory(None, "prototype_matching", {}, "sam_vit_b", None, "mobilenet_v2",
                                 str(mobilenet_v2_weights), {"input_size": INPUT_SIZE})()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers: conv reductions then run in the same order
    try:
        meter = evaluate_share(table, fss_test_split, predictor, list(range(14)), EvalResolution("fixed", EVAL_SIZE),
                               SkipReport("x"))
        # k-shot through the same predictor: 2 supports per episode (the first 6 episodes)
        two_shot = fss1000_test_manifest(fss_test_split, shot=2, seed=0).slice(0, 6)
        k_meter = evaluate_share(two_shot, fss_test_split, predictor, list(range(14)), EvalResolution("fixed", EVAL_SIZE),
                                 SkipReport("x")).compute()
    finally:
        torch.set_num_threads(threads)
    assert k_meter["episodes"] == 6 and 0.0 < k_meter["fbiou"] < 100.0
    single = meter.compute()
    assert single["episodes"] == saved["episodes"]
    assert single["miou"] == pytest.approx(saved["miou"], abs=1e-9)
    assert single["fbiou"] == pytest.approx(saved["fbiou"], abs=1e-9)
    assert [single["per_class_iou"][c] for c in range(14)] == pytest.approx(list(saved["per_class_iou"].values()), abs=1e-9)


def _one_line_error(config, capsys) -> str:
    assert run_cli(lambda: run(config), "evaluate_fss1000") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def test_a_missing_root_list_or_class_folder_is_one_line_before_any_work(fss_root, mobilenet_v2_weights, tmp_path,
                                                                         capsys):
    missing = tmp_path / "nowhere"
    assert _one_line_error(_config(missing, mobilenet_v2_weights, tmp_path), capsys) == (
        f"evaluate_fss1000: error: FSS-1000 folder not found: {missing}")
    assert _one_line_error(_config(fss_root, mobilenet_v2_weights, tmp_path, lists_dir=str(tmp_path)), capsys) == (
        f"evaluate_fss1000: error: FSS-1000 test class list not found: {tmp_path / 'test.txt'} "
        "(HSNet's data/splits/fss/test.txt)")
    (tmp_path / "test.txt").write_text("cat\nno_such_class\n")
    message = _one_line_error(_config(fss_root, mobilenet_v2_weights, tmp_path, lists_dir=str(tmp_path)), capsys)
    assert "class folders missing under" in message and "no_such_class" in message
    assert not (tmp_path / "out").exists()  # nothing written, Ray never started
    with pytest.raises(ConfigError, match="shot must be >= 1"):
        run(_config(fss_root, mobilenet_v2_weights, tmp_path, shot=0))
    (tmp_path / "test.txt").write_text("\n")
    with pytest.raises(DataError, match="the class list is empty"):
        run(_config(fss_root, mobilenet_v2_weights, tmp_path, lists_dir=str(tmp_path)))


def test_job_script_reports_a_missing_list_in_one_line(fss_root, tmp_path):
    completed = subprocess.run(
        [sys.executable, "jobs/evaluate_fss1000.py", "--root", str(fss_root), "--lists-dir", str(tmp_path),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip() == (f"evaluate_fss1000: error: FSS-1000 test class list not found: "
                                        f"{tmp_path / 'test.txt'} (HSNet's data/splits/fss/test.txt)")
    assert not (tmp_path / "out").exists()
