"""MLflow tracking: the only module that imports mlflow.

Layout: one experiment per study (default: the dataset, e.g. ``coco20i``; ``--experiment``), a
parent run per configuration (its run name is the training run name) and a child run per fold,
both created by the driver before any worker starts. Rank 0 re-attaches to its fold's child run by
id (``MlflowClient`` calls with explicit run ids: no global active run), so a restarted worker or a
re-run driver logs into the same run. Training metrics are buffered and flushed only after the
checkpoint that covers them is reported, with ``step=`` the global step: a restart from that
checkpoint never logs a step twice.

Local default: ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlruns`` (``--root`` /
``REFSEG_ROOT`` / the working directory, absolute: Ray workers, whose working directory differs,
write to the same places; :mod:`pipeline.locations`). On a cluster set ``MLFLOW_TRACKING_URI`` to a
tracking server; workers receive it through the runtime environment.

Experiments are classic ML experiments (``mlflow.experimentKind``) with a saved runs-table view,
"refseg results", that shows the test metrics as columns (:func:`results_view_url` opens it).
Each fold's inference checkpoint is logged as an MLflow model and registered
(:meth:`RunLogger.log_model`; :mod:`pipeline.inference.mlflow_model` is its loader).
Run statuses: RUNNING while a driver works on them (again on resume), FINISHED, FAILED when training
fails, KILLED when the driver is interrupted (:func:`end_unfinished`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError
from pipeline.inference.mlflow_model import CHECKPOINT_NAME, LOAD_CONFIG, LOADER_MODULE
from pipeline.locations import Root, resolve_root

PARENT, CHILD = "parent", "fold"
TAG_KIND, TAG_RUN, TAG_FOLD, TAG_RAY = "refseg.kind", "refseg.run_name", "refseg.fold", "refseg.ray_run"
TAG_MODEL = "refseg.model_uri"  # the registered model version of a fold run's inference checkpoint
# MLflow 3's UI opens an experiment as a GenAI one unless told it is "custom model development"
# (the value the UI itself writes when a user picks "Model training" for an experiment).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A saved runs-table view (MLflow's "Views" menu; the UI reads experiment tags with this prefix).
SAVED_VIEW_PREFIX, RESULTS_VIEW = "mlflow.sharedViewState.", "refseg-results"
# What the saved view shows besides the per-run metrics it is given.
_VIEW_COLUMNS = ("tags.`refseg.fold`", "params.`method`", "params.`shot`", "params.`annotation_type`")


def default_tracking_uri(root: Root | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` (root: ``REFSEG_ROOT`` or
    the working directory when not given)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = root or resolve_root()
    if root.mlflow_uri is None:
        raise ConfigError(
            f"the root {root.location} is not a local folder, so there is no default MLflow store in it: give a "
            "tracking server (--tracking-uri http://... or MLFLOW_TRACKING_URI)"
        )
    return root.mlflow_uri


def default_artifact_location(uri: str) -> str | None:
    """Absolute artifact root for a local sqlite store (``<db folder>/mlruns``); a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    # the registry is the tracking store, whatever MLFLOW_REGISTRY_URI the environment holds
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def ensure_experiment(uri: str, name: str, metric_keys: Iterable[str] = ()) -> str:
    """The id of experiment ``name`` (created with an absolute artifact location if new), marked as a
    classic ML experiment, with the saved view "refseg results" showing ``metric_keys`` (added to the
    columns it shows already)."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=default_artifact_location(uri))
        tags: dict[str, str] = {}
    else:
        experiment_id, tags = experiment.experiment_id, dict(experiment.tags)
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    view = _results_view(tags.get(SAVED_VIEW_PREFIX + RESULTS_VIEW), metric_keys)
    if view is not None:
        client.set_experiment_tag(experiment_id, SAVED_VIEW_PREFIX + RESULTS_VIEW, view)
    return experiment_id


def _results_view(current: str | None, metric_keys: Iterable[str]) -> str | None:
    """The saved view's tag value (MLflow's envelope: name, createdAt, updatedAt and the runs-table
    state as JSON text: the columns shown, in this order), or None when ``current`` shows every
    column already."""
    columns = [f"metrics.`{key}`" for key in metric_keys] + list(_VIEW_COLUMNS)
    created = now = int(time.time() * 1000)
    try:
        envelope = json.loads(current) if current else None
    except json.JSONDecodeError:
        envelope = None  # not a view: rewrite it
    if isinstance(envelope, dict) and envelope.get("state"):
        try:
            state = json.loads(envelope["state"])
        except (json.JSONDecodeError, TypeError):
            return None  # saved over in the UI (which may compress the state): the user's now
    else:
        envelope = state = None
    if envelope and state:
        shown = list(state.get("selectedColumns") or [])
        missing = [c for c in columns if c not in shown]
        if not missing and state.get("columnOrder"):
            return None  # also keeps what a user saved over it in the UI
        columns, created = shown + missing, int(envelope.get("createdAt", now))
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": columns,
             "columnOrder": columns}
    return json.dumps({"name": "refseg results", "createdAt": created, "updatedAt": now, "state": json.dumps(state)})


def ui_base_url(uri: str) -> str:
    """Where the UI of ``uri`` is: the tracking server itself, or ``mlflow ui``'s default address."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def results_view_url(uri: str, experiment_id: str) -> str:
    """The runs table of an experiment in "Model training" mode, with the saved view's columns."""
    return (f"{ui_base_url(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW}"
            "&workflowType=machine_learning")


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
    """The parent run of configuration ``run_name``: re-used if it exists (its status unchanged), else
    created (RUNNING)."""
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


def run_model_uri(uri: str, run_id: str) -> str | None:
    """The ``models:/`` URI a fold run registered its inference checkpoint under, if any."""
    return _client(uri).get_run(run_id).data.tags.get(TAG_MODEL)


def finish(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


def set_running(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed run that an interrupted or failed driver ended)."""
    _client(uri).update_run(run_id, status="RUNNING")


@contextlib.contextmanager
def ended_with_the_driver(uri: str, run_ids: list[str]) -> Iterator[None]:
    """Run the body; the runs in ``run_ids`` (read when the body ends: the runs being worked on) that
    are still RUNNING end KILLED when it is interrupted (KeyboardInterrupt, or SystemExit: Ray Train's
    SIGINT handler exits with code 0), then KeyboardInterrupt is raised; they end FAILED when it
    raises anything else, which is re-raised."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        ended = end_unfinished(uri, run_ids, "KILLED")
        print(f"interrupted: MLflow run(s) {', '.join(ended) or '-'} marked KILLED; the same command resumes from the "
              "last checkpoint", file=sys.stderr, flush=True)
        raise KeyboardInterrupt from None
    except BaseException:
        end_unfinished(uri, run_ids, "FAILED")
        raise


def end_unfinished(uri: str, run_ids: Iterable[str], status: str) -> list[str]:
    """End those of ``run_ids`` that are still RUNNING with ``status`` (KILLED, FAILED); returns them.

    Best effort: it runs while another error (or an interrupt) is being handled, which a failing
    tracking server must not replace; a failure here is printed as one line.
    """
    ended = []
    try:
        client = _client(uri)
        for run_id in run_ids:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
                ended.append(run_id)
    except Exception as error:  # noqa: BLE001 - reported, and the original error goes on
        print(f"could not mark the MLflow runs {status} at {uri}: {error}", file=sys.stderr, flush=True)
    return ended


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

    def log_model(self, checkpoint: str | Path, name: str, registered_name: str, tags: Mapping[str, str], step: int,
                  description: str) -> str:
        """Log an inference checkpoint file as an MLflow model of this run and register it.

        The model is the weights-only checkpoint (copied as is, never pickled by MLflow) and an
        ``MLmodel`` whose ``python_function`` flavour is loaded by :mod:`pipeline.inference.mlflow_model`;
        MLflow links the run's metrics at ``step`` (the test metrics) to it. It becomes a new version of
        the registered model ``registered_name`` (created with ``description`` if new), with ``tags``
        on the logged model and the version. MLflow also logs the model's load-time settings
        (``LOAD_CONFIG``: sam_checkpoint, backbone_checkpoint, device) as params of the run. Returns the
        version's ``models:/<name>/<version>`` URI (also the run's ``refseg.model_uri`` tag).
        """
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        # Model.log works on MLflow's global tracking URI and active experiment (else "Default")
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=self.run_id, loader_module=LOADER_MODULE, data_path=str(checkpoint),
            pip_requirements=_pip_requirements(), tags=dict(tags), step=step,
            metadata={"refseg_checkpoint": CHECKPOINT_NAME}, model_config=dict(LOAD_CONFIG),
        )
        # Registered through this run's client (the registry is the tracking store, whatever
        # MLFLOW_REGISTRY_URI a parent process left), not by Model.log's registered_model_name: that
        # goes through mlflow.register_model, which prints two lines per fold to stderr.
        try:
            self.client.create_registered_model(registered_name, description=description)
        except MlflowException as error:  # another fold or seed registered it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if not self.client.get_registered_model(registered_name).description:
                self.client.update_registered_model(registered_name, description=description)
        version = self.client.create_model_version(
            registered_name, source=f"models:/{info.model_id}", run_id=self.run_id, tags=dict(tags), model_id=info.model_id,
        )
        uri = f"models:/{registered_name}/{version.version}"
        self.client.set_tag(self.run_id, TAG_MODEL, uri)
        return uri

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


def _pip_requirements() -> list[str]:
    """What loading the model needs (given, so MLflow does not load the model to infer it); refseg
    itself comes from its repository (``pip install -e .``), not from an index."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "torchvision", "numpy", "pillow", "mlflow"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return out


def model_checkpoint(model_uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """The checkpoint file of a refseg MLflow model (``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, ``runs:/<run id>/<path>``), downloaded into ``dst``.

    Only files are read (the ``MLmodel`` YAML and the checkpoint): no code from the model runs and
    nothing is unpickled here; the caller loads the checkpoint with ``weights_only=True``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        # models:/ resolution builds its registry client on MLflow's process-wide tracking URI: both
        # globals name this store (an earlier caller's URI found no such model)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri))
        flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function") or {}
    except (MlflowException, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read the MLflow model {model_uri} from {tracking_uri}: {message}") from error
    if flavor.get("loader_module") != LOADER_MODULE or not flavor.get("data"):
        raise DataError(f"{model_uri} is not a refseg model (its MLmodel has no python_function flavour loaded by {LOADER_MODULE})")
    return local / flavor["data"]


def search_fold_runs(uri: str, experiment: str, run_names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every fold run of ``experiment`` as {run_name, run_id, status, fold, params, metrics, tags}."""
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
                "tags": dict(run.data.tags),
            }
        )
    return rows


# -- run records read and written by ``refseg benchmark`` (pipeline/benchmark): plain functions of
# explicit run ids, so that a benchmark's cells stay ordinary training runs and MLflow the record.

def find_runs(uri: str, experiment_id: str, tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every run of the experiment with all of ``tags``, oldest first, as {run_id, status, params,
    metrics, tags, start_time, end_time} (times in ms since the epoch; end_time None while running)."""
    return [
        {"run_id": run.info.run_id, "status": run.info.status, "params": dict(run.data.params),
         "metrics": dict(run.data.metrics), "tags": dict(run.data.tags), "start_time": run.info.start_time,
         "end_time": run.info.end_time}
        for run in _find(uri, experiment_id, tags)
    ]


def find_or_create_run(uri: str, experiment_id: str, name: str, tags: Mapping[str, str],
                       params: Mapping[str, str] | None = None, extra_tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run id, created) of the run carrying all of ``tags`` (its identity); created (RUNNING, named
    ``name``, with ``tags``, ``extra_tags`` and ``params``) when there is none."""
    found = _find(uri, experiment_id, tags)
    if found:
        return found[0].info.run_id, False
    from mlflow.entities import Param

    client = _client(uri)
    run = client.create_run(experiment_id, run_name=name, tags={**dict(extra_tags or {}), **dict(tags)})
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id, True


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of a metric, by step (empty when never logged)."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def log_artifacts(uri: str, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    _client(uri).log_artifacts(run_id, str(folder), artifact_path)


def read_artifact_json(uri: str, run_id: str, path: str) -> dict[str, Any] | None:
    """A JSON artifact of a run, or None when the run has no such file."""
    import tempfile

    from mlflow.exceptions import MlflowException

    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a progress bar per small file is noise
    try:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = _client(uri).download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                return None
            return json.loads(Path(local).read_text())
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


def model_versions(uri: str, filter_string: str) -> list[dict[str, Any]]:
    """Registered model versions matching ``filter_string`` (MLflow's ``search_model_versions``
    syntax, e.g. ``tags.`refseg.benchmark` = 'cpu-small'``) as {name, version, run_id, tags, uri}."""
    return [
        {"name": v.name, "version": v.version, "run_id": v.run_id, "tags": dict(v.tags), "uri": f"models:/{v.name}/{v.version}"}
        for v in _client(uri).search_model_versions(filter_string)
    ]


def set_model_version_tags(uri: str, model_uri: str, tags: Mapping[str, str]) -> None:
    """Tag a registered model version given as ``models:/<name>/<version>``."""
    name, version = model_uri[len("models:/") :].rsplit("/", 1)
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, or None when it does not exist."""
    experiment = _client(uri).get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id
