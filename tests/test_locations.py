"""One root for a run's durable locations, and the refusal of any that would land in the temporary
working-dir copy of ``ray job submit --working-dir`` (before any Ray work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.locations import ROOT_ENV, check_durable, ray_job_working_dir, resolve_root

REPO = Path(__file__).resolve().parents[1]


def _fake_job_dir(tmp_path: Path) -> Path:
    """What Ray makes for a job's --working-dir upload (the driver starts in it)."""
    path = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    path.mkdir(parents=True)
    return path


def test_root_resolution_and_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_root().location == str(tmp_path.resolve())
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "shared"))
    root = resolve_root()
    assert root.location == str(tmp_path / "shared")
    assert root.store("coco", "sam_vit_h") == str(tmp_path / "shared" / "stores" / "coco-sam_vit_h")
    assert root.ray_storage == str(tmp_path / "shared" / "outputs" / "ray")
    assert root.mlflow_uri == f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    s3 = resolve_root("s3://bucket/refseg/")  # the argument wins over the variable
    assert s3.store("coco", "sam_vit_h") == "s3://bucket/refseg/stores/coco-sam_vit_h"
    assert s3.ray_storage == "s3://bucket/refseg/outputs/ray" and s3.mlflow_uri is None


def test_the_job_working_dir_is_recognised(tmp_path: Path, monkeypatch) -> None:
    job = _fake_job_dir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_working_dir(job / "jobs") == job  # by the path Ray unpacks it to
    assert ray_job_working_dir(tmp_path) is None
    # by the job config Ray's supervisor gives the driver (another layout of the session folder)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert ray_job_working_dir(tmp_path) == tmp_path.resolve()


def test_durable_locations_inside_the_job_copy_are_refused(tmp_path: Path, monkeypatch) -> None:
    job = _fake_job_dir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    fine = {"the root": str(tmp_path / "shared"), "the MLflow store": f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}",
            "the sam store": "s3://bucket/stores/x"}
    check_durable(fine, cwd=job)
    check_durable({"the sam store": str(job / "stores" / "x")}, cwd=tmp_path)  # not a job: nothing to refuse
    with pytest.raises(ConfigError, match=r"the MLflow store .*mlflow.db would be inside the temporary copy.*--root"):
        check_durable({**fine, "the MLflow store": f"sqlite:///{job / 'mlflow.db'}"}, cwd=job)
    with pytest.raises(ConfigError, match=r"the sam feature store .*stores/x would be inside"):
        check_durable({"the sam feature store": str(job / "stores" / "x")}, cwd=job)


@pytest.mark.real_data
def test_training_in_a_job_copy_without_a_root_stops_in_one_line(
    tmp_path: Path, coco_mini_dir: Path, mobilenet_v2_weights: Path
) -> None:
    """The README's `ray job submit --working-dir .` command without --root: every default location
    (stores, checkpoints, MLflow, summary) would be the job's temporary copy; the job says so and
    stops before reading data or starting Ray. With --root it passes that check."""
    job = _fake_job_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in (ROOT_ENV, "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), "--annotations", str(coco_mini_dir / "instances.json"),
               "--images", str(coco_mini_dir / "images"), "--backbone-checkpoint", str(mobilenet_v2_weights), "--folds", "0"]
    result = subprocess.run(command, cwd=job, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "would be inside the temporary copy of the working directory" in lines[0], result.stderr
    assert "pass --root" in lines[0] and not (job / "stores").exists() and not (job / "mlflow.db").exists()
    assert result.stdout == ""  # nothing read, nothing started


def test_every_default_location_of_the_training_job_derives_from_the_root(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from pipeline.training import tracking
    from pipeline.training.commands import add_train_arguments, configs_from_args
    from pipeline.training.job import fold_configs, output_dir, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    data = ["--annotations", "/data/coco/instances.json", "--images", "/data/coco/images", "--backbone-checkpoint",
            "/data/weights/mobilenet_v2.pth", "--folds", "0", "--run-name", "r"]
    base, options = configs_from_args(parser.parse_args([*data, "--root", str(tmp_path / "root")]), "coco20i")
    cfg = fold_configs(base, options)[0]
    root = tmp_path / "root"
    assert (cfg.sam.store, cfg.backbone.store) == (str(root / "stores" / "coco-sam_proxy_mobilenet_v2"),
                                                   str(root / "stores" / "coco-mobilenet_v2"))
    assert cfg.storage_path == str(root / "outputs" / "ray")
    assert tracking_uri(options) == f"sqlite:///{root / 'mlflow.db'}"
    assert output_dir(options, cfg.run_name) == str(root / "outputs" / "r")
    # an object-store root: the same layout, and the MLflow server must be named (no sqlite in a bucket)
    base, options = configs_from_args(parser.parse_args([*data, "--root", "s3://bucket/refseg"]), "coco20i")
    cfg = fold_configs(base, options)[0]
    assert cfg.sam.store == "s3://bucket/refseg/stores/coco-sam_proxy_mobilenet_v2"
    assert cfg.storage_path == "s3://bucket/refseg/outputs/ray"
    with pytest.raises(ConfigError, match="give a tracking server"):
        tracking_uri(options)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(options) == "http://mlflow:5000" == tracking.default_tracking_uri(options.resolved_root)
