"""The evaluation path end to end on real images and real MobileNetV2 features, through Ray."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.data.folds import novel_classes
from pipeline.episodes import read_manifest
from pipeline.evaluation import EvalResolution
from pipeline.evaluation.job import EvaluateConfig, PredictorFactory, SourceFactory, run
from pipeline.evaluation.runner import evaluate_share
from pipeline.report import SkipReport

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]


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
    assert saved["folds"]["1"]["miou"] == fold["miou"] and saved["status"] == "complete"
    assert saved["crowd"] == "background" and "HSNet-compatible" in saved["crowd_meaning"]
    assert json.loads((tmp_path / "config.json").read_text())["folds"] == [1]

    table = read_manifest(tmp_path / "episodes_fold1.parquet")
    predictor = _prototype_matching(mobilenet_v2_weights)
    source = SourceFactory(config.annotations, config.images, "2017")()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers: conv reductions then run in the same order
    try:
        single = evaluate_share(table, source, predictor, novel_classes("coco20i", 1), EvalResolution(), SkipReport("x"))
    finally:
        torch.set_num_threads(threads)
    assert single.compute()["miou"] == pytest.approx(fold["miou"], abs=1e-9)


def _prototype_matching(weights):
    """The training-free baseline through the method contract (the job's own predictor factory)."""
    return PredictorFactory(None, "prototype_matching", {}, "sam_vit_b", None, "mobilenet_v2", str(weights))()


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
    predictor = _prototype_matching(mobilenet_v2_weights)
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


def _config(coco_mini_dir, coco20i_lists_dir, weights, tmp_path, **changes) -> EvaluateConfig:
    base = dict(annotations=str(coco_mini_dir / "instances.json"), images=str(coco_mini_dir / "images"),
                backbone_checkpoint=str(weights), lists_dir=str(coco20i_lists_dir), folds=[0, 1], n_episodes=6,
                num_workers=1, output_dir=str(tmp_path / "out"))
    return EvaluateConfig(**{**base, **changes})


class NoRay:
    """The job's evaluation without Ray (``run(config, evaluation)``): fold 0 evaluates (to a fixed
    meter), fold 1 fails; the start and every fold are recorded in ``calls``."""

    def __init__(self) -> None:
        self.calls = {"ray": 0, "folds": []}

    def start(self) -> None:
        self.calls["ray"] += 1

    def __call__(self, manifest_path, source_factory, predictor_factory, class_ids, resolution, num_workers):
        from pipeline.evaluation import FewShotMeter

        self.calls["folds"].append(str(manifest_path))
        if "fold1" in str(manifest_path):
            raise RuntimeError("worker died in fold 1")
        meter = FewShotMeter(class_ids)
        meter.update(np.ones((4, 4), np.uint8), np.ones((4, 4), np.uint8), class_ids[0])
        return meter, SkipReport("evaluation")


@pytest.fixture
def no_ray() -> NoRay:
    return NoRay()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"folds": [0, 7]}, "fold must be an integer in 0..3, got 7"),
        ({"folds": [1, 1]}, "name a fold twice"),
        ({"shot": 0}, "shot must be >= 1, got 0"),
        ({"n_episodes": -5}, "n_episodes must be >= 1, got -5"),
        ({"crowd": "maybe"}, "crowd must be one of"),
        ({"backbone": "mobilenet_v3"}, "unknown backbone 'mobilenet_v3'"),
        ({"lists_dir": "{tmp}/nowhere"}, "HSNet COCO-20i lists not found: {tmp}/nowhere/val/fold0.json"),
        ({"images": "{tmp}/nowhere/images"}, "path not found: {tmp}/nowhere/images"),
    ],
)
def test_everything_is_validated_before_ray_starts(changes, message, no_ray, coco_mini_dir, coco20i_lists_dir,
                                                   mobilenet_v2_weights, tmp_path):
    from pipeline.errors import ConfigError

    # missing paths live under this test's tmp_path ({tmp}), never at a fixed place on the machine
    changes = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in changes.items()}
    message = message.replace("{tmp}", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(_config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, **changes), no_ray)
    assert no_ray.calls == {"ray": 0, "folds": []} and not (tmp_path / "out" / "results.json").exists()


def test_each_finished_fold_is_saved_and_the_skip_report_is_shown_and_saved(
    no_ray, coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, capsys
):
    data = json.loads((coco_mini_dir / "instances.json").read_text())
    data["annotations"] += [
        dict(data["annotations"][0], id=990001, image_id=123456789),  # an image the json does not have
        dict(data["annotations"][1], id=990002, category_id=91),  # a category it does not have
    ]
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(data))
    config = _config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, annotations=str(annotations))
    with pytest.raises(RuntimeError, match="worker died in fold 1"):
        run(config, no_ray)
    out = capsys.readouterr().out
    assert "coco annotations instances.json: skipped 2 item(s)" in out
    assert "annotation references an unknown category id (e.g. ann 990002)" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "failed" and "worker died in fold 1" in results["error"]
    assert list(results["folds"]) == ["0"] and results["folds_pending"] == [1]  # fold 0 kept
    assert results["folds"]["0"]["episodes"] == 1 and results["crowd"] == "background"
    assert results["skipped_annotations"]["counts"] == {
        "annotation references an unknown image id": 1, "annotation references an unknown category id": 1,
    }
    assert no_ray.calls["ray"] == 1 and len(no_ray.calls["folds"]) == 2


def test_a_foreign_category_id_set_fails_before_ray(no_ray, coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights,
                                                   tmp_path):
    from pipeline.errors import DataError

    data = json.loads((coco_mini_dir / "instances.json").read_text())
    for category in data["categories"]:  # e.g. a json with 0-based or shifted ids: every class id would be off
        category["id"] += 100
    annotations = tmp_path / "shifted.json"
    annotations.write_text(json.dumps(data))
    config = _config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, annotations=str(annotations))
    with pytest.raises(DataError, match=r"its 80 category ids are not COCO's 80 \(missing \[1, 2, 3"):
        run(config, no_ray)
    assert no_ray.calls["ray"] == 0 and not (tmp_path / "out").exists()  # nothing written for refused inputs


def test_job_script_refuses_a_bad_fold_before_ray(tmp_path, coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights):
    completed = subprocess.run(
        [sys.executable, "jobs/evaluate_coco20i.py", "--annotations", str(coco_mini_dir / "instances.json"),
         "--images", str(coco_mini_dir / "images"), "--backbone-checkpoint", str(mobilenet_v2_weights),
         "--lists-dir", str(coco20i_lists_dir), "--folds", "0", "7", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "evaluate_coco20i: error: fold must be an integer in 0..3, got 7" in completed.stderr
    assert "Started a local Ray instance" not in completed.stderr + completed.stdout
    assert not (tmp_path / "out" / "results.json").exists()


def test_skip_reports_of_ranks_add_up_with_at_most_five_examples():
    total = SkipReport("evaluation")
    for rank in range(3):
        share = SkipReport(f"evaluation rank {rank}")
        for index in range(4):
            share.skip("image file not found", f"episode {rank}-{index}")
        total.add(share.as_dict())
    assert total.counts["image file not found"] == 12 and len(total.examples["image file not found"]) == 5
    assert "12 x image file not found" in total.summary()


def test_a_method_other_than_the_checkpoints_is_refused_and_the_checkpoints_is_recorded(
    no_ray, coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path
):
    """Issue 20: ``--method prosam`` (or a name that does not exist) with a VRP-SAM checkpoint used to
    evaluate VRP-SAM and record "prosam"; now one line before anything is written, and the method the
    checkpoint holds is what config.json and results.json record."""
    from pipeline.errors import ConfigError
    from refseg_models.build import build_model
    from refseg_models.checkpoint import EncoderIdentity, save_inference_checkpoint

    model = build_model("vrp_sam", backbone_channels=(32, 96, 1280), allow_random_init=True)
    identities = {"sam": EncoderIdentity("sam_proxy_mobilenet_v2", "random-init", "vrp512_squash_tf128"),
                  "backbone": EncoderIdentity("mobilenet_v2", "random-init", "vrp512_squash_tf128")}
    checkpoint = str(save_inference_checkpoint(tmp_path / "vrp.pt", model, identities))
    out = tmp_path / "out"
    for method in ("prosam", "nonexistent_method"):
        message = f"--method {method} does not match --checkpoint {checkpoint}, which holds a vrp_sam model"
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(_config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, checkpoint=checkpoint,
                        method=method), no_ray)
        assert not out.exists() and no_ray.calls == {"ray": 0, "folds": []}  # no config.json, no episode files
    with pytest.raises(ConfigError, match="--method-options configure a training-free method"):
        run(_config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, checkpoint=checkpoint,
                    method_options={"num_queries": 8}), no_ray)
    assert not out.exists()

    completed = subprocess.run(
        [sys.executable, "jobs/evaluate_coco20i.py", "--annotations", str(coco_mini_dir / "instances.json"),
         "--images", str(coco_mini_dir / "images"), "--backbone-checkpoint", str(mobilenet_v2_weights),
         "--lists-dir", str(coco20i_lists_dir), "--folds", "0", "--checkpoint", checkpoint, "--method", "prosam",
         "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2 and completed.stderr.strip().splitlines() == [
        f"evaluate_coco20i: error: --method prosam does not match --checkpoint {checkpoint}, which holds a vrp_sam "
        "model: leave --method out (the checkpoint decides) or evaluate a prosam checkpoint"]
    assert not out.exists()

    with pytest.raises(RuntimeError, match="worker died in fold 1"):  # no_ray: fold 0 evaluates, fold 1 fails
        run(_config(coco_mini_dir, coco20i_lists_dir, mobilenet_v2_weights, tmp_path, checkpoint=checkpoint), no_ray)
    assert json.loads((out / "config.json").read_text())["method"] == "vrp_sam"
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "vrp_sam" and results["checkpoint"] == checkpoint and list(results["folds"]) == ["0"]
