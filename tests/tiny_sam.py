"""The tiny SAM ViT of tests and benchmarks: ``sam_vit_tiny`` (SAM's image encoder geometry with 2
blocks of width 96, refseg_models/encoders/sam_image_encoder.py ``vit_tiny``), registered by the
tests and benchmarks that use it, never by refseg itself.

In a process of its own (a job submitted to a test cluster, a script)::

    python tests/tiny_sam.py jobs/train_coco20i.py --sam-encoder sam_vit_tiny ...

runs the script with the name registered (the extraction actors get the builder with their
encoder; the training workers get the identities from the driver: neither needs the name).
"""

from __future__ import annotations

import runpy
import sys
from contextlib import AbstractContextManager

from refseg_models.encoders import ENCODERS

TINY_SAM = "sam_vit_tiny"
TINY_SAM_TARGET = "refseg_models.encoders.sam_image_encoder:build_sam_vit_tiny"


def tiny_sam_registered() -> AbstractContextManager[None]:
    """``sam_vit_tiny`` in the encoder registry inside the ``with`` block."""
    return ENCODERS.registered(TINY_SAM, TINY_SAM_TARGET)


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    with tiny_sam_registered():
        runpy.run_path(script, run_name="__main__")
