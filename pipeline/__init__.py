"""refseg pipeline: data, episodes, feature store, extraction, training, evaluation, tracking.

Ray and MLflow live here; the models in :mod:`refseg_models` are pure PyTorch.
"""

__version__ = "0.1.0"
