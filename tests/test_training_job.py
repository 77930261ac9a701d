"""The training job end to end, as users run it (subprocesses, real processes killed):

* a 2-worker CPU run on real coco_mini images against the proxy SAM: the fold's metrics, per-class
  table, overlays and inference checkpoint land in MLflow under parent / child runs, the loss falls;
* a second method trained from the same stores (one extraction, two trainings: the stores' files
  are not rewritten) and ``refseg compare`` prints both;
* a killed worker: training continues from the last checkpoint (FailureConfig);
* a driver stopped with SIGTERM (what ``ray job stop`` sends): its MLflow runs end KILLED; re-running
  the same command sets them RUNNING again, resumes at the checkpointed step, same child run, no step
  logged twice, and ends them FINISHED;
* the README's ``ray job submit`` command, as written, against a local ``ray start --head`` cluster:
  without ``--root`` it stops in one line, with it the stores, checkpoints and MLflow runs land under
  the root and nothing in Ray's temporary copy of the working dir.

Every run here takes its durable locations from ``--root`` (the workspace), as users do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_helpers import free_port
from coco_helpers import coco_subset

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
    coco_subset(coco_mini_dir / "instances.json", 70, root / "subset.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", REFSEG_CODE_VERSION="refseg-test")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "REFSEG_ROOT"):
        env.pop(name, None)
    # a registry URI left in the environment (mlflow.set_registry_uri exports it to child processes)
    # must not divert the runs' models from the run's own store
    env["MLFLOW_REGISTRY_URI"] = f"sqlite:///{root / 'elsewhere.db'}"
    data = ["--annotations", str(root / "subset.json"), "--images", str(coco_mini_dir / "images"),
            "--backbone-checkpoint", str(mobilenet_v2_weights)]
    # the test's size: not a location (those all come from --root)
    size = ["--feature-dataset", "coco_mini_subset", "--folds", "0", "--val-episodes", "8", "--test-episodes", "16",
            "--num-workers", "2", "--cpus-per-worker", "1", "--experiment", "test", "--log-every", "1"]
    return {"root": root, "env": env, "common": [*data, "--root", str(root), *size], "size": size}


def _train(workspace: dict, *extra: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), *workspace["common"], *extra]
    return subprocess.run(command, cwd=workspace["root"], env=workspace["env"], capture_output=True, text=True, timeout=timeout)


def _client(workspace: dict):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workspace['root'] / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _child_runs(workspace: dict, run_name: str) -> list:
    client = _client(workspace)
    experiment = client.get_experiment_by_name("test")
    return client.search_runs([experiment.experiment_id], f"tags.`refseg.kind` = 'fold' and tags.`refseg.run_name` = '{run_name}'")


def _statuses(workspace: dict, run_name: str) -> tuple[str, str]:
    """(child, parent) MLflow statuses of a one-fold run."""
    child = _child_runs(workspace, run_name)[0]
    return child.info.status, _client(workspace).get_run(child.data.tags["mlflow.parentRunId"]).info.status


NOISE = ("creating index", "index created", "Found multiple active Ray instances", "PlacementGroupCleaner",
         "PreemptionWatcher", "A run snapshot was found", "Reporting training result", "Successfully registered model",
         "Created version")


def _steps(workspace: dict, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in _client(workspace).get_metric_history(run_id, key)]


VRP = ["--method", "vrp_sam", "--epochs", "3", "--episodes-per-epoch", "32", "--lr", "5e-4", "--run-name", "vrp"]


@pytest.fixture(scope="module")
def vrp_run(workspace: dict) -> dict:
    result = _train(workspace, *VRP, "--extract-missing", "--evaluate-untrained", "--baseline", "prototype_matching")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"stdout": result.stdout, "stderr": result.stderr, "digest": _tree_digest(workspace["root"] / "stores")}


def test_two_worker_run_lands_in_mlflow_and_the_loss_falls(workspace: dict, vrp_run: dict) -> None:
    from pipeline.training.tracking import model_checkpoint
    from refseg_models.checkpoint import load_inference_checkpoint

    root, out = workspace["root"], vrp_run["stdout"]
    assert "fold 0: test mIoU" in out and "untrained" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in out
    # what the run says: the stores it made, the fold it trains, and the summary last
    assert f"sam feature store {root / 'stores' / 'coco_mini_subset-sam_proxy_mobilenet_v2'}: extracted now" in out
    assert f"training vrp fold 0 on 2 worker(s) (Ray run {root / 'outputs' / 'ray'}/vrp-fold0" in out
    assert out.rstrip().splitlines()[-1] == f"  summary: {root / 'outputs' / 'vrp' / 'summary.json'}"
    noise = [line for line in (out + vrp_run["stderr"]).splitlines() if any(n in line for n in NOISE)]
    assert not noise, noise
    children = _child_runs(workspace, "vrp")
    assert len(children) == 1
    child = children[0]
    client = _client(workspace)
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["refseg.kind"] == "parent" and parent.info.status == child.info.status == "FINISHED"
    # the parent row of the runs table shows its folds' mean under the same names
    assert parent.data.metrics["test_miou"] == child.data.metrics["test_miou"]
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "metrics.`test_untrained_miou`" in experiment.tags["mlflow.sharedViewState.refseg-results"]
    metrics = child.data.metrics
    for key in ("test_miou", "test_fbiou", "test_untrained_miou", "test_prototype_matching_miou", "val_miou",
                "memory/peak_rss_mb", "time/data_share"):
        assert key in metrics, key
    assert any(key.startswith("test_iou/") for key in metrics)
    # the run's training rate: both ranks' episodes of a step over rank 0's step (with its data wait)
    rates = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "time/episodes_per_s")}
    steps = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "time/step_s")}
    waits = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "time/data_s")}
    assert rates and all(rate == pytest.approx(8 / (steps[s] + waits[s]), rel=1e-6) for s, rate in rates.items())
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
    # measured once, before the first step, logged once
    assert [m.step for m in client.get_metric_history(child.info.run_id, "test_untrained_miou")] == [0]
    # the inference model: an MLflow model of the run, registered per method and protocol, loadable weights-only
    model_uri = child.data.tags["refseg.model_uri"]
    assert model_uri == "models:/refseg-vrp_sam-coco20i-1shot-mask/1" and f"    model: {model_uri}" in out
    version = client.get_model_version("refseg-vrp_sam-coco20i-1shot-mask", "1")
    assert version.run_id == child.info.run_id and version.tags["refseg.fold"] == "0"
    assert version.tags["refseg.frozen.sam"].startswith("sam_proxy_mobilenet_v2 (weights sha256 ")
    registered = load_inference_checkpoint(model_checkpoint(model_uri, f"sqlite:///{root / 'mlflow.db'}", root / "model_dl"))
    assert registered.meta["run_name"] == "vrp" and registered.method == "vrp_sam"
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
    stores = workspace["root"] / "stores"
    for store in ("coco_mini_subset-sam_proxy_mobilenet_v2", "coco_mini_subset-mobilenet_v2"):
        assert f"feature store {stores / store}: found, used as is (70 images of " in result.stdout  # and said so
    compare = subprocess.run(
        [str(BIN / "refseg"), "compare", "--experiment", "test", "--root", str(workspace["root"]),
         "--out-dir", str(workspace["root"] / "compare")],
        cwd=workspace["root"], env=workspace["env"], capture_output=True, text=True, timeout=120,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert compare.stdout.startswith("# refseg compare: test_miou (%) per fold on the test episodes, MLflow experiment 'test'")
    for row in ("| vrp_sam (1-shot, mask) | trained | 1 |", "| vrp_sam (1-shot, mask) | untrained | 1 |",
                "| prosam (1-shot, mask) | trained | 1 |", "| prototype_matching (1-shot, mask) | training-free | 1 |"):
        assert row in compare.stdout, row
    assert "the PROXY SAM" in compare.stdout
    assert (workspace["root"] / "compare" / "compare.png").stat().st_size > 0


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, deadline_s: float = 400) -> None:
    deadline = time.monotonic() + deadline_s
    while not any(run_dir.glob("checkpoint_step*")):
        assert process.poll() is None, "the job ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.5)


def _fold_dir(workspace: dict, run_name: str) -> Path:
    return workspace["root"] / "outputs" / "ray" / f"{run_name}-fold0"


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
    assert _statuses(workspace, "workerkill") == ("FINISHED", "FINISHED")


def test_stopped_driver_ends_its_runs_killed_and_resumes_them(workspace: dict, vrp_run: dict) -> None:
    args = ["--method", "vrp_sam", "--epochs", "3", "--episodes-per-epoch", "32", "--run-name", "driverkill"]
    command = [sys.executable, str(REPO / "jobs" / "train_coco20i.py"), *workspace["common"], *args]
    run_dir = _fold_dir(workspace, "driverkill")
    process = subprocess.Popen(command, cwd=workspace["root"], env=workspace["env"], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(run_dir, process)
        os.kill(process.pid, signal.SIGTERM)  # the driver only, as `ray job stop` does
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything of its local Ray still there
        except ProcessLookupError:
            pass
    assert process.returncode == 130, output[-3000:]
    assert re.search(r"interrupted: MLflow run\(s\) \w+, \w+ marked KILLED", output), output[-3000:]
    first = _child_runs(workspace, "driverkill")
    assert len(first) == 1
    assert _statuses(workspace, "driverkill") == ("KILLED", "KILLED")
    checkpointed = _steps(workspace, first[0].info.run_id)
    assert checkpointed and checkpointed[-1] < 12  # stopped mid-run
    step = max(int(p.name.removeprefix("checkpoint_step")) for p in run_dir.glob("checkpoint_step*"))

    # the same command: RUNNING again while it trains, resumed at the checkpoint, FINISHED
    again = subprocess.Popen(command, cwd=workspace["root"], env=workspace["env"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    seen = set()
    while again.poll() is None:
        seen.add(_statuses(workspace, "driverkill"))
        time.sleep(1)
    stdout, stderr = again.communicate()
    assert again.returncode == 0, stderr[-5000:]
    assert ("RUNNING", "RUNNING") in seen and _statuses(workspace, "driverkill") == ("FINISHED", "FINISHED")
    assert f"resuming driverkill fold 0 from step {step} (its last checkpoint in {run_dir}; " in stdout
    assert "to start anew instead, run the same command with --new-run" in stdout
    resumed = _child_runs(workspace, "driverkill")
    assert [r.info.run_id for r in resumed] == [first[0].info.run_id]  # re-attached, no new child run
    assert _steps(workspace, resumed[0].info.run_id) == list(range(1, 13))  # resumed at the checkpoint, no duplicates
    assert "test_miou" in resumed[0].data.metrics
    # once finished, the same command skips the fold
    done = _train(workspace, *args)
    assert done.returncode == 0 and "already finished" in done.stdout


def readme_submit_command() -> list[str]:
    """The `ray job submit` command of the README's "Running on a cluster", as tokens."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on a cluster", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


def test_ray_job_submit_runs_the_readme_command(workspace: dict, vrp_run: dict, coco_mini_dir: Path,
                                                 mobilenet_v2_weights: Path, coco20i_lists_dir: Path) -> None:
    root = workspace["root"]
    port, dashboard = free_port(), free_port()
    # The README's command with the test's data and cluster filled in, the test's size appended.
    filled = {"/abs/refseg-root": str(root), "/abs/instances.json": str(root / "subset.json"),
              "/abs/images": str(coco_mini_dir / "images"), "/abs/mobilenet_v2_imagenet.pth": str(mobilenet_v2_weights),
              "/abs/coco20i_hsnet": str(coco20i_lists_dir), "http://127.0.0.1:8265": f"http://127.0.0.1:{dashboard}"}
    tokens = readme_submit_command()
    assignments = dict(t.split("=", 1) for t in tokens if re.fullmatch(r"[A-Z_]+=\S*", t))
    command = [filled.get(t, t) for t in tokens if t.split("=", 1)[0] not in assignments]
    assert command[:3] == ["ray", "job", "submit"] and "--root" in command and not [t for t in command if "/abs/" in t]
    size = [*workspace["size"], "--epochs", "1", "--episodes-per-epoch", "16", "--run-name", "submitted"]
    env = dict(workspace["env"], PATH=f"{BIN}:{os.environ.get('PATH', '')}", **assignments)
    # Ray's session folder holds AF_UNIX sockets (paths of at most 107 bytes): a short temp dir
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    head_log = (root / "ray_head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--temp-dir", str(temp_dir)],
        env=env, start_new_session=True, stdout=head_log, stderr=subprocess.STDOUT,
    )

    def submit(arguments: list[str]) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 240
        while True:  # the job server answers a few seconds after `ray start` (longer on a loaded machine)
            result = subprocess.run(arguments, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if (result.returncode == 0 or time.monotonic() > deadline or head.poll() is not None
                    or "Connection" not in result.stderr + result.stdout):
                return result
            time.sleep(3)

    try:
        # without --root, every default location is Ray's temporary copy of the working dir: one line, no work
        at = command.index("--root")
        refused = submit(command[:at] + command[at + 2 :] + size)
        assert refused.returncode != 0
        assert "train_coco20i: error: the sam feature store " in refused.stdout, refused.stdout[-3000:]
        assert "would be inside the temporary copy of the working directory" in refused.stdout
        assert "working_dir_files" in refused.stdout and "pass --root" in refused.stdout
        assert "training submitted" not in refused.stdout and "Traceback" not in refused.stdout
        result = submit(command + size)
        head_log.flush()
        assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:], (root / "ray_head.log").read_text()[-3000:])
        assert "succeeded" in result.stdout.lower()
        copies = list(temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies, "no working-dir copy found in the Ray session"
        for copy in copies:  # nothing durable in the temporary copies
            assert not [p for name in ("stores", "outputs", "mlflow.db", "mlruns") for p in copy.glob(name)], copy
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    # where things landed: the root's stores (found, not extracted again), checkpoints, MLflow runs, summary
    for store in ("coco_mini_subset-sam_proxy_mobilenet_v2", "coco_mini_subset-mobilenet_v2"):
        assert f"feature store {root / 'stores' / store}: found, used as is" in result.stdout
    assert _tree_digest(root / "stores") == vrp_run["digest"]
    assert any(_fold_dir(workspace, "submitted").glob("checkpoint_step*"))
    assert json.loads((root / "outputs" / "submitted" / "summary.json").read_text())["run_name"] == "submitted"
    children = _child_runs(workspace, "submitted")
    assert len(children) == 1 and "test_miou" in children[0].data.metrics
    artifacts = _client(workspace).get_run(children[0].info.run_id).info.artifact_uri
    assert artifacts.startswith((root / "mlruns").as_uri())


def test_the_trained_model_beats_the_untrained_one_on_its_training_episodes(workspace: dict, vrp_run: dict, tmp_path: Path) -> None:
    """README's "the model learns": the run's inference checkpoint against the same model before any
    step (the job's seeded initialisation: a worker set up from the fold the run's driver prepared),
    on the training episodes the run drew, in feature space from the run's stores (HSNet's metric over
    the fold's base classes)."""
    import torch

    from pipeline.data.folds import base_classes
    from pipeline.training.config import TrainConfig
    from pipeline.training.evaluate import evaluate_rows
    from pipeline.training.prepared import PreparedRef
    from pipeline.training.worker import setup_worker
    from refseg_models.checkpoint import load_inference_checkpoint

    client = _client(workspace)
    child = _child_runs(workspace, "vrp")[0]
    cfg = TrainConfig.from_dict(json.loads(Path(client.download_artifacts(child.info.run_id, "config.json", str(tmp_path))).read_text()))
    checkpoint = load_inference_checkpoint(client.download_artifacts(child.info.run_id, "model/refseg_model.pt", str(tmp_path)))
    prepared = PreparedRef(child.data.tags["refseg.prepared"], child.data.tags["refseg.prepared_sha256"])
    assert Path(prepared.uri).parent == workspace["root"] / "prepared"  # under the run's --root
    worker = setup_worker(cfg, prepared, 0, 1, torch.device("cpu"))  # seeds and builds the model as the job does
    untrained = worker.model
    trained = setup_worker(cfg, prepared, 0, 1, torch.device("cpu")).model
    trained.load_trainable_state_dict(checkpoint.state_dict, "the run's inference checkpoint")
    sampler = worker.sampler
    rows = [row for epoch in range(cfg.recipe.epochs) for row in sampler.epoch_table(epoch, sampler.samples_per_epoch()).to_pylist()]
    assert len(rows) == 96  # 3 epochs x 32 episodes
    miou = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        meter, _ = evaluate_rows(model, worker.builder(model), rows, base_classes(cfg.dataset, cfg.fold), worker.resolution)
        miou[name] = meter.compute()["miou"]
    print(f"training episodes: mIoU untrained {miou['untrained']:.2f}, trained {miou['trained']:.2f}")
    assert miou["trained"] > miou["untrained"] + 1.0  # points of mIoU
