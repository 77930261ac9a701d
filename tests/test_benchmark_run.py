"""``refseg benchmark`` end to end, as a user runs it (a subprocess, killed): a micro table (VRP-SAM x
COCO-20i fold 0 x 2 seeds x mask references + the prototype-matching baseline, a very short schedule
on a 40-image COCO subset against the proxy SAM) extracts its two stores once, is SIGKILLed (with its
whole process group) right after its first cell finished, and the same command then resumes it: the
finished cell is not trained again (same MLflow run, no new step), the other one runs, and the
table's numbers are the MLflow runs' numbers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, coco_mini_dir: Path, mobilenet_v2_weights: Path) -> dict:
    root = tmp_path_factory.mktemp("benchmark")
    data = json.loads((coco_mini_dir / "instances.json").read_text())
    keep = {image["id"] for image in sorted(data["images"], key=lambda i: i["id"])[:40]}
    subset = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    (root / "subset.json").write_text(json.dumps(subset))
    table = {
        "name": "micro", "methods": ["vrp_sam"], "baselines": ["prototype_matching"], "folds": [0], "seeds": [0, 1],
        "reference_types": ["mask"], "published": str(REPO / "benchmarks" / "published.yaml"),
        "data": {"annotations": str(root / "subset.json"), "images": str(coco_mini_dir / "images"), "feature_dataset": "coco_sub40"},
        "encoders": {"backbone": {"encoder": "mobilenet_v2", "checkpoint": str(mobilenet_v2_weights)}},
        "training": {"recipe": {"epochs": 1, "lr": 0.0005}, "episodes_per_epoch": 8, "val_episodes": 4, "test_episodes": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }
    (root / "micro.yaml").write_text(yaml.safe_dump(table))
    env = dict(os.environ, PYTHONUNBUFFERED="1", REFSEG_CODE_VERSION="refseg-test")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "REFSEG_ROOT"):
        env.pop(name, None)
    command = [sys.executable, str(REPO / "jobs" / "benchmark.py"), str(root / "micro.yaml"), "--root", str(root)]
    return {"root": root, "env": env, "command": command}


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _fold_runs(root: Path, run_name: str) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("benchmark-micro")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              f"tags.`refseg.kind` = 'fold' and tags.`refseg.run_name` = '{run_name}'")


def test_a_killed_benchmark_resumes_and_its_table_is_the_mlflow_record(workspace: dict) -> None:
    from pipeline.benchmark.cells import expand_cells
    from pipeline.benchmark.spec import load_table

    root = workspace["root"]
    first, second = expand_cells(load_table(root / "micro.yaml"), str(root)).training
    process = subprocess.Popen(workspace["command"], cwd=root, env=workspace["env"], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        # the benchmark starts its second cell right after recording the first one as finished: kill it then
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"cell {second.key}: training (or resuming)"):
                os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started
                break
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, output[-4000:]
    (finished_first,) = _fold_runs(root, first.run_name)
    assert finished_first.info.status == "FINISHED" and "test_miou" in finished_first.data.metrics
    assert output.count("extracted once, for every cell") == 2  # both stores, before the first cell
    assert not [r for r in _fold_runs(root, second.run_name) if r.info.status == "FINISHED"]  # killed before the second finished
    steps_before = [m.step for m in _client(root).get_metric_history(finished_first.info.run_id, "train/loss")]

    again = subprocess.run(workspace["command"], cwd=root, env=workspace["env"], capture_output=True, text=True, timeout=420)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"cell {first.key}: finished already (MLflow run {finished_first.info.run_id}" in again.stdout
    assert f"cell {second.key}: training (or resuming)" in again.stdout
    assert "extracted once" not in again.stdout  # the stores were kept
    runs = {cell.key: _fold_runs(root, cell.run_name) for cell in (first, second)}
    assert [r.info.run_id for r in runs[first.key]] == [finished_first.info.run_id]  # not trained again
    assert [m.step for m in _client(root).get_metric_history(finished_first.info.run_id, "train/loss")] == steps_before
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in runs.values())

    # the table's numbers are the MLflow runs' numbers
    out = root / "outputs" / "benchmark" / "micro"
    rows = {(r["method"], r["kind"]): r for r in csv.DictReader((out / "table.csv").open())}
    trained = sorted(r[0].data.metrics["test_miou"] for r in runs.values())
    row = rows[("vrp_sam", "trained")]
    assert sorted(float(v) for v in row["values"].split()) == pytest.approx(trained, abs=1e-5)
    assert float(row["miou_mean"]) == pytest.approx(sum(trained) / 2) and row["n_seeds"] == "2" and row["miou_std"] != ""
    baseline = {r[0].data.metrics["test_prototype_matching_miou"] for r in runs.values()}
    assert len(baseline) == 1  # the same test episodes in both cells
    assert float(rows[("prototype_matching", "training-free")]["miou_mean"]) == pytest.approx(baseline.pop())
    assert row["setting"].startswith("not comparable: proxy SAM")  # from the recorded frozen identities
    assert float(row["paper"]) == 48.1 and float(row["diff"]) == pytest.approx(float(row["miou_mean"]) - 48.1)
    for run in (r[0] for r in runs.values()):
        assert run.data.tags["refseg.benchmark"] == "micro" and run.data.metrics["cost/wall_s"] > 0
        assert run.data.metrics["test_episodes_evaluated"] == 8 and run.data.metrics["test_episodes_failed"] == 0
    # MLflow layout: the benchmark run, the configurations' parent runs under it, one registered model per cell
    client = _client(root)
    (bench,) = client.search_runs([runs[first.key][0].info.experiment_id], "tags.`refseg.kind` = 'benchmark'")
    assert bench.info.status == "FINISHED" and {"table/table.md", "table/table.csv", "table/table.png", "table/models.csv"} <= {
        a.path for a in client.list_artifacts(bench.info.run_id, "table")}
    for run in (r[0] for r in runs.values()):
        assert client.get_run(run.data.tags["mlflow.parentRunId"]).data.tags["mlflow.parentRunId"] == bench.info.run_id
    models = client.search_model_versions("tags.`refseg.benchmark` = 'micro'")
    assert sorted((m.tags["refseg.fold"], m.tags["refseg.seed"]) for m in models) == [("0", "0"), ("0", "1")]
