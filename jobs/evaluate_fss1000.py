"""Evaluate on FSS-1000's test split (HSNet's one-shot protocol): `python jobs/evaluate_fss1000.py --root ...`.

Every image of every test class (HSNet's `test.txt`: `--lists-dir` or `<root>/test.txt`) is a query
once, its supports drawn from the other images of its class by a seeded manifest (docs/protocol.md).
What predicts, as in `jobs/evaluate_coco20i.py`: `--checkpoint` (a trained method's inference
checkpoint) or `--method` naming a training-free method, with the frozen encoders' weights.

Runs on an embedded local Ray by default, and unchanged under `ray job submit` (RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import run_cli  # noqa: E402
from pipeline.evaluation.common import add_predictor_arguments, run_job  # noqa: E402
from pipeline.evaluation.fss1000 import Fss1000EvaluateConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Fss1000EvaluateConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="FSS-1000 folder (one folder per class)")
    parser.add_argument("--lists-dir", help="folder holding HSNet's test.txt (data/splits/fss; omit: <root>/test.txt)")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-episode support draws")
    parser.add_argument("--annotation-type", choices=("mask", "box", "scribble", "points"), default="mask")
    parser.add_argument("--output-dir", default="outputs/evaluate_fss1000")
    add_predictor_arguments(parser)
    args = parser.parse_args(argv)
    return Fss1000EvaluateConfig(**vars(args))


if __name__ == "__main__":
    sys.exit(run_cli(lambda: run_job(parse_args(), run), "evaluate_fss1000"))
