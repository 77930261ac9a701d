"""``refseg predict``: segment in a target image what a reference annotation marks.

    refseg predict --checkpoint CK --reference-image R.jpg \\
        (--reference-mask M.png | --box X0 Y0 X1 Y1 | --points X,Y [X,Y ...] | --scribble S.png) \\
        --target-image T.jpg --out-dir DIR [--sam-checkpoint SAM.pth] [--backbone-checkpoint BB.pth]

writes DIR/mask.png (0/255) and DIR/overlay.png. CK is a checkpoint file or a model that a training
run registered in MLflow (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
``runs:/<run id>/<path>``; ``--tracking-uri``, default MLFLOW_TRACKING_URI or <root>/mlflow.db);
either way the file is read with ``weights_only=True``. A checkpoint trained on the proxy SAM needs
no ``--sam-checkpoint`` (the shipped one), only ``--backbone-checkpoint`` (its MobileNetV2). ``--persam`` runs the training-free PerSAM baseline
from ``--sam-checkpoint`` alone (no method checkpoint). Clicked ``--points`` are drawn as small discs
by default (single pixels mostly vanish on a 64 x 64 feature grid); ``--point-style pixel`` is the
authors' single-pixel encoding.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.images import load_rgb
from pipeline.errors import DataError
from pipeline.inference.mlflow_model import MODEL_URI_SCHEMES


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a point is X,Y (e.g. 120,45), got {text!r}") from exc
    return (x, y)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a target image from a reference image + annotation (writes mask.png, overlay.png)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="method checkpoint (format refseg-model/2): a file or an MLflow models:/ URI")
    model.add_argument("--persam", action="store_true", help="training-free PerSAM from --sam-checkpoint")
    parser.add_argument("--reference-image", type=Path, required=True)
    annotation = parser.add_mutually_exclusive_group(required=True)
    annotation.add_argument("--reference-mask", type=Path, help="PNG mask of the reference (nonzero = object)")
    annotation.add_argument("--scribble", type=Path, help="PNG of scribble strokes on the reference (nonzero)")
    annotation.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    annotation.add_argument("--points", type=_point, nargs="+", metavar="X,Y")
    parser.add_argument("--target-image", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM weights (sam_vit_*.pth)")
    parser.add_argument("--backbone-checkpoint", type=Path, default=None, help="backbone weights")
    parser.add_argument("--sam-encoder", default="sam_vit_b", help="SAM encoder for --persam (default sam_vit_b)")
    parser.add_argument("--point-style", choices=("disc", "pixel"), default="disc", help="how --points are drawn")
    parser.add_argument("--tracking-uri", help="MLflow of models:/ URIs (default MLFLOW_TRACKING_URI or <root>/mlflow.db)")
    parser.add_argument("--root", help="refseg root whose mlflow.db holds models:/ URIs (default REFSEG_ROOT or the working dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--allow-random-init",
        action="store_true",
        help="build encoders without weights when no checkpoint is given (demos/tests only: random features)",
    )
    parser.set_defaults(handler=run_predict)


def _load_mask(path: Path, what: str, shape: tuple[int, int]) -> np.ndarray:
    from pipeline.data.images import load_label_png

    mask = load_label_png(path) if _is_single_channel(path) else load_rgb(path)[..., 0]
    if mask.shape != shape:
        raise DataError(f"{what} {path} is {mask.shape[1]} x {mask.shape[0]}, the reference image is {shape[1]} x {shape[0]}")
    if not (mask > 0).any():
        raise DataError(f"{what} {path} marks no pixel")
    return mask > 0


def _is_single_channel(path: Path) -> bool:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.mode in ("L", "P", "I", "I;16", "1")
    except OSError as exc:
        raise DataError(f"unreadable mask file {path}: {exc}") from exc


def run_predict(args: argparse.Namespace) -> int:
    # Imported here so `refseg --help` stays fast (torch / segment-anything load on use).
    from pipeline.inference.load import load_predictor
    from refseg_models.predictor import Box, Points, RefSegPredictor, Scribble

    is_model_uri = args.checkpoint is not None and args.checkpoint.startswith(MODEL_URI_SCHEMES)
    for flag, path in (
        ("--checkpoint", None if args.checkpoint is None or is_model_uri else Path(args.checkpoint)),
        ("--sam-checkpoint", args.sam_checkpoint),
        ("--backbone-checkpoint", args.backbone_checkpoint),
    ):
        if path is not None and not path.is_file():
            raise DataError(f"{flag}: file not found: {path}")
    reference = load_rgb(args.reference_image)
    target = load_rgb(args.target_image)
    shape = reference.shape[:2]
    if args.reference_mask is not None:
        annotation: Any = _load_mask(args.reference_mask, "reference mask", shape)
    elif args.scribble is not None:
        annotation = Scribble(_load_mask(args.scribble, "scribble", shape))
    elif args.box is not None:
        annotation = Box(*args.box)
    else:
        annotation = Points(tuple(args.points))
    # refseg_models errors (ModelError) reach the user as one line through pipeline.errors.run_cli.
    if args.persam:
        predictor = RefSegPredictor.training_free(
            "persam",
            sam_checkpoint=args.sam_checkpoint,
            sam_encoder=args.sam_encoder,
            device=args.device,
            allow_random_init=args.allow_random_init,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="refseg-model-") as tmp:
            checkpoint = _checkpoint_file(args, tmp) if is_model_uri else Path(args.checkpoint)
            predictor = load_predictor(checkpoint, args.sam_checkpoint, args.backbone_checkpoint, device=args.device,
                                       allow_random_init=args.allow_random_init)
    mask = predictor.predict(reference, annotation, target, point_style=args.point_style)
    from pipeline.inference.overlay import write_outputs

    mask_path, overlay_path = write_outputs(args.out_dir, target, mask)
    print(f"mask: {mask_path} ({int(mask.sum())} of {mask.size} pixels)\noverlay: {overlay_path}")
    return 0


def _checkpoint_file(args: argparse.Namespace, folder: str) -> Path:
    """The checkpoint file of an MLflow model URI, downloaded into ``folder``."""
    from pipeline.locations import resolve_root
    from pipeline.training import tracking

    uri = args.tracking_uri or tracking.default_tracking_uri(resolve_root(args.root))
    return tracking.model_checkpoint(args.checkpoint, uri, folder)
