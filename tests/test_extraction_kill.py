"""A really killed extraction job (SIGKILL of its whole process group) resumes to the same store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kill_process import kill_group_when

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _job(output: Path, coco_mini_dir: Path, weights: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "jobs" / "extract_features.py"),
        "--output", str(output), "--dataset", "coco_mini", "--encoder", "mobilenet_v2",
        "--checkpoint", str(weights), "--encoder-options", '{"input_size": 256}',
        "--coco-annotations", str(coco_mini_dir / "instances.json"), "--image-dir", str(coco_mini_dir / "images"),
        "--limit", "24", "--batch-size", "2", "--images-per-shard", "2", "--no-progress",
        "--ray-address", "local", "--actor-num-cpus", "1", "--decode-num-cpus", "0.5",
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.endswith("_stats.json")
    }


def test_killed_job_resumes_to_identical_store(coco_mini_dir, mobilenet_v2_weights, tmp_path):
    env = dict(os.environ, RAY_DEDUP_LOGS="0", REFSEG_CODE_VERSION="refseg-test")  # commits may land meanwhile
    env.pop("RAY_ADDRESS", None)
    killed = tmp_path / "killed"
    killed_pid = kill_group_when(  # the job and the local Ray it started
        _job(killed, coco_mini_dir, mobilenet_v2_weights), lambda: len(list(killed.glob("*_stats.json"))) >= 2,
        "two finished shards", deadline_s=240, poll_s=0.05, cwd=REPO, env=env,
    )
    finished_before = len(list(killed.glob("*_stats.json")))
    assert 2 <= finished_before < 12 and not (killed / "manifest.json").exists()

    assert (killed / "_lease.json").exists() and list((killed / ".partial").iterdir())  # what the kill left
    reruns = {}
    for output in (killed, tmp_path / "clean"):
        result = subprocess.run(_job(output, coco_mini_dir, mobilenet_v2_weights), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        reruns[output] = result
    # The dead job's lease is taken over with a message, its scratch removed.
    assert f"taking over the lease of {killed}/ from run " in reruns[killed].stderr
    assert f"its process {killed_pid} on" in reruns[killed].stderr
    assert not (killed / "_lease.json").exists() and not (killed / ".partial").exists()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 24 and manifest["counts"]["shards"] == 12
    assert "already done" in result.stdout
    clean, resumed = _files(tmp_path / "clean"), _files(killed)
    assert clean.keys() == resumed.keys() and all(clean[n] == resumed[n] for n in clean)  # manifest included
