"""infra/ is checked, not just written: every YAML against the schema of what reads it, the jobs'
command lines against the jobs' own parsers, the image's pins against constraints.txt, and the upload
filter with Ray's own packaging code. Fast (no cluster, no network); see tests/infra_checks.py."""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from infra_checks import kuberay_problems, launcher_problems, manifest_problems

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE = "registry.example.com/refseg:0.1.0"
CODE_IN_IMAGE = "/home/ray/refseg/"  # WORKDIR of infra/Dockerfile
SHARED_MOUNT = "/mnt/refseg"
LAUNCHERS = ("cluster-aws.yaml", "cluster-gcp.yaml")
MANIFESTS = ("base.yaml", "raycluster-dev.yaml", "rayjob-extract.yaml", "rayjob-train-fold.yaml", "mlflow-server.yaml")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def _pinned_requirements(command: str) -> dict[str, str]:
    """``name==version`` arguments of a ``pip install`` command line."""
    return {_norm(token.split("==")[0]): token.split("==")[1] for token in shlex.split(command) if "==" in token}


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if d]


def _all_documents() -> list[dict]:
    return [d for name in MANIFESTS for d in _documents(name)]


def _cluster_spec(document: dict) -> dict:
    return document["spec"]["rayClusterSpec"] if document["kind"] == "RayJob" else document["spec"]


def _ray_documents() -> list[dict]:
    return [d for d in _all_documents() if d["apiVersion"] == "ray.io/v1"]


# -- the Ray cluster launcher files ---------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_file_passes_rays_validation_and_the_cloud_api(name):
    config = yaml.safe_load((INFRA / name).read_text())
    assert launcher_problems(config) == []


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_file_has_a_cpu_head_gpu_workers_autoscaling_bounds_and_token_auth(name):
    config = yaml.safe_load((INFRA / name).read_text())
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    for worker in workers:
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert config["docker"]["image"] == IMAGE
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    pins = _pins()
    for command in config["head_setup_commands"]:  # what the head's autoscaler needs, at the tested version
        assert "-c /home/ray/refseg/constraints.txt" in command
        assert all(pins[package] == version for package, version in _pinned_requirements(command).items())


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("cluster-aws.yaml", lambda c: c.update(max_worker=3), "'max_worker' was unexpected"),
        ("cluster-aws.yaml", lambda c: c["available_node_types"]["gpu"]["node_config"].update(InstanceTyp="g5.xlarge"),
         "InstanceTyp: not a field"),
        ("cluster-aws.yaml", lambda c: c["available_node_types"]["gpu"]["node_config"].update(min_workers=1),
         "min_workers: not a field"),  # a node-type field put inside node_config
        ("cluster-aws.yaml", lambda c: c["available_node_types"]["gpu"]["node_config"].update(InstanceType="g5.2xlarg"),
         "is not one of EC2's InstanceType values"),
        ("cluster-gcp.yaml", lambda c: c["available_node_types"]["gpu"]["node_config"].update(machineTyp="g2-standard-8"),
         "machineTyp: not a field of Instance"),
        ("cluster-gcp.yaml", lambda c: c["available_node_types"]["gpu"]["node_config"]["scheduling"].update(preemptible="yes"),
         "expected true/false"),
        ("cluster-gcp.yaml", lambda c: c["available_node_types"]["gpu"].update(min_workers=9), "smaller than the sum of `min_workers`"),
    ],
)
def test_launcher_checks_catch_wrong_and_misplaced_fields(name, change, expected):
    config = yaml.safe_load((INFRA / name).read_text())
    change(config)
    assert any(expected in problem for problem in launcher_problems(config)), launcher_problems(config)


# -- the Kubernetes manifests ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid(name):
    for document in _documents(name):
        assert manifest_problems(document) == [], document["kind"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda j: j["spec"]["rayClusterSpec"].update(shutdownAfterJobFinishes=True), "'shutdownAfterJobFinishes' was unexpected"),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(rayStartParams={}),
         "'rayStartParams' was unexpected"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(resource={}),
         "'resource' was unexpected"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 1}),
         "is not of type 'string'"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"), "'maxReplicas' is a required property"),
        (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "is not one of ['disabled', 'token']"),
        (lambda j: j["metadata"].update(label={"a": "b"}), "'label' was unexpected"),
    ],
)
def test_kuberay_checks_catch_wrong_and_misplaced_fields(change, expected):
    (job,) = _documents("rayjob-train-fold.yaml")
    job = copy.deepcopy(job)
    change(job)
    assert any(expected in problem for problem in kuberay_problems(job)), kuberay_problems(job)


def test_ray_clusters_cpu_head_gpu_workers_token_auth_pinned_image_shared_storage():
    ray_version = _pins()["ray"]
    accounts = {d["metadata"]["name"] for d in _documents("base.yaml") if d["kind"] == "ServiceAccount"}
    claims = {d["metadata"]["name"] for d in _documents("base.yaml") if d["kind"] == "PersistentVolumeClaim"}
    documents = _ray_documents()
    assert {d["kind"] for d in documents} == {"RayCluster", "RayJob"}
    for document in documents:
        spec = _cluster_spec(document)
        assert spec["rayVersion"] == ray_version
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no work
        groups = spec["workerGroupSpecs"]
        assert groups and all(0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]
        for template in templates:
            pod = template["spec"]
            assert pod["serviceAccountName"] in accounts
            (container,) = pod["containers"]
            assert container["image"] == IMAGE
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] in claims
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        for group in groups:
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjobs_shut_their_cluster_down_and_carry_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    for job in [d for d in _ray_documents() if d["kind"] == "RayJob"]:
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert set(runtime_env) <= set(RuntimeEnv.known_fields)
        RuntimeEnv(**runtime_env)  # Ray's own checks (types of env_vars, ...)
        assert "working_dir" not in runtime_env and "pip" not in runtime_env  # the image holds code and stack


def _entrypoint_commands(job: dict) -> list[tuple[str, argparse.Namespace]]:
    """(job script, its arguments parsed by the job's own parser) for each command of the entrypoint."""
    from pipeline.extraction.commands import add_extract_arguments
    from pipeline.training.commands import add_train_arguments

    out = []
    for command in job["spec"]["entrypoint"].split("&&"):
        python, script, *args = shlex.split(command)
        assert python == "python" and script.startswith(CODE_IN_IMAGE), command
        relative = script[len(CODE_IN_IMAGE):]
        assert (REPO / relative).is_file(), relative
        parser = argparse.ArgumentParser(prog=relative, exit_on_error=False)
        if relative == "jobs/extract_features.py":
            add_extract_arguments(parser)
        elif relative == "jobs/train_coco20i.py":
            add_train_arguments(parser, "coco20i")
        else:
            raise AssertionError(f"no parser known for {relative}")
        out.append((relative, parser.parse_args(args)))
    return out


def _gpus(job: dict) -> int:
    return sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def _paths_are_shared(values) -> None:
    for value in values:
        if value:
            assert value.startswith((SHARED_MOUNT + "/", "s3://", "http://")), value


def test_rayjob_entrypoints_parse_and_the_training_reads_what_extraction_writes():
    from pipeline.extraction.commands import config_from_args

    (extract_job,) = _documents("rayjob-extract.yaml")
    (train_job,) = _documents("rayjob-train-fold.yaml")
    extracted = {}
    for script, args in _entrypoint_commands(extract_job):
        assert script == "jobs/extract_features.py"
        config = config_from_args(args)  # the job's own validation
        assert config.writer == "actors" and config.num_gpus_per_actor == 1  # multi-node writer, one actor per GPU
        assert config.num_actors <= _gpus(extract_job)
        _paths_are_shared([config.output, config.checkpoint, config.coco_annotations, config.image_dir])
        extracted[config.encoder] = config
    ((script, args),) = _entrypoint_commands(train_job)
    assert script == "jobs/train_coco20i.py"
    assert args.use_gpu and args.num_workers <= _gpus(train_job)
    worker_cpus = int(train_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                      ["resources"]["limits"]["cpu"])
    assert args.cpus_per_worker <= worker_cpus
    for encoder, checkpoint, store in ((args.sam_encoder, args.sam_checkpoint, args.sam_store),
                                       (args.backbone, args.backbone_checkpoint, args.backbone_store)):
        made = extracted[encoder]  # the store exists, with this encoder's weights, under this dataset name
        assert (made.output, made.checkpoint, made.dataset) == (store, checkpoint, args.feature_dataset)
    assert made.coco_annotations == args.annotations and made.image_dir == args.images
    _paths_are_shared([args.annotations, args.images, args.lists_dir, args.storage_path, args.tracking_uri])
    assert args.storage_path.startswith("s3://")
    service = next(d for d in _documents("mlflow-server.yaml") if d["kind"] == "Service")
    assert args.tracking_uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_mlflow_server_has_a_database_backend_object_store_artifacts_and_allows_its_service_name():
    documents = {d["kind"]: d for d in _documents("mlflow-server.yaml")}
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = dict(zip(container["args"][::2], container["args"][1::2]))
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"  # Postgres URI from a Secret
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "uri"
    assert args["--artifacts-destination"].startswith("s3://")  # proxied: clients need no bucket credentials
    name, port = documents["Service"]["metadata"]["name"], documents["Service"]["spec"]["ports"][0]["port"]
    assert {name, f"{name}:{port}"} <= set(args["--allowed-hosts"].split(","))
    assert container["image"].endswith(f":{_pins()['mlflow']}")
    assert documents["NetworkPolicy"]["spec"]["podSelector"] == documents["Deployment"]["spec"]["selector"]


# -- the image, the runtime env, the upload filter, the MLflow script ------------------------------


def _dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=(INFRA / "Dockerfile").open("rb"))


def _stages() -> dict[str, list[dict]]:
    stages: dict[str, list[dict]] = {}
    current = None
    for instruction in _dockerfile().structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split(" AS ")[-1].strip()
            stages[current] = []
        if current is not None:
            stages[current].append(instruction)
    return stages


def test_dockerfile_installs_exactly_the_pinned_stack():
    pins, stages = _pins(), _stages()
    assert {"python-base", "ray", "mlflow-server"} <= set(stages)
    installs = {name: [i["value"] for i in body if i["instruction"] == "RUN" and "pip install" in i["value"]] for name, body in stages.items()}
    for name, commands in installs.items():
        for command in commands:
            assert "-c constraints.txt" in command, command  # the tested versions of every dependency too
            for package, version in _pinned_requirements(command).items():
                assert pins.get(package) == version, f"{name}: {package}=={version}, constraints.txt has {pins.get(package)}"
    stack = _pinned_requirements(installs["ray"][0])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {_norm(re.split(r"[<>=!~ ]", d)[0]) for d in project["dependencies"]} <= set(stack)
    assert '"ray[default,train,data]==' in installs["ray"][0]  # dashboard / job server included
    assert "--no-deps" in installs["ray"][1]  # the code, without touching the stack


def test_dockerfile_base_python_copies_and_user():
    parser, stages = _dockerfile(), _stages()
    (python_arg,) = [i["value"] for i in parser.structure if i["instruction"] == "ARG" and i["value"].startswith("PYTHON_VERSION=")]
    version = tuple(int(p) for p in python_arg.split("=")[1].split("."))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]  # ">=3.10,<3.14"
    low, high = (tuple(int(p) for p in bound.lstrip("<>=").split(".")) for bound in requires.split(","))
    assert low <= version < high
    for body in stages.values():
        for instruction in body:
            if instruction["instruction"] == "COPY":
                *sources, _ = instruction["value"].split()
                assert all((REPO / source).exists() for source in sources), instruction["value"]
    for name in ("ray", "mlflow-server"):
        assert [i["value"] for i in stages[name] if i["instruction"] == "USER"] == ["ray"]
    assert "useradd --create-home --uid 1000" in " ".join(i["value"] for i in stages["python-base"])
    assert any(i["instruction"] == "WORKDIR" and i["value"] + "/" == CODE_IN_IMAGE for i in stages["python-base"])


def test_runtime_env_file_is_what_ray_accepts():
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    data = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert set(data) <= set(RuntimeEnv.known_fields) and set(data["config"]) <= set(RuntimeEnvConfig.known_fields)
    RuntimeEnv(**data)
    assert data["working_dir"] == "." and not {"pip", "conda", "uv"} & set(data)


def _uploaded(root: Path, include_gitignore: bool, target: Path) -> set[str]:
    """The files `ray job submit --working-dir <root>` would upload (Ray's own packaging code)."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(root), [], str(target), include_gitignore=include_gitignore)
    with zipfile.ZipFile(target) as archive:
        return {n for n in archive.namelist() if not n.endswith("/")}


def test_rayignore_keeps_data_stores_tracking_and_checkpoints_out_of_uploads(tmp_path):
    root = tmp_path / "checkout"
    kept = ["jobs/train_coco20i.py", "pipeline/data/coco.py", "pipeline/store/fs.py", "infra/runtime_env.yaml",
            "tests/test_infra.py", "refseg_models/encoders/base.py"]
    dropped = [".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", ".git/objects/pack/p.pack", "data/coco/x.jpg",
               "stores/coco-sam_vit_h/shard-000000.tar", "outputs/ray/run-fold0/checkpoint_step0000010/state.pt",
               "checkpoints/best.pt", "mlflow.db", "mlruns/1/meta.yaml", "pipeline/__pycache__/x.cpython-311.pyc",
               "wheel-1.0-py3-none-any.whl"]
    for name in kept + dropped:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / ".rayignore").write_text((REPO / ".rayignore").read_text())
    # .rayignore alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns .gitignore off)
    assert _uploaded(root, include_gitignore=False, target=tmp_path / "upload.zip") == set(kept) | {".rayignore"}


def test_repository_upload_is_code_only(tmp_path):
    names = _uploaded(REPO, include_gitignore=True, target=tmp_path / "upload.zip")
    assert "jobs/train_coco20i.py" in names and "infra/runtime_env.yaml" in names
    bad = [n for n in names if n.startswith((".venv/", ".git/", "stores/", "outputs/", "mlruns/", "data/")) or n.endswith((".tar", ".whl", ".db"))]
    assert bad == []
    assert sum((REPO / n).stat().st_size for n in names) < 64 * 1024**2  # Ray's cap is 512 MiB


def test_mlflow_server_script_parses():
    assert subprocess.run(["bash", "-n", str(INFRA / "mlflow_server.sh")], capture_output=True).returncode == 0
