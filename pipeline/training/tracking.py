"""MLflow tracking: the only module that imports mlflow.

Layout: one experiment per study (default: the dataset, e.g. ``coco20i``; ``--experiment``), a
parent run per configuration (its run name is the training run name) and a child run per fold,
both created by the driver before any worker starts. Rank 0 re-attaches to its fold's child run by
id (``MlflowClient`` calls with explicit run ids: no global active run), so a restarted worker or a
re-run driver logs into the same run. Training metrics are buffered and flushed only after the
checkpoint that covers them is reported, with ``step=`` the global step: a restart from that
checkpoint never logs a step twice.

Local default: ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlruns`` (absolute, so Ray
workers, whose working directory differs, write to the same places). On a cluster set
``MLFLOW_TRACKING_URI`` to a tracking server; workers receive it through the runtime environment.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

PARENT, CHILD = "parent", "fold"
TAG_KIND, TAG_RUN, TAG_FOLD, TAG_RAY = "refseg.kind", "refseg.run_name", "refseg.fold", "refseg.ray_run"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file in the working directory (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """Absolute artifact root for a local sqlite store (``<db folder>/mlruns``); a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError, before any training, when the tracking URI cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise ConfigError(f"MLflow tracking server {uri} answered HTTP {response.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({error}); start it or fix MLFLOW_TRACKING_URI") from error
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"MLflow sqlite store {uri}: folder {folder} does not exist or is not writable")
        return
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as error:  # any backend failure: say which URI and why
        raise ConfigError(f"MLflow tracking URI {uri} cannot be used: {error}") from error


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` (created with an absolute artifact location if new)."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(uri))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} for MLflow params (values as JSON text, at most 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]
    return out


def _find(uri: str, experiment_id: str, tags: Mapping[str, str]) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return _client(uri).search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


def parent_run(uri: str, experiment_id: str, run_name: str, params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """The parent run of configuration ``run_name``: re-used if it exists, else created."""
    found = _find(uri, experiment_id, {TAG_KIND: PARENT, TAG_RUN: run_name})
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param

    client = _client(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={TAG_KIND: PARENT, TAG_RUN: run_name, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def fold_run(
    uri: str, experiment_id: str, parent_id: str, run_name: str, fold: int, ray_run: str, params: Mapping[str, str], tags: Mapping[str, str]
) -> tuple[str, str]:
    """(run id, status) of the fold's child run: re-attached if it exists (a resumed run), else created."""
    found = _find(uri, experiment_id, {TAG_KIND: CHILD, TAG_RUN: run_name, TAG_FOLD: str(fold)})
    if found:
        return found[0].info.run_id, found[0].info.status
    from mlflow.entities import Param

    client = _client(uri)
    run = client.create_run(
        experiment_id,
        run_name=f"{run_name}-fold{fold}",
        tags={TAG_KIND: CHILD, TAG_RUN: run_name, TAG_FOLD: str(fold), TAG_RAY: ray_run, "mlflow.parentRunId": parent_id, **tags},
    )
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id, run.info.status


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(_client(uri).get_run(run_id).data.metrics)


def finish(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])


class RunLogger:
    """Rank 0's logger for one child run (buffered metrics; artifacts written immediately)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self._buffer: list[tuple[str, float, int, int]] = []
        self.client.update_run(run_id, status="RUNNING")
        # A restarted worker group re-runs the steps after its last registered checkpoint (all of them
        # when a worker died before the first one was registered): their metrics are logged already
        # (per-step seeding makes them the same), so nothing is logged again at or before a metric's
        # last logged step, and every step of the history appears once.
        self._logged_through = {
            key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
            for key in self.client.get_run(run_id).data.metrics
        }

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._buffer.extend((k, float(v), now, int(step)) for k, v in metrics.items())

    def flush(self) -> None:
        """Write the buffered metrics (call after the checkpoint covering them was reported)."""
        from mlflow.entities import Metric

        fresh = [(k, v, t, s) for k, v, t, s in self._buffer if s > self._logged_through.get(k, -1)]
        for start in range(0, len(fresh), 900):  # log_batch takes at most 1000 metrics
            chunk = fresh[start : start + 900]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
        for key, _, _, step in fresh:
            self._logged_through[key] = max(step, self._logged_through.get(key, -1))
        self._buffer.clear()

    def discard(self) -> None:
        self._buffer.clear()

    def log_now(self, metrics: Mapping[str, float], step: int) -> None:
        self.add(metrics, step)
        self.flush()

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


def search_fold_runs(uri: str, experiment: str, run_names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every finished fold run of ``experiment`` as {run_name, method, fold, seed, metrics, params}."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    rows = []
    wanted = None if run_names is None else set(run_names)
    for run in client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{CHILD}'", max_results=5000):
        name = run.data.tags.get(TAG_RUN, "")
        if wanted is not None and name not in wanted:
            continue
        rows.append(
            {
                "run_name": name,
                "run_id": run.info.run_id,
                "status": run.info.status,
                "fold": int(run.data.tags.get(TAG_FOLD, -1)),
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
            }
        )
    return rows
