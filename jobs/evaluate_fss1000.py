"""Evaluate on FSS-1000's test split (HSNet's one-shot protocol): `python jobs/evaluate_fss1000.py --root ...`.

Every image of every test class (HSNet's `test.txt`: `--lists-dir` or `<root>/test.txt`) is a query
once, its supports drawn from the other images of its class by a seeded manifest (docs/protocol.md).
What predicts, as in `jobs/evaluate_coco20i.py`: `--checkpoint` (a trained method's inference
checkpoint) or `--method` naming a training-free method, with the frozen encoders' weights.

Runs on an embedded local Ray by default, and unchanged under `ray job submit` (RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import run_cli  # noqa: E402
from pipeline.locations import check_durable  # noqa: E402
from pipeline.evaluation.fss1000 import Fss1000EvaluateConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Fss1000EvaluateConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="FSS-1000 folder (one folder per class)")
    parser.add_argument("--lists-dir", help="folder holding HSNet's test.txt (data/splits/fss; omit: <root>/test.txt)")
    parser.add_argument("--checkpoint", help="inference checkpoint of a trained method (refseg-model/2)")
    parser.add_argument("--method", help="a training-free method (default: prototype_matching); with --checkpoint: omit it, or give the method the checkpoint holds")
    parser.add_argument("--method-options", type=json.loads, default={}, help="its config options (JSON)")
    parser.add_argument("--backbone-checkpoint", help="backbone weights (e.g. MobileNetV2)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--backbone-options", type=json.loads, default={},
                        help='backbone builder options (JSON), e.g. \'{"input_size": 224}\' (default: the builder\'s)')
    parser.add_argument("--sam-encoder", default="sam_proxy_mobilenet_v2", help="SAM encoder (training-free SAM methods)")
    parser.add_argument("--sam-checkpoint", help="SAM weights (SAM-prompt methods; default for the proxy: the shipped file)")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-episode support draws")
    parser.add_argument("--annotation-type", choices=("mask", "box", "scribble", "points"), default="mask")
    parser.add_argument("--resolution-mode", choices=("fixed", "original"), default="fixed")
    parser.add_argument("--resolution-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--output-dir", default="outputs/evaluate_fss1000")
    args = parser.parse_args(argv)
    return Fss1000EvaluateConfig(**vars(args))


def main() -> int:
    config = parse_args()
    check_durable({"the output folder (--output-dir)": config.output_dir}, hint="give --output-dir a shared absolute path")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "evaluate_fss1000"))
