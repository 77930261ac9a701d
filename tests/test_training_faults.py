"""Faults in a training run's inputs, end to end as users run the job (issue 20): each ends the run
at once with exit 2 and one error line naming the damaged file, is never retried by Ray Train, and
records no result. Subprocess runs of jobs/train_coco20i.py on a 70-image COCO subset (2 workers):

* a flipped byte in every payload of the SAM store: found by the first read inside Ray (crc32),
  one line naming shard, image and feature, the traceback in the log file it names;
* a truncated SAM shard: refused before Ray starts (size against the manifest);
* a truncated latest training checkpoint on resume: refused inside Ray, naming the file.

The same paths without a cluster: tests/test_training_failures.py, tests/test_store_readwrite.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from coco_helpers import coco_subset
from kill_process import kill_group_when

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
RETRY_NOTE = "Ray Train restarts the workers"  # pipeline.training.failures.StopOnUserError's line for a retry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, coco_mini_dir: Path, mobilenet_v2_weights: Path) -> dict:
    root = tmp_path_factory.mktemp("faults")
    coco_subset(coco_mini_dir / "instances.json", 70, root / "subset.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", REFSEG_CODE_VERSION="refseg-test")
    env.pop("RAY_ADDRESS", None)
    common = [
        sys.executable, str(REPO / "jobs" / "train_coco20i.py"),
        "--annotations", str(root / "subset.json"), "--images", str(coco_mini_dir / "images"),
        "--feature-dataset", "coco_mini_subset", "--backbone-checkpoint", str(mobilenet_v2_weights),
        "--backbone-store", str(root / "stores" / "backbone"), "--folds", "0", "--val-episodes", "8",
        "--test-episodes", "16", "--num-workers", "2", "--cpus-per-worker", "1",
        "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--storage-path", str(root / "ray"),
        "--experiment", "test", "--log-every", "1", "--method", "vrp_sam", "--episodes-per-epoch", "32",
    ]
    return {"root": root, "env": env, "common": common}


def _command(workspace: dict, run_name: str, sam_store: Path, epochs: int = 3) -> list[str]:
    return [*workspace["common"], "--sam-store", str(sam_store), "--run-name", run_name, "--epochs", str(epochs)]


def _ray_latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train resumes from (its snapshot of registered checkpoints), if any."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return run_dir / latest["checkpoint_dir_name"] if latest else None


@pytest.fixture(scope="module")
def interrupted(workspace: dict) -> dict:
    """Both stores extracted, and a run killed (driver and the local Ray it started) once Ray Train
    registered its first checkpoint: a run to resume."""
    sam_store = workspace["root"] / "stores" / "sam"
    run_dir = workspace["root"] / "ray" / "resumed-fold0"
    kill_group_when([*_command(workspace, "resumed", sam_store), "--extract-missing"],
                    lambda: _ray_latest_checkpoint(run_dir) is not None, "the first registered checkpoint",
                    deadline_s=600, poll_s=0.5, cwd=workspace["root"], env=workspace["env"])
    return {"sam_store": sam_store, "run_dir": run_dir}


def _run(workspace: dict, command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(command, cwd=workspace["root"], env=workspace["env"], capture_output=True, text=True,
                            timeout=900)
    return result, time.monotonic() - started


# Ray Train's placement-group cleaner (a detached actor of every run) finds the cluster through Ray's
# state API without an address and dies with a traceback when several Ray instances run on one
# machine, as on a shared test machine; it is not part of the failure path tested here.
_OTHER_CLUSTERS_NOISE = "(PlacementGroupCleaner pid="


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one error line; no traceback and no Ray Train retry anywhere in its output."""
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if _OTHER_CLUSTERS_NOISE not in line)
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_coco20i: error:")]
    assert result.returncode == 2 and len(errors) == 1, output[-4000:]
    assert "Traceback" not in output and RETRY_NOTE not in output, output[-4000:]
    return errors[0]


def _fold_run(workspace: dict, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`refseg.kind` = 'fold' and tags.`refseg.run_name` = '{run_name}'")
    return client, runs


def test_a_flipped_payload_byte_ends_the_run_at_once_naming_shard_image_and_feature(workspace, interrupted):
    from pipeline.store import open_store

    corrupt = workspace["root"] / "stores" / "sam-corrupt"
    shutil.copytree(interrupted["sam_store"], corrupt)
    store = open_store(str(corrupt))
    path = corrupt / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    for rows in store._rows.values():  # one flipped byte in every payload: whichever is read first
        _, offset, size, _ = rows["image_embedding"]
        data[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result, _ = _run(workspace, _command(workspace, "corrupt", corrupt, epochs=1))
    line = _error_line(result)
    assert re.search(rf"{corrupt}/shard-000000.tar image '\d+' feature 'image_embedding' is corrupted \(crc32 ", line)
    log = Path(re.search(r"traceback in (\S+);", line).group(1))
    assert "Traceback" in log.read_text() and "checked_view" in log.read_text()
    client, runs = _fold_run(workspace, "corrupt")
    assert len(runs) == 1 and "test_miou" not in runs[0].data.metrics  # nothing trained on it, no result
    assert not client.list_artifacts(runs[0].info.run_id, "model")


def test_a_truncated_shard_is_refused_before_ray_starts(workspace, interrupted):
    truncated = workspace["root"] / "stores" / "sam-truncated"
    shutil.copytree(interrupted["sam_store"], truncated)
    shard = truncated / "shard-000000.tar"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    result, seconds = _run(workspace, _command(workspace, "truncated", truncated, epochs=1))
    line = _error_line(result)
    assert line == (f"train_coco20i: error: feature store {truncated}: shard {shard} is {size // 2} bytes, its manifest "
                    f"says {size} (truncated or overwritten); `refseg verify {truncated}` lists every problem; extract "
                    "the store again into a new location")
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert _fold_run(workspace, "truncated")[1] == []  # checked before any MLflow run exists


def test_a_truncated_latest_checkpoint_is_refused_naming_it(workspace, interrupted):
    checkpoint = _ray_latest_checkpoint(interrupted["run_dir"])
    state = checkpoint / "state.pt"
    os.truncate(state, state.stat().st_size // 3)
    result, _ = _run(workspace, _command(workspace, "resumed", interrupted["sam_store"]))
    line = _error_line(result)
    assert f"training checkpoint {state} is truncated or corrupt (" in line and "start it anew (--new-run)" in line
    _, runs = _fold_run(workspace, "resumed")
    assert len(runs) == 1 and "test_miou" not in runs[0].data.metrics
