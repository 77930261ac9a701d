"""A real training driver process for SegIC's kill-and-resume test: the training job
(``run_training``: embedded local Ray, MLflow) on a TrainConfig given as JSON, as
``jobs/train_segic.py`` runs it (the test's derived mix and small stores have no command-line form).

    python tests/segic_train_process.py CONFIG.json TRACKING_URI

Re-running it with the same configuration resumes the run (same run name).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.locations import resolve_root  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.job import JobOptions, run_training  # noqa: E402


def main() -> int:
    config_path, tracking_uri = sys.argv[1], sys.argv[2]
    cfg = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    options = JobOptions(folds=(cfg.fold,), tracking_uri=tracking_uri, root=resolve_root(str(Path(config_path).parent)),
                         ray_init_kwargs={"num_cpus": 2, "include_dashboard": False})
    run_training(cfg, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
