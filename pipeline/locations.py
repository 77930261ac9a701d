"""Where a run's durable outputs live: one root, and a check that none of them lands in Ray's
temporary copy of the working directory.

The root (``--root``, else ``REFSEG_ROOT``, else the current directory) is a local path or a URI
(``s3://bucket/prefix``). Everything a job keeps is under it unless given explicitly::

    <root>/stores/<feature dataset>-<encoder>   feature stores
    <root>/outputs/ray/<run name>-fold<k>       Ray Train checkpoints
    <root>/outputs/<run name>/summary.json      the training job's summary
    <root>/prepared/<dataset>-fold<k>-<hash>     a fold prepared for the training workers
    <root>/masks/<source>-<annotations hash>     label masks rendered once (read through prepared folds)
    <root>/mlflow.db, <root>/mlruns             the default MLflow store (a local root only)

``ray job submit --working-dir .`` runs the driver inside a temporary copy of the working directory
(``<Ray session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``), deleted with the session:
a default derived from the current directory would put stores, checkpoints and MLflow runs there.
:func:`check_durable` refuses that, in one line, before any Ray work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

ROOT_ENV = "REFSEG_ROOT"
# Set by Ray's job supervisor in the driver's environment: the job's config, with its runtime env.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The folder, inside a Ray session, that holds the unpacked ``--working-dir`` uploads.
_WORKING_DIR_FILES = ("runtime_resources", "working_dir_files")


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class Root:
    """The root of a run's durable locations (an absolute local path, or a URI)."""

    location: str

    def join(self, *parts: str) -> str:
        if is_uri(self.location):
            return "/".join([self.location.rstrip("/"), *parts])
        return str(Path(self.location, *parts))

    def store(self, feature_dataset: str, encoder: str, precision: str = "float32") -> str:
        """``<root>/stores/<feature dataset>-<encoder>``, ``-<precision>`` appended when not fp32 (a bf16
        extraction is another feature set: it gets a store of its own)."""
        suffix = "" if precision == "float32" else f"-{precision}"
        return self.join("stores", f"{feature_dataset}-{encoder}{suffix}")

    @property
    def prepared(self) -> str:
        return self.join("prepared")

    @property
    def masks(self) -> str:
        return self.join("masks")

    @property
    def ray_storage(self) -> str:
        return self.join("outputs", "ray")

    def outputs(self, name: str) -> str:
        return self.join("outputs", name)

    @property
    def mlflow_uri(self) -> str | None:
        """``sqlite:///<root>/mlflow.db`` for a local root; None for a URI (give a tracking server)."""
        return None if is_uri(self.location) else f"sqlite:///{Path(self.location) / 'mlflow.db'}"


def resolve_root(root: str | None = None) -> Root:
    """``root``, else ``REFSEG_ROOT``, else the current directory (local paths made absolute)."""
    location = root or os.environ.get(ROOT_ENV) or os.getcwd()
    if is_uri(location):
        return Root(location.rstrip("/"))
    return Root(str(Path(location).expanduser().resolve()))


def ray_job_working_dir(cwd: Path | None = None) -> Path | None:
    """The temporary working-directory copy a ``ray job submit --working-dir`` driver runs in, or None.

    Two signals, either is enough: the path (Ray unpacks the upload under
    ``<session>/runtime_resources/working_dir_files/<package>`` and starts the driver there), and the
    job config Ray's job supervisor gives the driver, whose runtime env names a ``working_dir``.
    """
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 2] == _WORKING_DIR_FILES:
            return Path(*parts[: index + 3])
    try:
        job_config = json.loads(os.environ.get(_RAY_JOB_CONFIG_ENV) or "{}")
    except json.JSONDecodeError:
        return None
    runtime_env = (job_config or {}).get("runtime_env") or {}
    return cwd if runtime_env.get("working_dir") else None


ROOT_HINT = f"pass --root /shared/path (or s3://bucket/prefix), or set {ROOT_ENV} in the job's runtime env"


def check_durable(locations: Mapping[str, str | None], hint: str = ROOT_HINT, cwd: Path | None = None) -> None:
    """Refuse (ConfigError, one line ending in ``hint``) a durable location inside a Ray job's
    temporary working dir.

    ``locations``: {what: path or URI} (``sqlite:///`` MLflow URIs are checked by their file); URIs
    and None pass.
    """
    temporary = ray_job_working_dir(cwd)
    if temporary is None:
        return
    for what, location in locations.items():
        if not location:
            continue
        if location.startswith("sqlite:///"):
            location = location[len("sqlite:///") :]
        elif is_uri(location):
            continue
        path = Path(location).resolve()
        if path == temporary or temporary in path.parents:
            raise ConfigError(
                f"{what} {path} would be inside the temporary copy of the working directory that "
                f"`ray job submit --working-dir` made ({temporary}; deleted when the Ray session ends): {hint}"
            )
