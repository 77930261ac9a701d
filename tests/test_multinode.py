"""The multi-node paths on one machine: a real two-node Ray cluster, an S3-compatible object store and
an MLflow tracking server, all separate processes on loopback (see tests/cluster_helpers.py).

One module-scoped cluster: a head node and a worker node, each started with ``ray start`` on its own
loopback address with 1 CPU and 1 GPU slot (no real GPU: ``--num-gpus=1`` is a per-node resource, as
on the cluster where each worker has one GPU). That forces work onto both nodes:

* extraction (``--writer actors --num-actors 2 --num-gpus-per-actor 1``): one encoder actor per node,
  each writing whole shards into the shared store on S3 (MobileNetV2, compared with one node; the
  SAM ViT-tiny store the trainings read is made by one actor; the worker-stop run extracts SAM, whose
  seconds per image keep the worker's actor busy when it is stopped);
* training (``--num-workers 2 --cpus-per-worker 1``): one Ray Train worker per node, checkpoints on S3,
  metrics and artifacts through the MLflow server (artifacts proxied into S3).

Jobs are submitted exactly as users do (``ray job submit --runtime-env infra/runtime_env.yaml
--working-dir .``, token authentication on). Stopping the worker node is a SIGKILL of its whole process
group (the machine is gone); a replacement node then joins, as KubeRay or the autoscaler would start
one. The one-node references are the same jobs on an embedded local Ray (``--ray-address local``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from cluster_helpers import BUCKET, REPO, RayCluster, base_env, start_mlflow, start_moto, wait_until
from environment import import_or_missing
from tiny_sam import TINY_SAM, tiny_sam_registered

pytestmark = [pytest.mark.slow, pytest.mark.real_data, pytest.mark.real_weights]
import_or_missing("boto3")

N_IMAGES = 24  # the first 24 coco_mini images by id: 11 base classes with training pairs, 4 novel classes
NODE = {"CPU": 1, "GPU": 1}
DATASET = "coco_mini_sub"
SAM_TINY = TINY_SAM  # registered by tests/tiny_sam.py, which every job using it runs under
# What only says where or how a store was made (not what it holds): left out of manifest comparisons.
WHERE = {"extraction": ("output", "ray_address", "num_actors", "num_gpus_per_actor"), "extract": ("num_actors", "num_gpus_per_actor")}


def _subset(coco_mini_dir: Path, out: Path) -> Path:
    data = json.loads((coco_mini_dir / "instances.json").read_text())
    images = sorted(data["images"], key=lambda image: image["id"])[:N_IMAGES]
    ids = {image["id"] for image in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    out.write_text(json.dumps(data))
    return out


def _random_sam(out: Path) -> Path:
    """No real SAM here: a full SAM-layout checkpoint (image encoder + decoder) with random weights."""
    import torch

    from refseg_models.encoders import build_encoder
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    torch.manual_seed(0)
    with tiny_sam_registered():
        encoder = build_encoder(SAM_TINY, allow_random_init=True)
    torch.save({**encoder.state_dict(), **build_sam_decoder().state_dict()}, out)
    return out


class Stack:
    """Object store + MLflow server + the inputs of every job (module-wide)."""

    def __init__(self, workdir: Path, coco_mini_dir: Path, mobilenet_weights: Path) -> None:
        self.workdir = workdir
        self.annotations = _subset(coco_mini_dir, workdir / "subset.json")
        self.images = coco_mini_dir / "images"
        self.sam = _random_sam(workdir / "sam_tiny.pth")
        self.mobilenet = mobilenet_weights
        self.s3 = start_moto(workdir)
        self.mlflow = None
        self.env = {**base_env(), **self.s3.env}
        self._files: dict[str, dict[str, bytes]] = {}

    def extraction(self, store: str, encoder: str = "mobilenet_v2", gpus_per_actor: int = 1, actors: int = 2) -> list[str]:
        # SAM in batches of 1: its global attention over 64 x 64 tokens takes ~0.5 GB per image in flight.
        checkpoint, per_shard, batch = (self.mobilenet, 2, 2) if encoder == "mobilenet_v2" else (self.sam, 4, 1)
        runner = ["python"] if encoder == "mobilenet_v2" else ["python", "tests/tiny_sam.py"]
        return [
            *runner, "jobs/extract_features.py", "--output", f"s3://{BUCKET}/stores/{store}", "--dataset", DATASET,
            "--encoder", encoder, "--checkpoint", str(checkpoint), "--coco-annotations", str(self.annotations),
            "--image-dir", str(self.images), "--batch-size", str(batch), "--images-per-shard", str(per_shard),
            "--writer", "actors", "--num-actors", str(actors), "--actor-num-cpus", "0.5", "--decode-num-cpus", "0.5",
            "--num-gpus-per-actor", str(gpus_per_actor), "--no-progress",
        ]

    def training(self, run_name: str) -> list[str]:
        return [
            "python", "tests/tiny_sam.py", "jobs/train_coco20i.py", "--root", f"s3://{BUCKET}/root",
            "--annotations", str(self.annotations), "--images", str(self.images),
            "--feature-dataset", DATASET, "--sam-encoder", SAM_TINY, "--sam-checkpoint", str(self.sam),
            "--sam-store", f"s3://{BUCKET}/stores/two/sam", "--backbone-checkpoint", str(self.mobilenet),
            "--backbone-store", f"s3://{BUCKET}/stores/two/mobilenet", "--folds", "0", "--epochs", "2",
            "--episodes-per-epoch", "8", "--batch-size", "4", "--val-episodes", "4", "--test-episodes", "8",
            "--checkpoints-per-epoch", "2", "--num-workers", "2", "--cpus-per-worker", "1", "--max-failures", "3",
            "--storage-path", f"s3://{BUCKET}/ray", "--tracking-uri", self.mlflow.uri, "--run-name", run_name,
            "--output-dir", str(self.workdir / run_name),
        ]

    def store_files(self, store: str) -> dict[str, bytes]:
        """Every object of a finished store (downloaded once: finished stores do not change)."""
        if store not in self._files:
            self._files[store] = self.s3.objects(f"stores/{store}/")
        return self._files[store]

    def stop(self) -> None:
        if self.mlflow is not None:
            self.mlflow.service.stop()
        self.s3.service.stop()


@pytest.fixture(scope="module")
def stack(coco_mini_dir, mobilenet_v2_weights):
    workdir = Path(tempfile.mkdtemp(prefix="rsmn-"))  # short: Ray's socket paths live under it
    stack = Stack(workdir, coco_mini_dir, mobilenet_v2_weights)
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(stack):
    # Faster node-failure detection than the defaults (timing only): the GCS marks a silent node dead
    # after 3 failed health checks 1 s apart.
    env = {**stack.env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    cluster = RayCluster(stack.workdir, env, head_resources=NODE)
    try:
        cluster.start_head()
        mlflow_started = time.monotonic()
        stack.mlflow = start_mlflow(stack.workdir, stack.s3)  # while the worker node starts too
        cluster.add_worker(NODE)
        assert len(cluster.alive_node_ips()) == 2
        cluster.timings = {"mlflow_start_s": time.monotonic() - mlflow_started}
        yield cluster
    finally:
        cluster.stop()


def _run_job(cluster: RayCluster, submission_id: str, entrypoint: list[str], timeout_s: float = 900) -> dict:
    started = time.monotonic()
    cluster.submit(submission_id, entrypoint)
    info = cluster.wait_job(submission_id, timeout_s)
    logs = cluster.job_logs(submission_id)
    assert info["status"] == "SUCCEEDED", f"{submission_id}: {info.get('message')}\n{logs[-6000:]}"
    return {"info": info, "logs": logs, "actors": _actors(cluster, info["job_id"]), "seconds": time.monotonic() - started,
            "driver_ip": cluster.node_ips_by_id().get(info.get("driver_node_id"))}


def _ips(run: dict, class_part: str) -> set[str]:
    return {a["ip"] for a in run["actors"] if class_part in a["class"]}


@pytest.fixture(scope="module")
def two_node(stack, cluster):
    runs = {
        "mobilenet": _run_job(cluster, "extract-two-mobilenet", stack.extraction("two/mobilenet")),
        # the SAM store feeds the trainings (one actor: the test must fit beside other work on 24 GiB)
        "sam": _run_job(cluster, "extract-two-sam", stack.extraction("two/sam", SAM_TINY, actors=1)),
        "train": _run_job(cluster, "train-two", stack.training("mn-two"), timeout_s=1200),
    }
    runs["nodes"] = sorted(cluster.alive_node_ips())
    print("\ntwo-node jobs (s):", {k: round(v["seconds"], 1) for k, v in runs.items() if isinstance(v, dict)}, cluster.timings,
          "extraction stages:", {k: re.findall(r"[\d.]+ s, [\d.]+ images/s", runs[k]["logs"]) for k in ("mobilenet", "sam")})
    return runs


def _mlflow_runs(uri: str, run_name: str) -> dict:
    """The parent and child runs of a training run name, with full metric histories and artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("coco20i")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`refseg.run_name` = '{run_name}'")
    out = {"parents": [], "children": []}
    for run in found:
        kind = run.data.tags.get("refseg.kind")
        history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))]
                   for key in run.data.metrics}

        def artifacts(path=None):
            names = []
            for item in client.list_artifacts(run.info.run_id, path):
                names += artifacts(item.path) if item.is_dir else [item.path]
            return names

        out["parents" if kind == "parent" else "children"].append(
            {"run_id": run.info.run_id, "status": run.info.status, "history": history, "artifacts": sorted(artifacts()),
             "tags": {k: v for k, v in run.data.tags.items() if k.startswith("refseg.fold")}, "experiment": experiment.experiment_id}
        )
    return out


def _comparable(files: dict[str, bytes]) -> dict[str, object]:
    """Store objects as what must be equal: bytes, except the stats (minus timing, the writing run's
    identity and its writer settings) and the manifest (minus where/how it ran)."""
    out: dict[str, object] = {}
    for name, data in files.items():
        if name.endswith("_stats.json"):
            stats = json.loads(data)
            stats.pop("duration_s")
            stats.pop("run", None)  # which run wrote it (run id, host, pid, its command line): differs by design
            stats.pop("writer", None)  # the writing actor's threads / batch: per node layout (the bytes must not depend on it)
            out[name] = stats
        elif name == "manifest.json":
            manifest = json.loads(data)
            for section, keys in WHERE.items():  # older manifests recorded the run's configuration
                for key in keys:
                    manifest.get("config", {}).get(section, {}).pop(key, None)
            manifest.pop("writer_settings", None)  # the actors' threads / batches: per node layout, as in the stats
            out[name] = manifest
        else:
            out[name] = data
    return out


def _s3fs(stack):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=stack.s3.endpoint.split("//", 1)[1], scheme="http", access_key="testing",
                             secret_key="testing", region="us-east-1")


def test_extraction_uses_both_nodes_and_writes_complete_stores(stack, two_node):
    from pipeline.store import open_store, verify_store

    assert _ips(two_node["mobilenet"], "_ShardActor") == set(two_node["nodes"]), two_node["mobilenet"]["actors"]  # one per node
    for role, shards in (("mobilenet", 12), ("sam", 6)):
        store = open_store(f"s3://{BUCKET}/stores/two/{role}", filesystem=_s3fs(stack))
        assert len(store) == N_IMAGES and store.manifest.num_failed == 0 and len(store.manifest.shards) == shards
        files = stack.store_files(f"two/{role}")
        assert not [name for name in files if "partial" in name or name.endswith(".tmp")]
        stats = [json.loads(v) for k, v in files.items() if k.endswith("_stats.json")]
        assert len(stats) == shards and sum(s["written"] for s in stats) == N_IMAGES
        print(f"\n{role} store: {sum(s['bytes'] for s in stats) / N_IMAGES:.0f} bytes per image")
    assert verify_store(f"s3://{BUCKET}/stores/two/mobilenet", filesystem=_s3fs(stack)).ok  # every entry read back


def test_training_uses_both_nodes_with_shared_checkpoints_and_tracking(stack, two_node):
    run = two_node["train"]
    assert _ips(run, "RayTrainWorker") == set(two_node["nodes"]), run["actors"]  # one rank per node
    assert "fold 0: test mIoU" in run["logs"]
    tracked = _mlflow_runs(stack.mlflow.uri, "mn-two")
    assert len(tracked["parents"]) == 1 and len(tracked["children"]) == 1
    child = tracked["children"][0]
    assert child["status"] == "FINISHED" and tracked["parents"][0]["status"] == "FINISHED"
    assert [step for step, _ in child["history"]["val_miou"]] == [1, 2, 3, 4]
    # Ray Train checkpoints on the object store; MLflow artifacts proxied by the server into it
    checkpoints = [k for k in stack.s3.keys("ray/mn-two-fold0/") if k.endswith("state.pt")]
    assert checkpoints, stack.s3.keys("ray/")
    artifacts = stack.s3.keys(f"mlflow/{child['experiment']}/{child['run_id']}/artifacts/")
    assert {"config.json", "model/refseg_model.pt", "test/results.json"} <= set(artifacts)
    assert set(artifacts) == set(child["artifacts"])


def _actors(cluster: RayCluster, job_id: str) -> list[dict]:
    ips = cluster.node_ips_by_id()
    return [{"class": a["class_name"], "ip": ips.get(a["node_id"]), "state": a["state"], "pid": a.get("pid"),
             "id": a["actor_id"], "restarts": int(a.get("num_restarts") or 0)} for a in cluster.actors(job_id)]


def _stop_worker_while(cluster: RayCluster, submission_id: str, entrypoint: list[str], ready, timeout_s: float = 900,
                       needs_replacement: bool = False) -> dict:
    """Submit, wait for ``ready(job_id)``, SIGKILL the worker node, check the job survives the loss,
    start a replacement worker node (as KubeRay or the autoscaler would), wait for the job to end.
    ``needs_replacement``: the job cannot finish on the head alone (it must still be running then)."""
    started = time.monotonic()
    cluster.submit(submission_id, entrypoint)

    def ready_or_ended() -> bool:
        job = cluster.job(submission_id)
        if job["status"] not in ("PENDING", "RUNNING"):
            return True
        return job["status"] == "RUNNING" and bool(job.get("job_id")) and ready(job["job_id"])  # the driver is up

    wait_until(ready_or_ended, timeout_s, f"{submission_id}: the point to stop the worker", interval_s=0.25)
    job = cluster.job(submission_id)
    assert job["status"] == "RUNNING", cluster.job_logs(submission_id)[-4000:]
    before = _actors(cluster, job["job_id"])
    victim = cluster.nodes[-1]
    victim.service.kill()
    killed_at = time.monotonic()
    wait_until(lambda: victim.ip not in cluster.alive_node_ips(), 120, "the lost node marked dead")
    detected_at = time.monotonic()
    time.sleep(3)
    status = cluster.job(submission_id)["status"]
    assert status in (("RUNNING",) if needs_replacement else ("RUNNING", "SUCCEEDED")), f"after the node loss: {status}"
    replacement = cluster.add_worker(NODE)
    replaced_at = time.monotonic()
    info = cluster.wait_job(submission_id, timeout_s)
    logs = cluster.job_logs(submission_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    timeline = {"killed_after_s": killed_at - started, "detected_after_kill_s": detected_at - killed_at,
                "replacement_up_after_kill_s": replaced_at - killed_at, "finished_after_kill_s": time.monotonic() - killed_at}
    print(f"\n{submission_id}:", {k: round(v, 1) for k, v in timeline.items()})
    ips = cluster.node_ips_by_id()
    return {"info": info, "logs": logs, "before": before, "actors": _actors(cluster, info["job_id"]), "lost": victim.ip,
            "replacement": replacement.ip, "timeline": timeline, "driver_ip": ips.get(info.get("driver_node_id"))}


def test_worker_stop_mid_extraction_loses_and_duplicates_nothing(stack, cluster, two_node):
    from pipeline.store import open_store, verify_store

    scratch = Path(tempfile.gettempdir())  # where an encoder actor writes the shard it is on (writer=actors, S3 store)
    seen: dict[str, object] = {}

    def worker_actor_mid_shard(job_id: str) -> bool:
        # Stop the worker while its encoder actor is writing a shard (its scratch tar exists), the
        # head's actor being alive too: the lost node takes work in flight with it.
        victim = cluster.nodes[-1].ip
        encoders = [a for a in _actors(cluster, job_id) if "_ShardActor" in a["class"] and a["state"] == "ALIVE"]
        if {a["ip"] for a in encoders} != {cluster.head_ip, victim}:
            return False
        (pid,) = [a["pid"] for a in encoders if a["ip"] == victim]
        partial = sorted(scratch.glob(f"refseg-scratch-*/shard-*.partial-{pid}"))
        if partial:
            seen["shard"], seen["actor"] = partial[0].name.split(".")[0], next(a["id"] for a in encoders if a["ip"] == victim)
            seen["scratch"] = partial[0].parent
        return bool(partial)

    try:  # SAM (seconds per image): the worker's actor starts later than the head's, yet surely gets shards
        run = _stop_worker_while(cluster, "extract-stop", stack.extraction("stop/sam", SAM_TINY), worker_actor_mid_shard)
    finally:  # a killed actor leaves its scratch tar behind (docs/feature_store.md)
        if "scratch" in seen:
            shutil.rmtree(seen["scratch"], ignore_errors=True)
    assert run["driver_ip"] == cluster.head_ip  # the driver lives on the head, which runs no encoder of the lost node
    assert {a["ip"] for a in run["before"] if "_ShardActor" in a["class"]} == {cluster.head_ip, run["lost"]}, run["before"]
    # the lost actor was restarted by Ray (on whichever node had room) and its shard redone
    (restarted,) = [a for a in run["actors"] if a["id"] == seen["actor"]]
    assert restarted["restarts"] >= 1 and restarted["ip"] != run["lost"], restarted
    uri = f"s3://{BUCKET}/stores/stop/sam"
    store = open_store(uri, filesystem=_s3fs(stack))
    assert f"{seen['shard']}_stats.json" in stack.s3.keys("stores/stop/sam/")
    assert sorted(store.image_ids) == sorted(open_store(f"s3://{BUCKET}/stores/two/sam", filesystem=_s3fs(stack)).image_ids)
    assert len(store.image_ids) == len(set(store.image_ids)) == N_IMAGES  # every image exactly once
    assert verify_store(uri, filesystem=_s3fs(stack)).ok
    # byte-identical to the uninterrupted store (made by one actor: the bytes depend on batches and threads only)
    assert _comparable(stack.store_files("stop/sam")) == _comparable(stack.store_files("two/sam"))


def test_worker_stop_mid_training_resumes_without_losing_or_repeating_steps(stack, cluster, two_node):
    def first_checkpoint_registered(job_id: str) -> bool:
        # Stop the worker once the Train controller has registered checkpoint 1 (the ranks are in step 2).
        snapshot = stack.s3.read("ray/mn-stop-fold0/checkpoint_manager_snapshot.json")
        return snapshot is not None and b"checkpoint_step0000001" in snapshot

    run = _stop_worker_while(cluster, "train-stop", stack.training("mn-stop"), first_checkpoint_registered, timeout_s=1200,
                             needs_replacement=True)  # two ranks of 1 CPU: the head alone has 1
    # a rank on each node when the worker was lost; a new worker group (one rank on the replacement) resumed
    assert {a["ip"] for a in run["before"] if "RayTrainWorker" in a["class"]} == {cluster.head_ip, run["lost"]}, run["before"]
    workers = [a for a in run["actors"] if "RayTrainWorker" in a["class"]]
    assert len(workers) == 4 and {a["ip"] for a in workers} == {cluster.head_ip, run["lost"], run["replacement"]}, workers
    stopped, clean = _mlflow_runs(stack.mlflow.uri, "mn-stop"), _mlflow_runs(stack.mlflow.uri, "mn-two")
    assert len(stopped["parents"]) == 1 and len(stopped["children"]) == 1  # no second child run for the restart
    child, reference = stopped["children"][0], clean["children"][0]
    assert child["status"] == "FINISHED" and child["tags"] == reference["tags"]
    assert child["history"].keys() == reference["history"].keys()
    for key, points in reference["history"].items():  # every step logged exactly once, as uninterrupted
        assert [s for s, _ in child["history"][key]] == [s for s, _ in points], key
        if not key.startswith(("time/", "memory/")):
            assert child["history"][key] == points, key
    assert child["artifacts"] == reference["artifacts"]


@pytest.fixture(scope="module")
def one_node(stack, cluster, two_node):
    """The same jobs on one node (an embedded local Ray), after the cluster is gone."""
    import subprocess

    cluster.stop()
    # Loopback only: with this, a local Ray uses 127.0.0.1 instead of the machine's network address.
    env = {**stack.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = {}
    for name, entrypoint in (
        ("mobilenet", stack.extraction("one/mobilenet", gpus_per_actor=0)),
        ("train", stack.training("mn-one")),
    ):
        started = time.monotonic()
        result = subprocess.run([*entrypoint, "--ray-address", "local"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        out[name] = time.monotonic() - started
        out[f"{name}_stage"] = re.findall(r"[\d.]+ s, [\d.]+ images/s", result.stdout)
    print("\none-node runs (s):", out)
    return out


def test_two_nodes_give_the_same_results_as_one_node(stack, two_node, one_node):
    assert _comparable(stack.store_files("one/mobilenet")) == _comparable(stack.store_files("two/mobilenet"))
    one, two = _mlflow_runs(stack.mlflow.uri, "mn-one")["children"][0], _mlflow_runs(stack.mlflow.uri, "mn-two")["children"][0]
    assert one["history"].keys() == two["history"].keys()
    for key, points in two["history"].items():
        if not key.startswith(("time/", "memory/")):
            assert one["history"][key] == points, key
    assert one["history"]["test_miou"] == two["history"]["test_miou"]
