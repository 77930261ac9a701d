"""The training job end to end, as users run it (subprocesses, real processes killed):

* a 2-worker CPU run on real coco_mini images against the proxy SAM: the fold's metrics, per-class
  table, overlays and inference checkpoint land in MLflow under parent / child runs, the loss falls;
* a second method trained from the same stores (one extraction, two trainings: the stores' files
  are not rewritten) and ``refseg compare`` prints both;
* a killed worker: training continues from the last checkpoint (FailureConfig);
* a killed driver: re-running the same command resumes at the checkpointed step, same child run,
  no step logged twice;
* ``ray job submit`` against a local ``ray start --head`` cluster runs a short fold to completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kill_process import kill_group_when

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".lease" not in p.name):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, coco_mini_dir: Path, mobilenet_v2_weights: Path) -> dict:
    """A 70-image COCO subset (pixel-rule pairs), its stores extracted once, shared arguments."""
    root = tmp_path_factory.mktemp("training")
    data = json.loads((coco_mini_dir / "instances.json").read_text())
    keep = {image["id"] for image in sorted(data["images"], key=lambda i: i["id"])[:70]}
    subset = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    (root / "subset.json").write_text(json.dumps(subset))
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", REFSEG_CODE_VERSION="refseg-test")
    env.pop("RAY_ADDRESS", None)
    common = [
        "--annotations", str(root / "subset.json"), "--images", str(coco_mini_dir / "images"),
        "--feature-dataset", "coco_mini_subset", "--backbone-checkpoint", str(mobilenet_v2_weights),
        "--sam-store", str(root / "stores" / "sam"), "--backbone-store", str(root / "stores" / "backbone"),
        "--folds", "0", "--val-episodes", "8", "--test-episodes", "16", "--num-workers", "2",
        "--cpus-per-worker", "1", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--storage-path", str(root / "ray"), "--experiment", "test", "--log-every", "1",
    ]
    return {"root": root, "env": env, "common": common}


def _train(workspace: dict, *extra: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), *workspace["common"], *extra]
    return subprocess.run(command, cwd=workspace["root"], env=workspace["env"], capture_output=True, text=True, timeout=timeout)


def _client(workspace: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workspace['root'] / 'mlflow.db'}")


def _child_runs(workspace: dict, run_name: str) -> list:
    client = _client(workspace)
    experiment = client.get_experiment_by_name("test")
    return client.search_runs([experiment.experiment_id], f"tags.`refseg.kind` = 'fold' and tags.`refseg.run_name` = '{run_name}'")


def _steps(workspace: dict, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in _client(workspace).get_metric_history(run_id, key)]


VRP = ["--method", "vrp_sam", "--epochs", "3", "--episodes-per-epoch", "32", "--lr", "5e-4", "--run-name", "vrp"]


@pytest.fixture(scope="module")
def vrp_run(workspace: dict) -> dict:
    result = _train(workspace, *VRP, "--extract-missing", "--evaluate-untrained", "--baseline", "prototype_matching")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"stdout": result.stdout, "digest": _tree_digest(workspace["root"] / "stores")}


def test_two_worker_run_lands_in_mlflow_and_the_loss_falls(workspace: dict, vrp_run: dict) -> None:
    from refseg_models.checkpoint import load_inference_checkpoint

    assert "fold 0: test mIoU" in vrp_run["stdout"] and "untrained" in vrp_run["stdout"]
    assert "mlflow ui --backend-store-uri" in vrp_run["stdout"]
    children = _child_runs(workspace, "vrp")
    assert len(children) == 1
    child = children[0]
    client = _client(workspace)
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["refseg.kind"] == "parent" and "mean_test_miou" in parent.data.metrics
    metrics = child.data.metrics
    for key in ("test_miou", "test_fbiou", "test_untrained_miou", "test_prototype_matching_miou", "val_miou",
                "memory/peak_rss_mb", "time/data_share"):
        assert key in metrics, key
    assert any(key.startswith("test_iou/") for key in metrics)
    assert child.data.params["method"] == "vrp_sam" and child.data.tags["refseg.world_size"] == "2"
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)} | {
        a.path for d in ("test", "model", "overlays") for a in client.list_artifacts(child.info.run_id, d)}
    assert {"config.json", "test/results.json", "model/refseg_model.pt"} <= artifacts
    assert any(path.startswith("overlays/") for path in artifacts)
    local = client.download_artifacts(child.info.run_id, "model/refseg_model.pt", str(workspace["root"]))
    checkpoint = load_inference_checkpoint(local)
    assert checkpoint.method == "vrp_sam" and checkpoint.encoders["sam"].encoder_id == "sam_proxy_mobilenet_v2"
    results = json.loads(Path(client.download_artifacts(child.info.run_id, "test/results.json", str(workspace["root"]))).read_text())
    assert results["episodes"] == 16 and len(results["per_class_iou"]) == 20
    # 12 steps (3 epochs x 32 episodes / global batch 8), each logged once, and the loss falls
    steps = _steps(workspace, child.info.run_id)
    assert steps == list(range(1, 13))
    losses = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_second_method_from_the_same_stores_and_compare(workspace: dict, vrp_run: dict) -> None:
    result = _train(workspace, "--method", "prosam", "--epochs", "1", "--episodes-per-epoch", "16",
                    "--method-options", '{"num_samples": 2}', "--run-name", "prosam")
    assert result.returncode == 0, result.stderr[-5000:]
    assert _tree_digest(workspace["root"] / "stores") == vrp_run["digest"]  # one extraction, two trainings
    compare = subprocess.run(
        [str(BIN / "refseg"), "compare", "--experiment", "test", "--tracking-uri", f"sqlite:///{workspace['root'] / 'mlflow.db'}",
         "--out-dir", str(workspace["root"] / "compare")],
        cwd=workspace["root"], env=workspace["env"], capture_output=True, text=True, timeout=120,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "| vrp_sam (1-shot, mask)" in compare.stdout and "| prosam (1-shot, mask)" in compare.stdout
    assert (workspace["root"] / "compare" / "compare.png").stat().st_size > 0


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, deadline_s: float = 400) -> None:
    deadline = time.monotonic() + deadline_s
    while not any(run_dir.glob("checkpoint_step*")):
        assert process.poll() is None, "the job ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.5)


def _fold_dir(workspace: dict, run_name: str) -> Path:
    return workspace["root"] / "ray" / f"{run_name}-fold0"


def _train_worker_pids() -> list[int]:
    output = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in output.splitlines() if "ray::RayTrainWorker" in line]


def test_killed_worker_continues_from_the_last_checkpoint(workspace: dict, vrp_run: dict) -> None:
    args = ["--method", "vrp_sam", "--epochs", "3", "--episodes-per-epoch", "32", "--run-name", "workerkill"]
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), *workspace["common"], *args]
    process = subprocess.Popen(command, cwd=workspace["root"], env=workspace["env"], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(_fold_dir(workspace, "workerkill"), process)
        pids = _train_worker_pids()
        assert pids, "no Ray Train worker process found"
        os.kill(pids[-1], signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-5000:]
    children = _child_runs(workspace, "workerkill")
    assert len(children) == 1 and "test_miou" in children[0].data.metrics
    assert _steps(workspace, children[0].info.run_id) == list(range(1, 13))  # every step once


def test_killed_driver_resumes_under_the_same_child_run(workspace: dict, vrp_run: dict) -> None:
    args = ["--method", "vrp_sam", "--epochs", "3", "--episodes-per-epoch", "32", "--run-name", "driverkill"]
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), *workspace["common"], *args]
    run_dir = _fold_dir(workspace, "driverkill")  # killed with the local Ray it started:
    kill_group_when(command, lambda: any(run_dir.glob("checkpoint_step*")), "the first checkpoint",
                    poll_s=0.5, cwd=workspace["root"], env=workspace["env"])
    first = _child_runs(workspace, "driverkill")
    assert len(first) == 1
    checkpointed = _steps(workspace, first[0].info.run_id)
    assert checkpointed and checkpointed[-1] < 12  # killed mid-run
    result = _train(workspace, *args)
    assert result.returncode == 0, result.stderr[-5000:]
    again = _child_runs(workspace, "driverkill")
    assert [r.info.run_id for r in again] == [first[0].info.run_id]  # re-attached, no new child run
    assert _steps(workspace, again[0].info.run_id) == list(range(1, 13))  # resumed at the checkpoint, no duplicates
    assert "test_miou" in again[0].data.metrics
    # once finished, the same command skips the fold
    done = _train(workspace, *args)
    assert done.returncode == 0 and "already finished" in done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_a_short_fold(workspace: dict, vrp_run: dict) -> None:
    env = dict(workspace["env"], PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")
    port, dashboard = _free_port(), _free_port()
    # Ray's session folder holds AF_UNIX sockets (paths of at most 107 bytes): a short temp dir
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    head_log = (workspace["root"] / "ray_head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--temp-dir", str(temp_dir)],
        env=env, start_new_session=True, stdout=head_log, stderr=subprocess.STDOUT,
    )
    try:
        args = ["--method", "vrp_sam", "--epochs", "1", "--episodes-per-epoch", "16", "--run-name", "submitted"]
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                  "--", "python", "jobs/train_coco20i.py", *workspace["common"], *args]
        deadline = time.monotonic() + 240
        while True:  # the job server answers a few seconds after `ray start` (longer on a loaded machine)
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if (result.returncode == 0 or time.monotonic() > deadline or head.poll() is not None
                    or "Connection" not in result.stderr + result.stdout):
                break
            time.sleep(3)
        head_log.flush()
        assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:],
                                        (workspace["root"] / "ray_head.log").read_text()[-3000:])
        assert "succeeded" in result.stdout.lower()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    children = _child_runs(workspace, "submitted")
    assert len(children) == 1 and "test_miou" in children[0].data.metrics


def test_the_trained_model_beats_the_untrained_one_on_its_training_episodes(workspace: dict, vrp_run: dict) -> None:
    """README's "the model learns": the run's inference checkpoint against the same model before any
    step (the job's seeded initialisation), on the training episodes the run drew, in feature space
    from the run's stores (HSNet's metric over the fold's base classes)."""
    import torch

    from pipeline.data.folds import base_classes
    from pipeline.evaluation.resolution import EvalResolution
    from pipeline.training.config import TrainConfig
    from pipeline.training.data import load_fold_data
    from pipeline.training.episode_features import EpisodeFeatureBuilder
    from pipeline.training.evaluate import evaluate_rows
    from pipeline.training.features import open_frozen_features
    from pipeline.training.loop import build_method
    from pipeline.training.samplers import sampler_class
    from refseg_models.build import build_model
    from refseg_models.checkpoint import load_inference_checkpoint

    client = _client(workspace)
    child = _child_runs(workspace, "vrp")[0]
    cfg = TrainConfig.from_dict(json.loads(Path(client.download_artifacts(child.info.run_id, "config.json", str(workspace["root"]))).read_text()))
    checkpoint = load_inference_checkpoint(client.download_artifacts(child.info.run_id, "model/refseg_model.pt", str(workspace["root"])))
    data = load_fold_data(cfg)
    frozen = open_frozen_features(cfg, build_model(cfg.method, cfg.method_overrides, allow_random_init=True).feature_spec(), data.image_ids())
    torch.manual_seed(cfg.recipe.seed)  # as the job initialises the model: the run's start
    untrained = build_method(cfg, frozen.shapes, cfg.sam.checkpoint)
    torch.manual_seed(cfg.recipe.seed)
    trained = build_method(cfg, frozen.shapes, cfg.sam.checkpoint)
    trained.load_trainable_state_dict(checkpoint.state_dict, "the run's inference checkpoint")
    sampler = sampler_class(cfg.sampler)(cfg, data, untrained, frozen)
    rows = [row for epoch in range(cfg.recipe.epochs) for row in sampler.epoch_table(epoch, sampler.samples_per_epoch()).to_pylist()]
    assert len(rows) == 96  # 3 epochs x 32 episodes
    providers = dict(sam=frozen.stores.get("sam"), backbone_features=frozen.stores.get("backbone"), backbone=frozen.backbone)
    miou = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        builder = EpisodeFeatureBuilder.for_method(model, data.masks, **providers)
        meter, _ = evaluate_rows(model, builder, rows, base_classes(cfg.dataset, cfg.fold), EvalResolution("fixed", cfg.eval_size))
        miou[name] = meter.compute()["miou"]
    print(f"training episodes: mIoU untrained {miou['untrained']:.2f}, trained {miou['trained']:.2f}")
    assert miou["trained"] > miou["untrained"] + 1.0  # points of mIoU
