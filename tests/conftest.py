"""Shared test fixtures.

Real data and weights live in ``../shared`` beside the checkout (never copied into the repo).
In a user's checkout they are absent and the tests that need them skip with a reason; ``.ci/run``
sets ``REFSEG_CI=1`` so that their absence, like any missing test dependency, fails CI instead of
silently skipping (:mod:`environment`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from environment import import_or_missing, missing

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("REFSEG_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    missing(f"{what} not found at {path} (set REFSEG_SHARED_DIR or place ../shared beside the checkout)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR, "shared data directory")


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    """Real COCO images + instances.json (543 images, all 80 classes)."""
    return _require(SHARED_DIR / "data" / "coco_mini", "coco_mini")


@pytest.fixture(scope="session")
def coco20i_lists_dir() -> Path:
    """Official HSNet COCO-20i lists: {trn,val}/fold{0-3}.json."""
    return _require(SHARED_DIR / "data" / "splits" / "coco20i_hsnet", "HSNet COCO-20i lists")


@pytest.fixture(scope="session")
def pascal5i_lists_dir() -> Path:
    return _require(SHARED_DIR / "data" / "splits" / "pascal5i_hsnet", "HSNet PASCAL-5i lists")


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    """Real ImageNet MobileNetV2 state dict (TF padding + (x-128)/128 input scaling)."""
    return _require(SHARED_DIR / "weights" / "mobilenet_v2_imagenet.pth", "MobileNetV2 weights")


@pytest.fixture(scope="session")
def mobilenet_check_dir() -> Path:
    return _require(SHARED_DIR / "weights" / "check", "MobileNetV2 check images")


@pytest.fixture(scope="module")
def tiny_sam() -> Iterator[str]:
    """``sam_vit_tiny`` registered for one test module (tests/tiny_sam.py; refseg does not register it)."""
    from tiny_sam import TINY_SAM, tiny_sam_registered

    with tiny_sam_registered():
        yield TINY_SAM


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray for one test module (2 CPUs, no dashboard), shut down after it."""
    ray = import_or_missing("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
