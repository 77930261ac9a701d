"""The MLflow model of a refseg inference checkpoint: MLflow's ``python_function`` flavour with this
module as its loader.

A refseg MLflow model is the weights-only checkpoint file (``refseg-model/2``, under ``data/``) and
an ``MLmodel`` that names this module. ``mlflow.pyfunc.load_model("models:/...")`` imports it from
the installed refseg (no code and no pickle come from the artifact store) and calls
:func:`_load_pyfunc`, which reads the checkpoint with ``torch.load(weights_only=True)``.
``refseg predict --checkpoint models:/...`` does not go through pyfunc at all: it downloads the
checkpoint file and loads it like a local one (``pipeline.training.tracking.model_checkpoint``).

The frozen encoders are not in the model (SAM ViT-H alone is 2.5 GB); their identities (sha256 of
the weights) are, and the weights files are given when loading (a model trained on the proxy SAM
needs only the MobileNetV2 file; the proxy SAM ships with refseg)::

    model = mlflow.pyfunc.load_model("models:/refseg-vrp_sam-coco20i-1shot-mask/1", model_config={
        "sam_checkpoint": "sam_vit_h_4b8939.pth", "backbone_checkpoint": "resnet50_v2.pth"})
    masks = model.predict([{"reference_image": "ref.jpg", "box": [10, 20, 200, 240], "target_image": "t.jpg"}])

Each input row has ``reference_image`` and ``target_image`` (file paths) and one annotation:
``box`` (x0, y0, x1, y1), ``points`` ([[x, y], ...]) or ``reference_mask`` (a PNG path); the output
is one H x W uint8 mask (0 / 1) per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOADER_MODULE = __name__
CHECKPOINT_NAME = "refseg_model.pt"
# The MLflow URIs that name a model (registered version or alias, or a run's model folder).
MODEL_URI_SCHEMES = ("models:/", "runs:/")
# The settings a loader may give (``mlflow.pyfunc.load_model(..., model_config=...)``): MLflow only
# passes on keys the logged model declares, so the model is logged with these ("": not given).
LOAD_CONFIG = {"sam_checkpoint": "", "backbone_checkpoint": "", "device": "cpu"}


class RefSegPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns for a refseg model (wrapped by MLflow)."""

    def __init__(self, checkpoint: str | Path, config: Mapping[str, Any]) -> None:
        from pipeline.inference.load import load_predictor

        self.predictor = load_predictor(
            checkpoint, config.get("sam_checkpoint") or None, config.get("backbone_checkpoint") or None,
            device=config.get("device") or "cpu",
        )

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[Any]:
        import numpy as np

        from pipeline.data.images import load_label_png, load_rgb
        from refseg_models.predictor import Box, Points

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        masks = []
        for row in rows:
            reference, target = load_rgb(row["reference_image"]), load_rgb(row["target_image"])
            if row.get("box") is not None:
                annotation: Any = Box(*[float(v) for v in row["box"]])
            elif row.get("points") is not None:
                annotation = Points(tuple((float(x), float(y)) for x, y in row["points"]))
            else:
                annotation = load_label_png(row["reference_mask"]) > 0
            masks.append(self.predictor.predict(reference, annotation, target).astype(np.uint8))
        return masks


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> RefSegPyfunc:
    """MLflow's loader hook: ``data_path`` is the checkpoint file the model holds."""
    return RefSegPyfunc(data_path, dict(model_config or {}))
