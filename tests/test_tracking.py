"""MLflow as the place results are read, without Ray: classic ML experiments with a saved view of
the test metrics, run statuses when the driver fails or is interrupted, and each fold's inference
checkpoint as a registered MLflow model that ``refseg predict`` and ``mlflow.pyfunc`` load."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.training import tracking


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(uri: str) -> tuple[str, str, str]:
    experiment = tracking.ensure_experiment(uri, "t", ["test_miou"])
    parent = tracking.parent_run(uri, experiment, "r", {"method": "vrp_sam"}, {})
    child, _ = tracking.fold_run(uri, experiment, parent, "r", 0, "r-fold0", {"method": "vrp_sam"}, {})
    return experiment, parent, child


def _status(uri: str, run_id: str) -> str:
    return tracking._client(uri).get_run(run_id).info.status


def test_experiments_are_classic_ml_with_a_view_of_the_test_metrics(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    experiment = tracking.ensure_experiment(uri, "t", ["test_miou", "test_fbiou"])
    tags = tracking._client(uri).get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.refseg-results"])
    assert view["name"] == "refseg results" and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns[:2] == ["metrics.`test_miou`", "metrics.`test_fbiou`"] and "tags.`refseg.fold`" in columns
    # another run of the study adds its columns (an untrained row, a baseline), keeping the view's age
    assert tracking.ensure_experiment(uri, "t", ["test_miou", "test_untrained_miou"]) == experiment
    again = json.loads(tracking._client(uri).get_experiment(experiment).tags["mlflow.sharedViewState.refseg-results"])
    assert "metrics.`test_untrained_miou`" in json.loads(again["state"])["selectedColumns"]
    assert again["createdAt"] == view["createdAt"]
    url = tracking.results_view_url(uri, experiment)
    assert url == (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?viewStateShareKey=refseg-results"
                   "&workflowType=machine_learning")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(0)])
def test_an_interrupted_driver_ends_its_runs_killed(tmp_path: Path, interrupt: BaseException) -> None:
    uri = _uri(tmp_path)
    _, parent, child = _runs(uri)
    with pytest.raises(KeyboardInterrupt):  # SystemExit(0) (Ray Train's SIGINT handler) too: exit 130, not 0
        with tracking.ended_with_the_driver(uri, [parent, child]):
            raise interrupt
    assert _status(uri, parent) == _status(uri, child) == "KILLED"
    tracking.set_running(uri, parent)  # what a resuming driver does
    assert _status(uri, parent) == "RUNNING"


def test_a_failure_ends_child_and_parent_failed_and_leaves_finished_runs(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    experiment, parent, child = _runs(uri)
    done, _ = tracking.fold_run(uri, experiment, parent, "r", 1, "r-fold1", {}, {})
    tracking.finish(uri, done)
    with pytest.raises(RuntimeError, match="worker died"):
        with tracking.ended_with_the_driver(uri, [parent, child, done]):
            raise RuntimeError("worker died")
    assert _status(uri, parent) == _status(uri, child) == "FAILED"
    assert _status(uri, done) == "FINISHED"


@pytest.fixture(scope="module")
def proxy_checkpoint(tmp_path_factory, mobilenet_v2_weights: Path) -> Path:
    """A VRP-SAM inference checkpoint on the proxy SAM + MobileNetV2 geometry (untrained weights)."""
    import torch

    from refseg_models.build import build_model, method_class, method_config
    from refseg_models.checkpoint import EncoderIdentity, save_inference_checkpoint
    from refseg_models.encoders import build_encoder
    from refseg_models.encoders.sam_proxy import default_proxy_sam_checkpoint

    proxy = default_proxy_sam_checkpoint()
    sam = build_encoder("sam_proxy_mobilenet_v2", proxy, backbone_checkpoint=mobilenet_v2_weights)
    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights)
    shapes = {"sam": sam.output_shapes(), "backbone": backbone.output_shapes()}
    torch.manual_seed(0)
    config = method_class("vrp_sam").config_for_features(method_config("vrp_sam"), shapes)
    model = build_model("vrp_sam", config, sam_checkpoint=proxy)
    identities = {"sam": EncoderIdentity.of(sam, proxy), "backbone": EncoderIdentity.of(backbone, mobilenet_v2_weights)}
    return save_inference_checkpoint(tmp_path_factory.mktemp("ck") / "refseg_model.pt", model, identities, {"fold": 0})


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.real_data
@pytest.mark.real_weights
def test_the_checkpoint_is_a_registered_mlflow_model_that_loads_weights_only(
    tmp_path: Path, proxy_checkpoint: Path, mobilenet_v2_weights: Path, coco_mini_dir: Path
) -> None:
    import mlflow

    from pipeline.inference.commands import register
    from pipeline.inference.load import load_predictor
    from refseg_models.predictor import Box

    uri = _uri(tmp_path)
    experiment, _, child = _runs(uri)
    logger = tracking.RunLogger(uri, child)
    logger.log_now({"test_miou": 12.5}, 3)
    tags = {"refseg.fold": "0", "refseg.seed": "321", "refseg.frozen.sam": "sam_proxy_mobilenet_v2 (weights sha256 d06c...)"}
    model_uri = logger.log_model(proxy_checkpoint, name="r-fold0", registered_name="refseg-vrp_sam-test", tags=tags,
                                 step=3, description="vrp_sam, one version per fold and seed")
    assert model_uri == "models:/refseg-vrp_sam-test/1" and tracking.run_model_uri(uri, child) == model_uri
    client = tracking._client(uri)
    version = client.get_model_version("refseg-vrp_sam-test", "1")
    assert version.run_id == child and {k: version.tags[k] for k in tags} == tags
    assert client.get_registered_model("refseg-vrp_sam-test").description.startswith("vrp_sam")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.experiment_id == experiment and logged.source_run_id == child  # the run's experiment, not "Default"
    assert {m.key: m.value for m in logged.metrics}["test_miou"] == 12.5  # the run's test metrics, linked

    # refseg's own loading: the downloaded file is the checkpoint, byte for byte
    path = tracking.model_checkpoint(model_uri, uri, tmp_path / "download")
    assert _digest(path) == _digest(proxy_checkpoint)
    with pytest.raises(DataError, match="cannot read the MLflow model models:/nope/1"):
        tracking.model_checkpoint("models:/nope/1", uri, tmp_path / "nope")

    images = sorted((coco_mini_dir / "images").glob("*.jpg"))[:2]
    reference, target = (np.asarray(Image.open(p).convert("RGB")) for p in images)
    expected = load_predictor(proxy_checkpoint, backbone_checkpoint=mobilenet_v2_weights).predict(
        reference, Box(10, 20, 200, 180), target)

    # MLflow's pyfunc loads it too (the loader module reads the file weights_only)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri, model_config={"backbone_checkpoint": str(mobilenet_v2_weights)})
    masks = pyfunc.predict([{"reference_image": str(images[0]), "box": [10, 20, 200, 180], "target_image": str(images[1])}])
    assert np.array_equal(masks[0].astype(bool), expected)

    # and `refseg predict --checkpoint models:/...`
    parser = argparse.ArgumentParser(prog="refseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", "--checkpoint", model_uri, "--tracking-uri", uri, "--reference-image", str(images[0]),
                              "--box", "10", "20", "200", "180", "--target-image", str(images[1]),
                              "--backbone-checkpoint", str(mobilenet_v2_weights), "--out-dir", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "mask.png")) > 0, expected)
