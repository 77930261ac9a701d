"""What a test needs from its environment: a skip with a reason in a user's checkout, a failure in CI.

``.ci/run`` sets ``REFSEG_CI=1``. There every test dependency must be present, so that nothing the
suite should check is skipped silently: the shared data (``../shared``), the test extras
(``moto_server``, boto3, Ray, pyarrow's S3 filesystem), ``/proc``, and, for the tests that mount a
read-only or tiny filesystem, root with ``unshare(1)`` (the CI machine runs as root). Outside CI
the same conditions skip with the reason (``pytest -ra`` lists them).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

CI = os.environ.get("REFSEG_CI") == "1"


def missing(reason: str) -> NoReturn:
    """Skip with ``reason`` (also at module level), or fail under ``REFSEG_CI=1``."""
    if CI:
        pytest.fail(f"{reason}; REFSEG_CI=1 (CI) makes a missing test dependency an error", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(module: str) -> ModuleType:
    """``pytest.importorskip`` that fails under ``REFSEG_CI=1``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing(f"needs {module} ({error})")
