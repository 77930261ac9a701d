"""Train a method on COCO-20i folds: `python jobs/train_coco20i.py --annotations ... --images ...`.

Runs on an embedded local Ray by default (MLflow: sqlite in the working directory) and unchanged
under `ray job submit --working-dir . -- python jobs/train_coco20i.py ...` on a cluster. Re-running
the same command resumes; see `python jobs/train_coco20i.py --help` and docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.training.commands import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main("coco20i", description=__doc__.splitlines()[0]))
