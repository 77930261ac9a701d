"""Are the training workers fed, and does a worker's memory stay flat as the manifest grows?
(issue: training layer; docs/training.md "Benchmarks").

Runs the real training job (``jobs/train_coco20i.py`` through ``run_training``: embedded local Ray,
local MLflow in a temporary folder) on coco_mini against the proxy SAM, VRP-SAM, one epoch, and
reads what the loop logs to MLflow:

* ``time/data_share``: the share of a step a worker spends waiting for its batch (data / (data +
  step)), median over the logged steps, with 1 and with 2 workers (same global batch);
* ``memory/peak_rss_mb``: a training worker's peak RSS (the largest over ranks), with the epoch's
  episode table at N and at 4N episodes (goal: flat, < 10 % growth).

    python bench/bench_training_feed.py --shared ../shared [--episodes 64] [--json out.json]

Prints one JSON object; stores are extracted once into ``--work`` (default outputs/bench_feed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_output import emit, machine  # noqa: E402


def run(shared: Path, work: Path, workers: int, episodes: int) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline.training.commands import add_train_arguments, configs_from_args
    from pipeline.training.job import run_training

    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    tracking = tempfile.mkdtemp(prefix="feed-mlflow-", dir=work)
    args = parser.parse_args([
        "--annotations", str(shared / "data/coco_mini/instances.json"),
        "--images", str(shared / "data/coco_mini/images"),
        "--backbone-checkpoint", str(shared / "weights/mobilenet_v2_imagenet.pth"),
        "--sam-store", str(work / "stores/sam"), "--backbone-store", str(work / "stores/backbone"),
        "--method", "vrp_sam", "--folds", "0", "--epochs", "1", "--episodes-per-epoch", str(episodes),
        "--num-workers", str(workers), "--val-episodes", "8", "--test-episodes", "8", "--log-every", "1",
        "--tracking-uri", f"sqlite:///{tracking}/mlflow.db", "--storage-path", f"{tracking}/ray", "--root", tracking,
        "--extract-missing", "--new-run",
    ])
    base, options = configs_from_args(args, "coco20i")
    summary = run_training(base, options)
    run_id = summary["folds"][0]["run_id"]
    client = MlflowClient(f"sqlite:///{tracking}/mlflow.db")
    share = [m.value for m in client.get_metric_history(run_id, "time/data_share")]
    rss = [m.value for m in client.get_metric_history(run_id, "memory/peak_rss_mb")]
    step = [m.value for m in client.get_metric_history(run_id, "time/step_s")]
    return {"workers": workers, "episodes": episodes, "steps_logged": len(share),
            "data_share_median": round(statistics.median(share), 4) if share else None,
            "step_s_median": round(statistics.median(step), 3) if step else None,
            "peak_rss_mb": round(max(rss), 1) if rss else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_feed")
    parser.add_argument("--episodes", type=int, default=64, help="N (the memory arm also runs 4N)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run(args.shared, args.work, workers, args.episodes) for workers in (1, 2)]
    rows.append(run(args.shared, args.work, 2, 4 * args.episodes))
    small, large = rows[1]["peak_rss_mb"], rows[2]["peak_rss_mb"]
    result = {
        "machine": f"{machine()}, torch threads per worker 1",
        "runs": rows,
        "rss_growth_4x_manifest": round(large / small - 1, 4) if small and large else None,
    }
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
