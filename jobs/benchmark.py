"""Run a declared results table: `python jobs/benchmark.py benchmarks/cpu_small.yaml [--plan]` (= `refseg benchmark`).

Runs on an embedded local Ray by default and unchanged under `ray job submit --working-dir . --
python jobs/benchmark.py TABLE --root /shared/refseg` on a cluster; re-running it skips finished cells
and resumes an interrupted one (docs/benchmark.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
