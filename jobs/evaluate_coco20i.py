"""Evaluate on COCO-20i folds: `python jobs/evaluate_coco20i.py --annotations ... --images ...`.

What predicts: `--checkpoint` (a trained method's inference checkpoint, e.g. from a training run's
MLflow artifacts) or `--method` naming a training-free method (prototype_matching, persam), with the
frozen encoders' weights (`--backbone-checkpoint`, `--sam-checkpoint`).

Runs on an embedded local Ray by default, and unchanged under `ray job submit -- python
jobs/evaluate_coco20i.py ...` on a cluster (Ray picks up RAY_ADDRESS there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import run_cli  # noqa: E402
from pipeline.locations import check_durable  # noqa: E402
from pipeline.evaluation.job import EvaluateConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="COCO instances json")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--checkpoint", help="inference checkpoint of a trained method (refseg-model/2)")
    parser.add_argument("--method", help="a training-free method (default: prototype_matching); with --checkpoint: omit it, or give the method the checkpoint holds")
    parser.add_argument("--method-options", type=json.loads, default={}, help='its config options (JSON), e.g. \'{"feature": "layer3"}\'')
    parser.add_argument("--backbone-checkpoint", help="backbone weights (e.g. MobileNetV2)")
    parser.add_argument("--sam-encoder", default="sam_proxy_mobilenet_v2", help="SAM encoder (training-free SAM methods)")
    parser.add_argument("--sam-checkpoint", help="SAM weights (SAM-prompt methods; default for the proxy: the shipped file)")
    parser.add_argument("--lists-dir", help="HSNet COCO-20i lists folder (omit: pixel-rule pairs)")
    parser.add_argument("--layout", choices=("2017", "2014"), default="2017")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--n-episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotation-type", choices=("mask", "box", "scribble", "points"), default="mask")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--resolution-mode", choices=("fixed", "original"), default="fixed")
    parser.add_argument("--resolution-size", type=int, default=512)
    parser.add_argument(
        "--crowd",
        choices=("background", "ignore"),
        default="background",
        help="COCO crowd regions: background as in HSNet's COCO-20i masks (default, HSNet-comparable) or ignore (255)",
    )
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--output-dir", default="outputs/evaluate")
    args = parser.parse_args(argv)
    return EvaluateConfig(**{key: value for key, value in vars(args).items()})


def main() -> int:
    config = parse_args()
    check_durable({"the output folder (--output-dir)": config.output_dir}, hint="give --output-dir a shared absolute path")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "evaluate_coco20i"))
