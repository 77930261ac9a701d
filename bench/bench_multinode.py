"""One node vs two nodes on one machine: the same jobs, the same total resources, submitted the same way.

Both topologies are real ``ray start`` clusters (tests/cluster_helpers.py) with 2 CPU and 2 GPU slots
in all (no real GPU: a slot per encoder actor): one node with both, or a head and a worker with one
of each. Jobs go through ``ray job submit --working-dir .`` with token auth; stores, checkpoints and
MLflow artifacts live on a local S3 server (moto) behind an MLflow server. Every node shares the
machine's cores, so the ratio measures what going multi-node costs (actor start-up and the runtime
env on a second node, object transfers between raylets, S3 round trips), not a speed-up.

    python bench/bench_multinode.py --images 24 --extraction-images 96 --out two_vs_one.json

Prints one JSON line: per topology the extraction's own images/s (its summary, Ray start excluded)
and job wall time, and the training job's wall time and ``trainer.fit`` time (summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from cluster_helpers import BUCKET, RayCluster, base_env, start_mlflow, start_moto  # noqa: E402
from tiny_sam import TINY_SAM, tiny_sam_registered  # noqa: E402


def _subset(coco: Path, n: int, out: Path) -> Path:
    data = json.loads((coco / "instances.json").read_text())
    images = sorted(data["images"], key=lambda image: image["id"])[:n]
    ids = {image["id"] for image in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    out.write_text(json.dumps(data))
    return out


def _random_sam(out: Path) -> Path:
    import torch

    from refseg_models.encoders import build_encoder
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    torch.manual_seed(0)
    with tiny_sam_registered():
        encoder = build_encoder(TINY_SAM, allow_random_init=True)
    torch.save({**encoder.state_dict(), **build_sam_decoder().state_dict()}, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared data folder")
    parser.add_argument("--images", type=int, default=24, help="training: the first N coco_mini images by id")
    parser.add_argument("--extraction-images", type=int, default=24, help="extraction: the first N images by id")
    parser.add_argument("--out")
    args = parser.parse_args()
    coco = Path(args.shared) / "data" / "coco_mini"
    weights = Path(args.shared) / "weights" / "mobilenet_v2_imagenet.pth"
    workdir = Path(tempfile.mkdtemp(prefix="rsbm-"))
    annotations, sam = _subset(coco, args.images, workdir / "subset.json"), _random_sam(workdir / "sam_tiny.pth")
    extraction_annotations = _subset(coco, args.extraction_images, workdir / "extraction_subset.json")

    def extraction(store: str, encoder: str, checkpoint: Path, per_shard: int, images: Path = annotations) -> list[str]:
        runner = ["python", "tests/tiny_sam.py"] if encoder == TINY_SAM else ["python"]  # it registers the tiny SAM
        return [*runner, "jobs/extract_features.py", "--output", f"s3://{BUCKET}/stores/{store}", "--dataset", "bench",
                "--encoder", encoder, "--checkpoint", str(checkpoint), "--coco-annotations", str(images),
                "--image-dir", str(coco / "images"), "--batch-size", "2", "--images-per-shard", str(per_shard),
                "--writer", "actors", "--num-actors", "2", "--actor-num-cpus", "0.5", "--decode-num-cpus", "0.5",
                "--num-gpus-per-actor", "1", "--no-progress"]

    def training(run: str) -> list[str]:
        return ["python", "tests/tiny_sam.py", "jobs/train_coco20i.py", "--root", f"s3://{BUCKET}/root",
                "--annotations", str(annotations), "--images", str(coco / "images"),
                "--feature-dataset", "bench", "--sam-encoder", TINY_SAM, "--sam-checkpoint", str(sam),
                "--sam-store", f"s3://{BUCKET}/stores/sam", "--backbone-checkpoint", str(weights),
                "--backbone-store", f"s3://{BUCKET}/stores/mobilenet", "--folds", "0", "--epochs", "2",
                "--episodes-per-epoch", "8", "--batch-size", "4", "--val-episodes", "4", "--test-episodes", "8",
                "--checkpoints-per-epoch", "2", "--num-workers", "2", "--cpus-per-worker", "1",
                "--storage-path", f"s3://{BUCKET}/ray", "--tracking-uri", mlflow.uri, "--run-name", run,
                "--output-dir", str(workdir / run)]

    def run(cluster: RayCluster, submission_id: str, entrypoint: list[str]) -> tuple[float, str]:
        started = time.monotonic()
        cluster.submit(submission_id, entrypoint)
        info = cluster.wait_job(submission_id, 1800)
        logs = cluster.job_logs(submission_id)
        if info["status"] != "SUCCEEDED":
            raise RuntimeError(f"{submission_id} {info['status']}:\n{logs[-4000:]}")
        return time.monotonic() - started, logs

    s3 = start_moto(workdir)
    mlflow = start_mlflow(workdir, s3)
    results: dict = {"images": args.images, "extraction_images": args.extraction_images, "machine_cpus": os.cpu_count()}
    try:
        for topology, nodes in (("one", [{"CPU": 2, "GPU": 2}]), ("two", [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}])):
            cluster = RayCluster(workdir / topology, {**base_env(), **s3.env}, head_resources=nodes[0])
            (workdir / topology).mkdir()
            try:
                started = time.monotonic()
                cluster.start_head()
                for resources in nodes[1:]:
                    cluster.add_worker(resources)
                row: dict = {"cluster_start_s": time.monotonic() - started}
                if topology == "one":  # the two stores both trainings read
                    row["sam_extraction_job_s"], _ = run(cluster, "sam", extraction("sam", TINY_SAM, sam, 4))
                    run(cluster, "mobilenet", extraction("mobilenet", "mobilenet_v2", weights, 4))
                wall, logs = run(cluster, f"extract-{topology}",
                                 extraction(f"{topology}/mobilenet", "mobilenet_v2", weights, 2, extraction_annotations))
                match = re.search(r"([\d.]+) s, ([\d.]+) images/s", logs)
                row.update(extraction_job_s=wall, extraction_stage_s=float(match.group(1)), extraction_images_per_s=float(match.group(2)))
                wall, _ = run(cluster, f"train-{topology}", training(f"bench-{topology}"))
                summary = json.loads((workdir / f"bench-{topology}" / "summary.json").read_text())
                row.update(training_job_s=wall, training_fit_s=summary["folds"]["0"]["wall_s"])
                results[topology] = row
                print(topology, {k: round(v, 1) for k, v in row.items()}, flush=True)
            finally:
                cluster.stop()
        results["two_over_one"] = {k: results["two"][k] / results["one"][k] for k in results["two"] if k in results["one"]}
    finally:
        mlflow.service.stop()
        s3.service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    line = json.dumps(results)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
