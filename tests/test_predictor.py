"""The user-facing predictor and the ``predict`` CLI command, through the method contract.

End to end on real coco_mini images with the real MobileNetV2: a SegIC decoder is trained briefly
in feature space (the same geometry the predictor uses), saved as a ``refseg-model/2`` inference
checkpoint, and the predictor, run on the RAW images, must reproduce its accuracy against the GT
mask at the target's original size (a wrong frame mapping would not). PerSAM and VRP-SAM run through
the same predictor with a random-init ``sam_vit_tiny`` (no real SAM weights exist here): shapes,
geometry and agreement with a hand-run pipeline are checked, not accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refseg_models import build_model
from refseg_models.checkpoint import (
    CHECKPOINT_FORMAT,
    EncoderIdentity,
    check_encoders,
    load_inference_checkpoint,
    model_from_checkpoint,
    save_inference_checkpoint,
    weights_sha256,
)
from refseg_models.errors import ModelError
from refseg_models.frames import Frame, frame_of
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.segic_instructions import masks_to_boxes
from refseg_models.predictor import Box, Points, RefSegPredictor, Scribble, annotation_to_mask

from coco_helpers import coco_class_pairs

pytestmark = pytest.mark.usefixtures("tiny_sam")  # sam_vit_tiny: tests/tiny_sam.py

SEGIC_CONFIG = dict(
    in_channels=1280,
    input_size=128,
    feature_size=16,
    mask_down_strides=[4, 2],
    similarity_size=16,
    feature_key="layer4",
    loss_points=64 * 64,
)
RANDOM_MOBILENET = EncoderIdentity("mobilenet_v2", "random-init", "vrp512_squash_tf128")


# ----------------------------------------------------------------------------- annotations


def test_annotation_types_become_binary_masks() -> None:
    shape = (40, 60, 3)
    box = annotation_to_mask(Box(10, 5, 20, 15), shape)
    assert box.sum() == 11 * 11 and box[5, 10] and box[15, 20] and not box[16, 20]
    assert np.array_equal(annotation_to_mask((10, 5, 20, 15), shape), box)  # flat 4-tuple = box
    points = annotation_to_mask(Points(((30.0, 20.0),)), shape)
    assert points[20, 30] and points.sum() > 1 and points.sum() < 20  # a small disc (users' clicks)
    assert np.array_equal(annotation_to_mask([(30, 20)], shape), points)
    pixel = annotation_to_mask(Points(((30.0, 20.0),)), shape, point_style="pixel")  # the authors' encoding
    assert pixel[20, 30] and pixel.sum() == 1
    raw = np.zeros((40, 60), np.uint8)
    raw[3:9, 4:7] = 255
    assert np.array_equal(annotation_to_mask(raw, shape), raw > 0)
    assert np.array_equal(annotation_to_mask(Scribble(raw), shape), raw > 0)


def test_boxes_are_clipped_to_the_image_and_one_outside_it_draws_nothing() -> None:
    """One rasteriser (refseg_models.annotations.box_masks) for every box: a box partly outside the
    reference is clipped; one entirely above or left of it draws nothing (slicing with its negative
    corner used to wrap around and fill the image's other side), so the predictor refuses it."""
    from refseg_models.annotations import draw_box

    shape = (40, 60, 3)
    clipped = annotation_to_mask(Box(-5, -3, 9, 4), shape)
    assert clipped.sum() == 10 * 5 and clipped[0, 0] and clipped[4, 9]
    for outside in ((10, -9, 20, -3), (-9, 10, -3, 20), (70, 10, 80, 20)):
        assert not draw_box(shape[:2], outside).any()
        with pytest.raises(ModelError, match="covers no pixel of the reference image"):
            annotation_to_mask(Box(*outside), shape)


@pytest.mark.parametrize(
    "annotation, message",
    [
        (np.zeros((40, 60)), "covers no pixel"),
        (np.ones((41, 60)), "shape"),
        (Box(20, 5, 10, 15), "x0 <= x1"),
        ([(70, 5)], "outside"),
        ([], "no reference points"),
        ("mask.png", "unsupported"),
    ],
)
def test_bad_annotations_are_refused(annotation, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        annotation_to_mask(annotation, (40, 60, 3))


# ----------------------------------------------------------------------------- frames


@pytest.mark.parametrize("padded", [True, False])
def test_frame_round_trip(padded: bool) -> None:
    mask = np.zeros((300, 500), bool)
    mask[40:200, 100:420] = True
    frame = Frame((300, 500), 256, padded)
    inside = frame.mask_to_frame(mask)
    assert inside.shape == (256, 256)
    if padded:
        assert frame.valid == (154, 256) and inside[154:].sum() == 0
    else:
        assert frame.valid == (256, 256)
    back = frame.logits_to_image((inside * 2 - 1)[None, None])
    iou = (back & mask).sum() / (back | mask).sum()
    assert back.shape == (300, 500) and iou > 0.97


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("segic", **SEGIC_CONFIG)
    path = save_inference_checkpoint(tmp_path / "ck" / "segic.pt", model, {"backbone": RANDOM_MOBILENET}, {"run": "r1"})
    payload = torch.load(path, weights_only=True)  # plain data only
    assert payload["format"] == CHECKPOINT_FORMAT and payload["method"] == "segic"
    assert payload["encoders"]["backbone"]["encoder_id"] == "mobilenet_v2" and payload["meta"] == {"run": "r1"}
    assert set(payload["state_dict"]) == set(model.trainable_state_dict())
    rebuilt = model_from_checkpoint(load_inference_checkpoint(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k

    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_inference_checkpoint(tmp_path / "nothere.pt")
    torch.save({"format": "other/2"}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="refseg-model/2"):
        load_inference_checkpoint(tmp_path / "bad.pt")
    payload["state_dict"].pop("neck.layers.0.weight")
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelError, match=r"missing keys \(1\): neck.layers.0.weight.*unexpected keys \(1\): extra.weight"):
        model_from_checkpoint(load_inference_checkpoint(tmp_path / "edited.pt"))
    with pytest.raises(ModelError, match="identities missing"):
        save_inference_checkpoint(tmp_path / "x.pt", model, {"sam": RANDOM_MOBILENET})
    with pytest.raises(ModelError, match="meta.path"):
        save_inference_checkpoint(tmp_path / "x.pt", model, {"backbone": RANDOM_MOBILENET}, {"path": Path("x")})
    # other encoder weights / preprocessing than the checkpoint's are refused, naming each difference
    loaded = load_inference_checkpoint(path)
    other = EncoderIdentity("mobilenet_v2", "ab" * 32, "vrp256_squash_tf128")
    with pytest.raises(ModelError, match=r"backbone weights_sha256: checkpoint has 'random-init'.*preprocessing_id"):
        check_encoders(loaded, {"backbone": other})


def test_sam_prompt_checkpoints_hold_only_the_trainable_part(tmp_path: Path) -> None:
    model = build_model("vrp_sam", backbone_channels=(16, 24, 40), allow_random_init=True)
    sam = EncoderIdentity("sam_vit_tiny", "random-init", "vrp512_to1024_imagenet")
    path = save_inference_checkpoint(tmp_path / "v.pt", model, {"sam": sam, "backbone": RANDOM_MOBILENET})
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("sam_decoder.") for k in state)  # the frozen SAM decoder comes from SAM's file
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.trainable_parameters())


def test_predictor_refuses_missing_or_other_encoder_weights(tmp_path: Path) -> None:
    model = build_model("segic", **SEGIC_CONFIG)
    path = save_inference_checkpoint(tmp_path / "segic.pt", model, {"backbone": RANDOM_MOBILENET})
    with pytest.raises(ModelError, match="needs a checkpoint path"):
        RefSegPredictor.from_checkpoint(path)  # no backbone weights and no allow_random_init
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        RefSegPredictor.from_checkpoint(path, backbone_checkpoint=tmp_path / "missing.pth")
    from refseg_models.encoders import build_encoder

    other = tmp_path / "other_mobilenet.pth"
    torch.save(build_encoder("mobilenet_v2", allow_random_init=True).state_dict(), other)
    with pytest.raises(ModelError, match="trained on other frozen features.*weights_sha256"):
        RefSegPredictor.from_checkpoint(path, backbone_checkpoint=other)


# ----------------------------------------------------------------------------- real pairs


def _pairs(coco_dir: Path, count: int):
    return coco_class_pairs(coco_dir, count, min_cover=0.1)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def trained_segic(tmp_path_factory, coco_mini_dir: Path, mobilenet_v2_weights: Path):
    """SegIC trained in feature space on 2 real pairs (through the contract), saved as a checkpoint."""
    from refseg_models.encoders import build_encoder

    torch.manual_seed(0)
    pairs = _pairs(coco_mini_dir, 2)
    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights)
    model = build_model("segic", **SEGIC_CONFIG)
    size = SEGIC_CONFIG["input_size"]
    ref_images = [_rgb(p[0][0]) for p in pairs]
    tgt_images = [_rgb(p[1][0]) for p in pairs]
    with torch.no_grad():
        ref = backbone(torch.stack([backbone.preprocess(i) for i in ref_images]))["layer4"]
        tgt = backbone(torch.stack([backbone.preprocess(i) for i in tgt_images]))["layer4"]
    # the predictor's own frame mapping (squash 512 frame, scaled to the model input size)
    ref_masks = torch.stack(
        [frame_of(backbone, i.shape[:2]).scaled(size).mask_to_frame(p[0][1] > 0) for i, p in zip(ref_images, pairs)]
    )[:, None]
    tgt_masks = torch.stack(
        [frame_of(backbone, i.shape[:2]).scaled(size).mask_to_frame(p[1][1] > 0) for i, p in zip(tgt_images, pairs)]
    )
    features = EpisodeFeatures(
        reference_masks=ref_masks, target_backbone={"layer4": tgt}, reference_backbone={"layer4": ref[:, None]},
        target_boxes=masks_to_boxes(tgt_masks),
    )
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss = model.loss(model(features, generator=g), tgt_masks, torch.ones_like(tgt_masks))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    identity = EncoderIdentity.of(backbone, mobilenet_v2_weights)
    path = save_inference_checkpoint(tmp_path_factory.mktemp("ck") / "segic.pt", model.eval(), {"backbone": identity})
    return path, pairs


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & (gt > 0)).sum() / max((pred | (gt > 0)).sum(), 1))


@pytest.mark.real_data
@pytest.mark.real_weights
@pytest.mark.slow
def test_predictor_reproduces_trained_segic_at_original_size(trained_segic, mobilenet_v2_weights: Path) -> None:
    path, pairs = trained_segic
    predictor = RefSegPredictor.from_checkpoint(path, backbone_checkpoint=mobilenet_v2_weights)
    ious = []
    for (ref_path, ref_mask), (tgt_path, tgt_mask) in pairs:
        target = _rgb(tgt_path)
        pred = predictor.predict(_rgb(ref_path), ref_mask, target)
        assert pred.dtype == bool and pred.shape == target.shape[:2]
        ious.append(_iou(pred, tgt_mask))
    print(f"predictor IoU at original size: {ious}")
    assert np.mean(ious) >= 0.6
    # every annotation type runs (box / points / scribble rasterised, then the same path)
    (ref_path, ref_mask), (tgt_path, _) = pairs[0]
    x0, y0, x1, y1 = masks_to_boxes(torch.from_numpy(ref_mask)[None].float())[0].tolist()
    ys, xs = np.nonzero(ref_mask)
    reference, target = _rgb(ref_path), _rgb(tgt_path)
    for annotation in (Box(x0, y0, x1, y1), Points(tuple(zip(xs[::500][:20], ys[::500][:20]))), Scribble(ref_mask)):
        assert predictor.predict(reference, annotation, target).shape == target.shape[:2]
    # k-shot: two references
    assert predictor.predict([reference, reference], [ref_mask, Box(x0, y0, x1, y1)], target).shape == target.shape[:2]


@pytest.mark.real_data
def test_persam_predictor_geometry_matches_a_hand_run(coco_mini_dir: Path) -> None:
    pairs = _pairs(coco_mini_dir, 1)
    (ref_path, ref_mask), (tgt_path, _) = pairs[0]
    reference, target = _rgb(ref_path), _rgb(tgt_path)
    torch.manual_seed(0)
    predictor = RefSegPredictor.training_free("persam", sam_encoder="sam_vit_tiny", allow_random_init=True)
    pred = predictor.predict(reference, ref_mask, target)
    assert pred.shape == target.shape[:2] and pred.dtype == bool
    # by hand: SAM's longest-side frame, mask mapped into it, logits cropped to the valid region
    encoder, model = predictor.encoders["sam"], predictor.model
    with torch.no_grad():
        emb_t = encoder(encoder.preprocess(target)[None])["image_embedding"]
        emb_r = encoder(encoder.preprocess(reference)[None])["image_embedding"]
        h, w = target.shape[:2]
        scale = 1024 / max(h, w)
        vh, vw = int(h * scale + 0.5), int(w * scale + 0.5)
        rh, rw = reference.shape[:2]
        rs = 1024 / max(rh, rw)
        rmask = F.interpolate(torch.from_numpy(ref_mask > 0).float()[None, None], (int(rh * rs + 0.5), int(rw * rs + 0.5)), mode="nearest")
        rmask = F.pad(rmask, (0, 1024 - rmask.shape[-1], 0, 1024 - rmask.shape[-2]))
        out = model.segment(emb_t, emb_r[:, None], rmask, valid_sizes=[(vh, vw)])
        full = F.interpolate(out["mask_logits"], (1024, 1024), mode="bilinear", align_corners=False)[..., :vh, :vw]
        expected = (F.interpolate(full, (h, w), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
    assert np.array_equal(pred, expected)
    assert (out["points"][0, :, 0] < vw).all() and (out["points"][0, :, 1] < vh).all()


@pytest.mark.real_data
@pytest.mark.real_weights
@pytest.mark.parametrize("method", ["vrp_sam", "prosam", "fcp"])
def test_sam_prompt_methods_run_through_the_predictor(
    method: str, tmp_path: Path, coco_mini_dir: Path, mobilenet_v2_weights: Path
) -> None:
    torch.manual_seed(0)
    model = build_model(method, backbone_channels=[32, 96, 1280], allow_random_init=True)
    identities = {
        "sam": EncoderIdentity("sam_vit_tiny", "random-init", "vrp512_to1024_imagenet"),
        "backbone": EncoderIdentity("mobilenet_v2", weights_sha256(mobilenet_v2_weights), "vrp512_squash_tf128"),
    }
    path = save_inference_checkpoint(tmp_path / "m.pt", model, identities)
    predictor = RefSegPredictor.from_checkpoint(path, backbone_checkpoint=mobilenet_v2_weights, allow_random_init=True)
    (ref_path, ref_mask), (tgt_path, _) = _pairs(coco_mini_dir, 1)[0]
    reference, target = _rgb(ref_path), _rgb(tgt_path)
    pred = predictor.predict(reference, ref_mask, target)
    assert pred.shape == target.shape[:2] and pred.dtype == bool
    # by hand: 512 squash frame, the method's 512 x 512 logits resized to the original size (FCP also
    # reads the reference's SAM embedding; ProSAM predicts from its mean prompt in eval mode)
    from refseg_models.modeling.inputs import EpisodeFeatures
    from refseg_models.modeling.pseudo_mask import masked_reference_layer4

    backbone, sam = predictor.encoders["backbone"], predictor.encoders["sam"]
    with torch.no_grad():
        tgt = backbone(backbone.preprocess(target)[None])
        ref = backbone(backbone.preprocess(reference)[None])
        small = Image.fromarray(ref_mask * 255).resize((512, 512), Image.NEAREST)
        mask = torch.from_numpy(np.asarray(small) > 127).float()[None, None]
        features = EpisodeFeatures(
            target_sam=sam(sam.preprocess(target)[None])["image_embedding"],
            reference_sam=sam(sam.preprocess(reference)[None])["image_embedding"][:, None] if method == "fcp" else None,
            target_backbone=tgt,
            reference_backbone={k: v[:, None] for k, v in ref.items()},
            reference_masks=mask,
            reference_masked_layer4=masked_reference_layer4(backbone, ref["layer3"], mask[:, 0])[:, None],
        )
        logits = predictor.model.mask_logits(predictor.model(features))
        expected = (F.interpolate(logits, target.shape[:2], mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
    print(f"{method}: foreground {expected.mean():.3f} by hand, {pred.mean():.3f} predicted, agreement {(pred == expected).mean():.4f}")
    assert 0.01 < expected.mean() < 0.99  # a real mask, so that agreement means something
    # PIL and torch nearest resizes round differently on edges; a random SAM decoder amplifies that
    assert (pred == expected).mean() > 0.995
    if method == "vrp_sam":
        with pytest.raises(ModelError, match="different frames"):
            RefSegPredictor(predictor.model, {"sam": _sam_pad_encoder(), "backbone": backbone})


def _sam_pad_encoder():
    from refseg_models.encoders import build_encoder

    return build_encoder("sam_vit_tiny", allow_random_init=True, preprocessing="sam_longest1024_pad")


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from pipeline.inference.commands import register

    parser = argparse.ArgumentParser(prog="refseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.real_data
@pytest.mark.real_weights
@pytest.mark.slow
def test_cli_predict_writes_mask_and_overlay(tmp_path: Path, trained_segic, mobilenet_v2_weights: Path) -> None:
    checkpoint, pairs = trained_segic
    (ref_path, ref_mask), (tgt_path, tgt_mask) = pairs[0]
    mask_png = tmp_path / "ref_mask.png"
    Image.fromarray(ref_mask * 255).save(mask_png)
    out_dir = tmp_path / "out"
    args = _parser().parse_args(
        [
            "predict",
            "--checkpoint", str(checkpoint),
            "--reference-image", str(ref_path),
            "--reference-mask", str(mask_png),
            "--target-image", str(tgt_path),
            "--out-dir", str(out_dir),
            "--backbone-checkpoint", str(mobilenet_v2_weights),
        ]
    )
    assert args.handler(args) == 0
    mask = np.asarray(Image.open(out_dir / "mask.png"))
    overlay = np.asarray(Image.open(out_dir / "overlay.png"))
    target = _rgb(tgt_path)
    assert mask.shape == target.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == target.shape
    assert _iou(mask > 0, tgt_mask) >= 0.5
    on = mask > 0
    assert np.array_equal(overlay[~on], target[~on])  # untouched outside the mask
    assert not np.array_equal(overlay[on], target[on])

    # box and points variants: the CLI's mask is the predictor's for that annotation (points as discs,
    # the CLI's default), and not the one of the coordinates read the other way round
    predictor = RefSegPredictor.from_checkpoint(checkpoint, backbone_checkpoint=mobilenet_v2_weights)
    reference = _rgb(ref_path)
    ys, xs = np.nonzero(ref_mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    h, w = ref_mask.shape
    both_ways = (xs < h) & (ys < w)  # object pixels that are also in the image read as (y, x)
    inside = [(int(x), int(y)) for x, y in zip(xs[both_ways], ys[both_ways])][:: max(1, int(both_ways.sum()) // 5)][:5]
    variants = [
        (["--box", str(x0), str(y0), str(x1), str(y1)], Box(x0, y0, x1, y1), Box(y0, x0, y1, x1)),
        (["--points", *[f"{x},{y}" for x, y in inside]], Points(tuple(inside)), Points(tuple((y, x) for x, y in inside))),
    ]
    for extra, annotation, transposed in variants:
        args = _parser().parse_args(
            ["predict", "--checkpoint", str(checkpoint), "--reference-image", str(ref_path), *extra,
             "--target-image", str(tgt_path), "--out-dir", str(tmp_path / "o2"),
             "--backbone-checkpoint", str(mobilenet_v2_weights)]
        )
        assert args.handler(args) == 0
        written = np.asarray(Image.open(tmp_path / "o2" / "mask.png")) > 0
        assert np.array_equal(written, predictor.predict(reference, annotation, target)), extra[0]
        assert not np.array_equal(written, predictor.predict(reference, transposed, target)), extra[0]


def test_overlay_panels_are_captioned() -> None:
    """The training job's overlays: every panel under its own caption (what it shows)."""
    from pipeline.inference.overlay import CAPTION_HEIGHT, captioned_row

    panels = [(np.full((40, 50, 3), 90, np.uint8), "reference + box (dog)"), (np.full((40, 60, 3), 90, np.uint8), "prediction")]
    row = captioned_row(panels)
    assert row.shape == (CAPTION_HEIGHT + 40, 110, 3) and row.dtype == np.uint8
    assert (row[CAPTION_HEIGHT:] == 90).all()  # the images are untouched, below the captions
    for left, right in ((0, 50), (50, 110)):
        caption = row[:CAPTION_HEIGHT, left:right]
        assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on a white bar
    assert not np.array_equal(captioned_row(panels[:1])[:CAPTION_HEIGHT], captioned_row([(panels[0][0], "ground truth")])[:CAPTION_HEIGHT])


def test_cli_missing_files_are_named(tmp_path: Path) -> None:
    from pipeline.errors import DataError

    args = _parser().parse_args(
        ["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--reference-image", "r.jpg", "--box", "1", "2", "3", "4",
         "--target-image", "t.jpg", "--out-dir", str(tmp_path)]
    )
    with pytest.raises(DataError, match="nope.pt"):
        args.handler(args)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x")
    args = _parser().parse_args(
        ["predict", "--checkpoint", str(ck), "--reference-image", str(tmp_path / "missing.jpg"), "--box", "1", "2", "3", "4",
         "--target-image", str(image), "--out-dir", str(tmp_path)]
    )
    with pytest.raises(DataError, match="missing.jpg"):
        args.handler(args)
    with pytest.raises(SystemExit):  # exactly one annotation kind
        _parser().parse_args(["predict", "--checkpoint", "c", "--reference-image", "r", "--target-image", "t", "--out-dir", "o"])


@pytest.mark.real_data
def test_cli_persam_needs_no_method_checkpoint(tmp_path: Path, coco_mini_dir: Path) -> None:
    (ref_path, _), (tgt_path, _) = _pairs(coco_mini_dir, 1)[0]
    args = _parser().parse_args(
        ["predict", "--persam", "--sam-encoder", "sam_vit_tiny", "--allow-random-init",
         "--reference-image", str(ref_path), "--points", "100,120", "--target-image", str(tgt_path),
         "--out-dir", str(tmp_path)]
    )
    assert args.handler(args) == 0
    assert Image.open(tmp_path / "mask.png").size == Image.open(tgt_path).size
    # without weights and without the explicit opt-in, PerSAM is refused with a clear error
    args = _parser().parse_args(
        ["predict", "--persam", "--reference-image", str(ref_path), "--points", "100,120",
         "--target-image", str(tgt_path), "--out-dir", str(tmp_path)]
    )
    with pytest.raises(ModelError, match="needs a checkpoint path"):
        args.handler(args)


@pytest.mark.real_data
def test_segic_on_dinov2_uses_the_longest_side_pad_frame(tmp_path: Path, coco_mini_dir: Path) -> None:
    """SegIC's real encoder path (DINOv2, longest side + pad; random ViT-S at 224 for speed)."""
    torch.manual_seed(0)
    model = build_model("segic", in_channels=384, input_size=224, feature_size=16)
    identity = EncoderIdentity("dinov2_vits14", "random-init", "longest224_pad_imagenet", {"input_size": 224})
    path = save_inference_checkpoint(tmp_path / "s.pt", model, {"backbone": identity})
    predictor = RefSegPredictor.from_checkpoint(path, allow_random_init=True)
    assert predictor.encoders["backbone"].preprocessing_id == "longest224_pad_imagenet"
    (ref_path, ref_mask), (tgt_path, _) = _pairs(coco_mini_dir, 1)[0]
    reference, target = _rgb(ref_path), _rgb(tgt_path)
    seen = {}
    handle = predictor.model.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    pred = predictor.predict(reference, ref_mask, target)
    handle.remove()
    # the reference mask sits top-left in the frame, zero in the padding
    rh, rw = reference.shape[:2]
    vrh, vrw = int(rh * 224 / max(rh, rw) + 0.5), int(rw * 224 / max(rh, rw) + 0.5)
    frame_mask = seen["args"][0].reference_masks[0, 0]
    assert frame_mask[vrh:].sum() == 0 and frame_mask[:, vrw:].sum() == 0 and frame_mask.sum() > 0
    # the prediction is the valid crop of the logits, resized to the original size
    h, w = target.shape[:2]
    vh, vw = int(h * 224 / max(h, w) + 0.5), int(w * 224 / max(h, w) + 0.5)
    full = F.interpolate(seen["out"]["mask_logits"], (224, 224), mode="bilinear", align_corners=False)[..., :vh, :vw]
    expected = F.interpolate(full, (h, w), mode="bilinear", align_corners=False)[0, 0] > 0
    assert np.array_equal(pred, expected.numpy())
