"""Evaluate on COCO-20i folds: `python jobs/evaluate_coco20i.py --annotations ... --images ...`.

What predicts: `--checkpoint` (a trained method's inference checkpoint, e.g. from a training run's
MLflow artifacts) or `--method` naming a training-free method (prototype_matching, persam), with the
frozen encoders' weights (`--backbone-checkpoint`, `--sam-checkpoint`).

Runs on an embedded local Ray by default, and unchanged under `ray job submit -- python
jobs/evaluate_coco20i.py ...` on a cluster (Ray picks up RAY_ADDRESS there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import run_cli  # noqa: E402
from pipeline.evaluation.common import add_predictor_arguments, run_job  # noqa: E402
from pipeline.evaluation.job import EvaluateConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="COCO instances json")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--lists-dir", help="HSNet COCO-20i lists folder (omit: pixel-rule pairs)")
    parser.add_argument("--layout", choices=("2017", "2014"), default="2017")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--n-episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotation-type", choices=("mask", "box", "scribble", "points"), default="mask")
    parser.add_argument(
        "--crowd",
        choices=("background", "ignore"),
        default="background",
        help="COCO crowd regions: background as in HSNet's COCO-20i masks (default, HSNet-comparable) or ignore (255)",
    )
    parser.add_argument("--output-dir", default="outputs/evaluate")
    add_predictor_arguments(parser)
    args = parser.parse_args(argv)
    return EvaluateConfig(**{key: value for key, value in vars(args).items()})


if __name__ == "__main__":
    sys.exit(run_cli(lambda: run_job(parse_args(), run), "evaluate_coco20i"))
