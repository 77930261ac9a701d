"""The arithmetic precision a frozen encoder runs in: fp32 (the reference) or bf16 autocast.

``"float32"`` is the default everywhere and the reference every other precision is compared with.
``"bfloat16"`` runs the encoder's forward under ``torch.autocast(device, torch.bfloat16)``: matrix
products and convolutions in bf16 (fp32 accumulation), normalisations and softmax in fp32 where
autocast keeps them there; weights stay fp32. On an H100/H200 that is the tensor-core rate (~16x the
fp32 rate by the vendor's figures); on a CPU it is mainly a way to test the numerics here.
The features it gives are not the fp32 ones (measured closeness: docs/encoders.md), so the
precision is part of a store's feature-set key whenever it is not fp32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from refseg_models.errors import ModelError

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ModelError(f"unknown encoder precision {precision!r}; available: {', '.join(PRECISIONS)}")
    return precision


def encoder_autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The context a forward runs in on ``device`` at ``precision``: a frozen encoder's during
    extraction, and a training step's forward and loss (``TrainConfig.precision``)."""
    if check_precision(precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def per_token_cosine(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two B x C x h x w feature maps at every token (over C): B x h x w, in fp32.

    The closeness measure of a precision: 1 where the feature vectors point the same way. Tokens
    whose fp32 vector is (near) zero, e.g. after a ReLU, have no direction to keep and score low."""
    if reference.shape != other.shape or reference.ndim != 4:
        raise ModelError(f"per-token cosine needs two B x C x h x w maps of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(other.shape)}")
    return torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=1)
