"""The code version recorded in stores (per shard and in the manifest)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pipeline

CODE_VERSION_ENV = "REFSEG_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(pipeline.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit if len(commit) == 40 else ""


def code_version() -> str:
    """``$REFSEG_CODE_VERSION`` if set (e.g. a commit passed to ``ray job submit``, whose uploaded
    working dir has no ``.git``), else ``refseg <version>`` plus the git commit of the checkout."""
    override = os.environ.get(CODE_VERSION_ENV)
    if override:
        return override
    commit = _git_commit()
    version = f"refseg {pipeline.__version__}"
    return f"{version} ({commit})" if commit else version
