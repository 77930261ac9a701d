#!/usr/bin/env bash
# The packages bench/gpu_suite.py needs that the device machines' image lacks (its list:
# /work/.library/device/KINDS.md there; Ray and MLflow are not needed), as wheels in .whl/
# (git-ignored) for the device tool's `carry`: ~0.5 MB. Versions as pinned in constraints.txt; the
# machines run CPython 3.12 on x86-64. Run once in the checkout the device tool sends.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=$(grep -iE '^(segment-anything|webdataset|braceexpand|pycocotools)==' constraints.txt)
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $packages
ls -l .whl
