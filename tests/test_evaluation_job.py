"""The evaluation path end to end on real images and real MobileNetV2 features, through Ray."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.data.folds import novel_classes
from pipeline.episodes import read_manifest
from pipeline.evaluation import EvalResolution
from pipeline.evaluation.job import EvaluateConfig, PrototypeMatchingFactory, SourceFactory, run
from pipeline.evaluation.runner import evaluate_share
from pipeline.report import SkipReport

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_evaluation_equals_single_process(local_ray, coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path):
    config = EvaluateConfig(
        annotations=str(coco_mini_dir / "instances.json"), images=str(coco_mini_dir / "images"),
        backbone_checkpoint=str(mobilenet_v2_weights), lists_dir=str(coco20i_lists_dir), folds=[1],
        n_episodes=24, num_workers=2, output_dir=str(tmp_path),
    )
    results = run(config)
    fold = results["folds"]["1"]
    assert fold["episodes"] == 24
    assert 0.0 < fold["miou"] < 100.0 and 0.0 < fold["fbiou"] < 100.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["folds"]["1"]["miou"] == fold["miou"]
    assert json.loads((tmp_path / "config.json").read_text())["folds"] == [1]

    table = read_manifest(tmp_path / "episodes_fold1.parquet")
    predictor = PrototypeMatchingFactory("mobilenet_v2", str(mobilenet_v2_weights), "layer4")()
    source = SourceFactory(config.annotations, config.images, "2017")()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers: conv reductions then run in the same order
    try:
        single = evaluate_share(table, source, predictor, novel_classes("coco20i", 1), EvalResolution(), SkipReport("x"))
    finally:
        torch.set_num_threads(threads)
    assert single.compute()["miou"] == pytest.approx(fold["miou"], abs=1e-9)


def test_prototype_matching_beats_an_empty_prediction(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights):
    """Real features carry signal: the baseline's foreground IoU is far above predicting nothing."""
    from pipeline.data import CocoInstances
    from pipeline.data.splits import map_coco20i_list, read_coco20i_list
    from pipeline.episodes import build_episode_manifest

    source = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images")
    classes = novel_classes("coco20i", 0)
    pairs = map_coco20i_list(read_coco20i_list(coco20i_lists_dir, "val", 0), source)
    table = build_episode_manifest({c: pairs.get(c, []) for c in classes}, dataset="coco", fold=0, split="test",
                                   n_episodes=30, seed=5)
    predictor = PrototypeMatchingFactory("mobilenet_v2", str(mobilenet_v2_weights), "layer4")()
    meter = evaluate_share(table, source, predictor, classes, EvalResolution(), SkipReport("x"))
    result = meter.compute()
    assert result["tpr"] > 40.0
    assert result["fbiou"] > 40.0


def test_job_script_rejects_bad_paths(tmp_path):
    completed = subprocess.run(
        [sys.executable, "jobs/evaluate_coco20i.py", "--annotations", str(tmp_path / "x.json"), "--images",
         str(tmp_path), "--backbone-checkpoint", str(tmp_path / "w.pth"), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert completed.returncode != 0
    assert "path not found" in completed.stderr and "x.json" in completed.stderr
