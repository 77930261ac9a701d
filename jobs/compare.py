"""Compare trained methods from MLflow: `python jobs/compare.py --experiment coco20i --out-dir outputs/compare`
(the same as `refseg compare`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
