"""Two real extraction jobs into the same output: the second is refused naming the first, which
finishes undisturbed (before the lease, each deleted the other's `.partial/` and one crashed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.store import verify_store

from test_extraction_kill import REPO, _job

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]


def test_a_second_job_on_the_same_output_is_refused_and_the_first_finishes(coco_mini_dir, mobilenet_v2_weights, tmp_path):
    env = dict(os.environ, RAY_DEDUP_LOGS="0", REFSEG_CODE_VERSION="refseg-test")
    env.pop("RAY_ADDRESS", None)
    output = tmp_path / "store"
    job = _job(output, coco_mini_dir, mobilenet_v2_weights) + ["--limit", "48"]  # long enough to overlap
    first = subprocess.Popen(
        job, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (output / "_lease.json").exists():  # the first job has started on the store
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first job never took the store"
            time.sleep(0.05)
        second = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first job ended before the second one checked the store"
        assert second.returncode == 2, second.stderr[-3000:]
        error_lines = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(error_lines) == 1 and "is being written by another run: run " in error_lines[0]
        assert f"pid {first.pid})" in error_lines[0] and "Traceback" not in second.stderr
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    assert verify_store(str(output)).ok
    assert not list(output.glob(".partial")) and not (output / "_lease.json").exists()
    again = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already done 24" in again.stdout, again.stderr[-3000:]
