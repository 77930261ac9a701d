"""bench/gpu_suite.py works before a GPU ever sees it: its smoke mode end to end on the CPU, under
the device machines' package set (no Ray, no MLflow: imports of them fail here as they would
there), and its time box / fail-soft rules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# What the device machines' image lacks among refseg's dependencies (/work/.library/device/KINDS.md
# lists what it has); segment-anything, webdataset, braceexpand and pycocotools travel as wheels.
ABSENT_ON_DEVICE = ("ray", "mlflow", "boto3", "moto")
BLOCKER = f'''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_DEVICE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the device machines)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
'''


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smoke_mode_runs_every_section_without_ray_or_mlflow(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    process = subprocess.run(
        [sys.executable, "bench/gpu_suite.py", "--smoke", "--budget-s", "900", "--out", str(out), "--commit", "test"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1100,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and result["commit"] == "test" and result["card"]["device"] == "cpu"
    assert "gpu_suite.py --smoke" in result["command"] and result["versions"]["torch"]
    sections = result["sections"]
    assert list(sections) == ["ceilings", "encoders", "extraction", "training", "cosine", "profile", "compile"]
    assert sections["ceilings"] == {"status": "skipped", "reason": "no CUDA device", "seconds": sections["ceilings"]["seconds"]}
    assert sections["compile"]["status"] == "skipped"
    for name in ("encoders", "extraction", "training", "cosine", "profile"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    for name in ("encoders", "extraction", "training", "cosine"):
        rows = sections[name]["results"]["rows"]
        assert rows and all(row["status"] == "ok" for row in rows), (name, rows)
    encoders = sections["encoders"]["results"]["rows"]
    assert {(r["encoder"], r["precision"], r["attention"]) for r in encoders} >= {
        ("sam_vit_tiny", "float32", "sdpa"), ("sam_vit_tiny", "bfloat16", "sdpa"),
        ("sam_vit_tiny", "float32", "segment_anything"),
    }
    assert all(r["images_per_s"] > 0 for r in encoders)
    # Through a real store: every image written, none failed.
    for row in sections["extraction"]["results"]["rows"]:
        assert (row["images"], row["failed"]) == (row["images_requested"], 0) and row["images_per_s"] > 0
    training = sections["training"]["results"]["rows"]
    assert {r["method"] for r in training} == {"vrp_sam", "prosam", "fcp"}
    assert any(r["fused_adamw"] and r["precision"] == "bfloat16" for r in training)
    assert all(r["episodes_per_s_step"] > 0 and r["episodes_per_s_with_online_backbone"] > 0 for r in training)
    (cosine,) = sections["cosine"]["results"]["rows"]
    assert 0.99 < cosine["cosine_min"] <= cosine["cosine_mean"] <= 1.0
    profile = sections["profile"]["results"]
    assert all(entry["top"] for entry in profile.values()) and len(profile) == 2
    assert "encoders: ok" in process.stdout  # the closing table


def test_sections_fail_soft_and_skip_when_the_budget_is_spent(tmp_path):
    suite_module = _suite_module()
    out = tmp_path / "suite.json"
    suite = suite_module.Suite(out, budget_s=30.0, header={"commit": "x"})
    cpu = torch.device("cpu")

    def broken(deadline):
        raise RuntimeError("a section that fails")

    def works(deadline):
        assert deadline <= time.perf_counter() + 12.0  # the section's cap
        return {"rows": [{"status": "ok"}]}

    def unavailable(deadline):
        raise suite_module.Skip("needs a GPU")

    suite.section("broken", broken, min_s=1, cap_s=10, device=cpu)
    suite.section("works", works, min_s=1, cap_s=10, device=cpu)
    suite.section("unavailable", unavailable, min_s=1, cap_s=10, device=cpu)
    suite.section("too_big", works, min_s=60, cap_s=60, device=cpu)
    written = json.loads(out.read_text())["sections"]  # written after every section
    assert written["broken"]["status"] == "error" and "a section that fails" in written["broken"]["error"]
    assert "RuntimeError" in written["broken"]["traceback"]
    assert written["works"]["status"] == "ok" and written["works"]["results"] == {"rows": [{"status": "ok"}]}
    assert written["unavailable"] == {"status": "skipped", "reason": "needs a GPU", "seconds": written["unavailable"]["seconds"]}
    assert written["too_big"]["status"] == "skipped" and "needs 60 s" in written["too_big"]["reason"]

    calls = []
    rows = suite_module.configurations([1, 2, 3], time.perf_counter() + 60, lambda c: calls.append(c) or (
        {"value": c} if c != 2 else (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory"))))
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"] and calls == [1, 2, 3]
    late = suite_module.configurations([1], time.perf_counter() - 1, lambda c: {"value": c})
    assert late == [{"config": 1, "status": "skipped", "reason": "section budget spent"}]
