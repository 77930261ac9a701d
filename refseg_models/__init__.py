"""refseg_models: pure PyTorch models, frozen encoders and losses (no Ray, no MLflow)."""

from refseg_models.build import available_models, build_model

__all__ = ["available_models", "build_model"]
