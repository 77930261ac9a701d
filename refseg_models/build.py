"""Explicit model registry: method name -> builder function.

Builders are named as ``"module:function"`` strings and imported on first use, so importing
``refseg_models`` stays cheap and one method's optional dependency never breaks another's import.
Each builder returns an ``nn.Module`` whose trainable parameters are exactly the method's learnable
part; frozen encoders are not part of it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from refseg_models.errors import ModelError

MODEL_BUILDERS: dict[str, str] = {
    "vrp_sam": "refseg_models.modeling.vrp_sam:build_vrp_sam",
    "prosam": "refseg_models.modeling.prosam:build_prosam",
    "fcp": "refseg_models.modeling.fcp:build_fcp",
    "segic": "refseg_models.modeling.segic:build_segic",
    "persam": "refseg_models.modeling.persam:build_persam",
    "prototype_matching": "refseg_models.modeling.prototype_matching:build_prototype_matching",
}


def available_models() -> list[str]:
    return sorted(MODEL_BUILDERS)


def _resolve(target: str) -> Callable[..., nn.Module]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def build_model(method: str, **config: Any) -> nn.Module:
    """Build ``method`` with the paper's default configuration, overridden by ``config``."""
    if method not in MODEL_BUILDERS:
        raise ModelError(f"unknown method {method!r}; available: {', '.join(available_models())}")
    return _resolve(MODEL_BUILDERS[method])(**config)
