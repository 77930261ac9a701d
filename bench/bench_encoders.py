"""Seconds per image of each frozen encoder's forward (random weights: speed does not depend on them).

    .venv/bin/python bench/bench_encoders.py --encoders mobilenet_v2 resnet50_v2 sam_vit_tiny --repeats 3

Prints one line per encoder: median seconds per image over ``--repeats`` timed runs after a warm-up,
with the machine named. Use it to decide what to cache (see docs/feature_store.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_sam: the tiny SAM ViT tests and benchmarks register
sys.path.insert(0, str(REPO))

from refseg_models.encoders import available_encoders, build_encoder  # noqa: E402
from tiny_sam import tiny_sam_registered  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["mobilenet_v2", "resnet50_v2", "vgg16", "sam_vit_tiny"],
                        choices=available_encoders())
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}, {args.threads} threads"
    print(f"machine: {platform.node()} ({name}); torch {torch.__version__}")
    for encoder_name in args.encoders:
        encoder = build_encoder(encoder_name, allow_random_init=True).to(device)
        batch = torch.randn(args.batch, 3, encoder.input_size, encoder.input_size, device=device)
        timings = []
        with torch.inference_mode():
            encoder(batch)  # warm-up
            for _ in range(args.repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                encoder(batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                timings.append((time.perf_counter() - started) / args.batch)
        parameters = sum(p.numel() for p in encoder.parameters()) / 1e6
        print(f"{encoder_name:16s} input {encoder.input_size:4d}  {statistics.median(timings):8.3f} s/image  "
              f"({parameters:.1f}M params)", flush=True)


if __name__ == "__main__":
    with tiny_sam_registered():
        main()
