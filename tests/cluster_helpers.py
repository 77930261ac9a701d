"""Real services for the multi-node tests, all on loopback and all stopped by pid.

* :class:`Service`: a process started in its own session (process group); ``stop()`` sends SIGTERM
  to the leader (which shuts its children down) and SIGKILLs the group if it outlives the grace
  period; ``kill()`` SIGKILLs the whole group at once (a lost machine).
* :func:`start_moto`: moto's S3 server (an S3-compatible object store) plus a bucket.
* :func:`start_mlflow`: ``infra/mlflow_server.sh`` (sqlite backend, artifacts proxied into S3).
* :class:`RayCluster`: a head and worker nodes as separate ``ray start --block`` processes. Every
  node gets its own loopback address (127.0.0.2, 127.0.0.3, ...): Ray rewrites 127.0.0.1 into the
  machine's network address, but takes other 127.x addresses as they are, so nothing leaves
  loopback and every node has an address of its own, as on a real cluster. The cluster uses its own
  ``--temp-dir`` (other Ray instances on the machine never see it) and token authentication with a
  token of its own (``RAY_AUTH_TOKEN``, nothing written to ``~/.ray``).
* Jobs go through the real client: ``ray job submit --runtime-env infra/runtime_env.yaml
  --working-dir .``; status, logs and actors are read from the dashboard's REST API.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ray_session import free_port  # noqa: F401  (the tests' one way to choose a port)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "refseg-multinode"


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.5, alive=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class Service:
    """A process (and everything it starts) in a session of its own, stopped by pid."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    term_group: bool = False  # SIGTERM every process of the group (servers whose leader does not pass it on)
    process: subprocess.Popen | None = None

    def start(self) -> "Service":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the leader (``term_group``: to its whole group), then SIGKILL to whatever is left
        of the group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.term_group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole process group at once: the machine is gone."""
        if self.process is not None and self._group_alive():
            os.killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def base_env() -> dict[str, str]:
    """The environment every test process gets: this venv first on PATH, no stray Ray/AWS settings,
    no usage reporting, and no cloud metadata look-ups (only loopback is ever contacted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
        AWS_EC2_METADATA_DISABLED="true",
        REFSEG_CODE_VERSION="refseg multinode-test",  # the uploaded working dir has no .git
    )
    return env


@dataclass
class S3:
    endpoint: str
    service: Service

    @property
    def env(self) -> dict[str, str]:
        """What pyarrow (stores, Ray Train storage) and boto3 (MLflow's artifact store) read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` (key relative to it) with its bytes."""
        client = self.client()
        out: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                out[key[len(prefix):].lstrip("/")] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return out

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        client = self.client()
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> list[str]:
        client = self.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [item["Key"][len(prefix):].lstrip("/") for item in page.get("Contents", [])]
        return sorted(keys)


def start_moto(workdir: Path) -> S3:
    moto_server = BIN / "moto_server"
    if not moto_server.exists():
        raise FileNotFoundError("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    service = Service("moto", [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], base_env(), workdir / "moto.log").start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 60, "moto_server", alive=service.alive)
        s3 = S3(f"http://127.0.0.1:{port}", service)
        s3.client().create_bucket(Bucket=BUCKET)
    except BaseException:
        service.stop()
        raise
    return s3


@dataclass
class Mlflow:
    uri: str
    service: Service


def start_mlflow(workdir: Path, s3: S3) -> Mlflow:
    """The repository's own ``infra/mlflow_server.sh``: sqlite backend here (Postgres on a cluster),
    artifacts proxied by the server into the object store."""
    port = free_port()
    env = {**base_env(), **s3.env, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_BACKEND": f"sqlite:///{workdir / 'mlflow.db'}", "MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow"}
    service = Service("mlflow", ["bash", str(REPO / "infra" / "mlflow_server.sh")], env, workdir / "mlflow.log",
                      term_group=True).start()
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(healthy, 120, "mlflow server", alive=service.alive)
    except BaseException:
        service.stop()
        raise
    return Mlflow(uri, service)


@dataclass
class RayNode:
    ip: str
    service: Service
    head: bool


@dataclass
class RayCluster:
    """A head node and worker nodes, each a ``ray start --block`` process on its own loopback address."""

    workdir: Path
    env: dict[str, str]
    head_resources: dict[str, float]
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[RayNode] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    _next_ip: int = 2

    @property
    def head_ip(self) -> str:
        return self.nodes[0].ip

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    @property
    def node_env(self) -> dict[str, str]:
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_DEDUP_LOGS": "0"}

    def _ip(self) -> str:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        return ip

    @staticmethod
    def _resource_args(resources: dict[str, float]) -> list[str]:
        resources = dict(resources)
        args = [f"--num-cpus={int(resources.pop('CPU', 0))}", f"--num-gpus={int(resources.pop('GPU', 0))}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return args

    def start_head(self, object_store_bytes: int = 400 * 1024**2, attempts: int = 3) -> RayNode:
        """Starts the head; a head that exits while starting (a port taken after it was chosen: every
        attempt chooses new ports) is started again, and the last failure names its log's tail."""
        ip = self._ip()
        temp_dir = Path(self.workdir) / "ray"  # short: Ray's unix socket paths must stay < 108 chars
        for attempt in range(1, attempts + 1):
            self.gcs_port, self.dashboard_port = free_port(ip), free_port(ip)
            args = [
                str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", f"--node-ip-address={ip}",
                f"--port={self.gcs_port}", f"--dashboard-host={ip}", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port(ip)}", f"--dashboard-agent-listen-port={free_port(ip)}",
                f"--temp-dir={temp_dir}", f"--object-store-memory={object_store_bytes}",
                *self._resource_args(self.head_resources),
            ]
            service = Service("ray-head", args, self.node_env, Path(self.workdir) / f"head-{attempt}.log").start()
            node = RayNode(ip, service, True)
            self.nodes.append(node)
            try:
                wait_until(lambda: self._dashboard_up(), 120, "ray head", alive=service.alive)
                return node
            except (RuntimeError, TimeoutError) as error:
                self.nodes.remove(node)
                service.stop()
                if attempt == attempts:
                    raise RuntimeError(f"{error} ({attempts} attempts); the last log ends:\n{service.tail()}") from error
        raise ValueError(f"attempts must be >= 1, not {attempts}")

    def add_worker(self, resources: dict[str, float], object_store_bytes: int = 400 * 1024**2) -> RayNode:
        ip = self._ip()
        args = [
            str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--address={self.head_ip}:{self.gcs_port}",
            f"--node-ip-address={ip}", f"--dashboard-agent-listen-port={free_port(ip)}",
            f"--temp-dir={Path(self.workdir) / ('ray-' + ip.rsplit('.', 1)[1])}",  # its own logs, sockets, packages
            f"--object-store-memory={object_store_bytes}", *self._resource_args(resources),
        ]
        node = RayNode(ip, Service(f"ray-worker-{ip}", args, self.node_env, Path(self.workdir) / f"worker-{ip}.log").start(), False)
        self.nodes.append(node)
        try:
            wait_until(lambda: ip in self.alive_node_ips(), 120, f"ray worker {ip}", alive=node.service.alive)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; its log ends:\n{node.service.tail()}") from error
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.service.stop()

    # -- the dashboard's REST API (token in the Authorization header)
    def _get(self, path: str, timeout_s: float = 10) -> Any:
        request = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def _dashboard_up(self) -> bool:
        try:
            self._get("/api/version", timeout_s=2)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def alive_node_ips(self) -> set[str]:
        try:
            data = self._get("/api/v0/nodes?limit=100&detail=1")
        except (urllib.error.URLError, OSError, ValueError):
            return set()
        return {n["node_ip"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"}

    def node_ips_by_id(self) -> dict[str, str]:
        data = self._get("/api/v0/nodes?limit=100&detail=1")
        return {n["node_id"]: n["node_ip"] for n in data["data"]["result"]["result"]}

    def actors(self, job_id: str) -> list[dict]:
        """Every actor (alive or dead) of the job, with the node it ran on."""
        data = self._get("/api/v0/actors?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D"
                         f"&filter_values={job_id}", timeout_s=30)
        return data["data"]["result"]["result"]

    # -- jobs
    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        """``ray job submit`` exactly as a user runs it from the repository root (token auth on)."""
        args = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--no-wait",
                "--submission-id", submission_id, "--runtime-env", "infra/runtime_env.yaml", "--working-dir", ".",
                "--", *entrypoint]
        result = subprocess.run(args, cwd=REPO, env={**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token},
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"ray job submit failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    def job(self, submission_id: str) -> dict:
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        return self._get(f"/api/jobs/{submission_id}/logs", timeout_s=30).get("logs", "")

    def wait_job(self, submission_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {info['status']} after {timeout_s:.0f} s:\n"
                                   f"{self.job_logs(submission_id)[-6000:]}")
            time.sleep(2)
