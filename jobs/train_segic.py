"""Train SegIC on its mixed datasets, evaluated on COCO-20i folds: `python jobs/train_segic.py --annotations ... --images ...`.

The same training job as jobs/train_coco20i.py (the same loop, config, checkpoints, MLflow, resume and
`refseg compare`) with SegIC's defaults: `--method segic --sampler segic_mixed` (the recipe of SegIC's
mix: AdamW lr 1e-4, wd 1e-4, x0.1 at epoch 10 of 12, batch 32, 160k samples per epoch). The mix
(COCO semantic + instances of the fold's base classes by default; ADE20k, LVIS and FSS-1000 with their paths) is
`--mix mix.json`; see docs/segic_training.md and `python jobs/train_segic.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.training.commands import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main("coco20i", description=__doc__.splitlines()[0],
                        defaults={"method": "segic", "sampler": "segic_mixed", "backbone": "dinov2_vitl14"}))
