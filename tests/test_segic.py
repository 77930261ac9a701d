"""SegIC: parameter counts, instruction mechanics, training hooks and an overfit check on real COCO.

SegIC runs on DINOv2 features; no real DINOv2 weights exist here, so the overfit test feeds the
REAL MobileNetV2's layer4 (1280 ch) as SegIC's "class-consistent encoder" input (C from config), in a
small geometry (see ``SMALL``): the decoder is SAM's exact architecture either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refseg_models import build_model
from refseg_models.errors import ModelError
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.segic import SegIC
from refseg_models.modeling.segic_instructions import (
    cosine_similarity_map,
    geometric_instruction,
    instance_features,
    masks_to_boxes,
    top_points,
)
from refseg_models.modeling.segic_training import InstanceFeatureQueue

# A small geometry for fast tests: 128 input, 16 x 16 grid (SAM decoder unchanged).
SMALL = dict(input_size=128, feature_size=16, mask_down_strides=(4, 2), similarity_size=16)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def small_model(channels: int = 32, **overrides) -> SegIC:
    torch.manual_seed(0)
    return build_model("segic", in_channels=channels, **{**SMALL, **overrides})


def as_features(target, reference, masks, **extra) -> EpisodeFeatures:
    return EpisodeFeatures(
        reference_masks=masks, target_backbone={"patch_tokens": target},
        reference_backbone={"patch_tokens": reference}, **extra,
    )


def random_inputs(b: int = 2, k: int = 1, c: int = 32, size: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, c, 16, 16, generator=g)
    reference = torch.randn(b, k, c, 16, 16, generator=g)
    masks = torch.zeros(b, k, size, size)
    masks[..., 30:90, 20:100] = 1.0
    return target, reference, masks


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("channels, expected", [(1024, 5_180_644), (768, 5_049_572)])
def test_trainable_parameter_count_dinov2(channels: int, expected: int) -> None:
    model = build_model("segic", in_channels=channels)
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    # neck: 1x1 conv (no bias) + LN + 3x3 conv (no bias) + LN
    assert trainable(model.neck) == channels * 256 + 512 + 9 * 256 * 256 + 512
    # SAM prompt encoder with strides (7, 2): convs 1->4 (7x7), 4->16 (2x2), 16->256 (1x1) + LNs,
    # 4 point embeddings + not-a-point + no-mask
    assert trainable(model.prompt_encoder) == (4 * 49 + 4) + 8 + (16 * 4 * 4 + 16) + 32 + (16 * 256 + 256) + 6 * 256
    assert trainable(model.mask_decoder) == 4_058_340  # SAM's mask decoder, from scratch
    assert trainable(model.visual_instruction) == channels * 256 + 256
    assert trainable(model.instance_type_embed) == 2 * 256  # the cross-instance prompt's type embedding
    assert model.meta_instruction is None
    assert trainable(model) == expected
    without = build_model("segic", in_channels=channels, cross_instance_prompt=False)
    assert without.instance_type_embed is None and trainable(without) == expected - 512


def test_meta_adds_projection_and_segic_takes_no_sam() -> None:
    with_meta = build_model("segic", in_channels=1024, use_meta_instruction=True, text_dim=768)
    assert trainable(with_meta) == 5_180_644 + 768 * 256 + 256
    assert sum(p.numel() for p in with_meta.trainable_parameters()) == trainable(with_meta)
    with pytest.raises(ModelError, match="does not decode through SAM"):
        build_model("segic", sam_checkpoint="sam.pth")


def test_mask_downscaling_reaches_the_grid_from_896() -> None:
    model = build_model("segic", in_channels=8)
    dense = model.prompt_encoder.mask_downscaling(torch.zeros(1, 1, 896, 896))
    assert dense.shape == (1, 256, 64, 64)
    with pytest.raises(ValueError, match="mask_down_strides"):
        build_model("segic", in_channels=8, mask_down_strides=(4, 2))


# ----------------------------------------------------------------------------- instructions


def test_instance_features_masked_mean_and_empty_mask() -> None:
    features = torch.randn(2, 5, 8, 8)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16, :16] = 1  # top-left quarter -> 4 x 4 cells
    got = instance_features(features, masks)
    assert torch.allclose(got[0], features[0, :, :4, :4].mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(got[1], torch.zeros(5))  # empty mask: zero vector, no NaN


def test_geometric_instruction_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(6, 8, 8, generator=g)
    protos = torch.randn(2, 3, 6, generator=g)  # 2 instructions x 3 shots
    dense, points = geometric_instruction(target, protos, input_size=32, similarity_size=None, num_points=1)
    flat = target.flatten(1)
    for n in range(2):
        maps = [
            (protos[n, s] @ flat / (protos[n, s].norm() * flat.norm(dim=0))).view(8, 8) for s in range(3)
        ]
        expected = F.interpolate(torch.stack(maps).mean(0)[None, None], (32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(dense[n], expected[0], atol=1e-5)
        y, x = divmod(int(dense[n, 0].argmax()), 32)
        assert points[n, 0].tolist() == [x, y]
    assert torch.equal(cosine_similarity_map(target, torch.zeros(1, 6)), torch.zeros(1, 8, 8))


def test_top_points_and_boxes() -> None:
    maps = torch.zeros(1, 10, 20)
    maps[0, 7, 3] = 5
    assert top_points(maps).tolist() == [[[3.0, 7.0]]]
    masks = torch.zeros(2, 10, 20)
    masks[0, 2:5, 4:9] = 1
    assert masks_to_boxes(masks).tolist() == [[4.0, 2.0, 8.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- forward behaviour


def test_forward_shapes_and_k_shot_permutation_invariance() -> None:
    model = small_model().eval()
    target, reference, masks = random_inputs(b=2, k=3)
    masks[:, 1, :, :64] = 0
    with torch.no_grad():
        out = model(as_features(target, reference, masks))
        perm = model(as_features(target, reference[:, [2, 0, 1]], masks[:, [2, 0, 1]]))
    assert out["mask_logits"].shape == (2, 1, 64, 64)
    assert out["dense_prompt"].shape == (2, 1, 128, 128)
    assert out["points"].shape == (2, 1, 2)
    assert out["prototypes"].shape == (2, 3, 32)
    assert [n.shape[0] for n in out["negative_mask_logits"]] == [0, 0]
    # mean cosine map + one visual token per shot: the shot order does not matter
    assert torch.allclose(out["mask_logits"], perm["mask_logits"], atol=1e-4)


def test_box_prompt_only_in_training() -> None:
    model = small_model(box_prob=1.0)
    target, reference, masks = random_inputs()
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [0.0, 5.0, 100.0, 90.0]])
    model.eval()
    with torch.no_grad():
        plain = model(as_features(target, reference, masks))["mask_logits"]
        boxed_eval = model(as_features(target, reference, masks, target_boxes=boxes))["mask_logits"]
    assert torch.equal(plain, boxed_eval)  # never a GT box at inference
    model.train()
    with torch.no_grad():
        plain_train = model.forward_tensors(target, reference, masks)["mask_logits"]
        boxed_train = model.forward_tensors(target, reference, masks, target_boxes=boxes)["mask_logits"]
    assert not torch.allclose(plain_train, boxed_train)


def test_meta_instruction_is_off_by_default_and_refused_for_novel_classes() -> None:
    target, reference, masks = random_inputs()
    text = torch.randn(2, 12)
    with pytest.raises(ModelError, match="use_meta_instruction=False"):
        small_model()(as_features(target, reference, masks, meta_embeddings=text))
    model = small_model(use_meta_instruction=True, text_dim=12).eval()
    with pytest.raises(ModelError, match="novel-class"):
        model(as_features(target, reference, masks, meta_embeddings=text), novel_class_eval=True)
    # the meta instruction on and no text: refused (no zero vector stands in for a text encoder)
    with pytest.raises(ModelError, match="got no text embedding"):
        model(as_features(target, reference, masks))
    with torch.no_grad():
        assert model(as_features(target, reference, masks, meta_embeddings=text))["mask_logits"].shape == (2, 1, 64, 64)


def test_bad_inputs_are_named() -> None:
    model = small_model()
    target, reference, masks = random_inputs()
    with pytest.raises(ModelError, match="32-channel"):
        model(as_features(target[:, :16], reference[:, :, :16], masks))
    with pytest.raises(ModelError, match="reference_masks B x k x H x W"):
        model.forward_tensors(target, reference, masks[:, 0])
    with pytest.raises(ModelError, match="patch_tokens"):
        model(EpisodeFeatures(reference_masks=masks))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.real_weights
def test_only_the_decoder_side_receives_gradients(mobilenet_v2_weights: Path) -> None:
    from refseg_models.encoders import build_encoder

    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights, input_size=128)
    assert trainable(backbone) == 0
    images = torch.randn(3, 3, 128, 128)
    # Features computed WITH autograd enabled: the frozen encoder must still get no gradient.
    layer4 = backbone(images)["layer4"]  # 3 x 1280 x 4 x 4
    model = build_model("segic", in_channels=1280, feature_key="layer4", loss_points=256, **SMALL).train()
    masks = torch.zeros(2, 1, 128, 128)
    masks[..., 20:100, 30:90] = 1
    features = EpisodeFeatures(
        reference_masks=masks, target_backbone={"layer4": layer4[:2]},
        reference_backbone={"layer4": layer4[2:].expand(2, -1, -1, -1)[:, None]},
    )
    out = model(features)
    model.loss(out, masks[:, 0], torch.ones_like(masks[:, 0]))["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    for name in ("neck", "prompt_encoder.mask_downscaling", "mask_decoder.transformer", "visual_instruction"):
        grads = [p.grad for p in model.get_submodule(name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


# ----------------------------------------------------------------------------- training hooks


def test_context_reversion_runs_inside_forward_in_training() -> None:
    model = small_model(loss_points=256).train()
    target, reference, masks = random_inputs(k=2)
    calls = []
    original = model.forward_tensors

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    model.forward_tensors = spy
    out = model(as_features(target, reference, masks))
    assert len(calls) == 2 and "reversed" in out
    (new_target, new_reference, new_masks), kwargs = calls[1]
    assert torch.equal(new_target, reference[:, 0])  # roles swapped: first reference becomes the target
    assert torch.equal(new_reference, target[:, None])
    first = out["mask_logits"]
    expected_mask = F.interpolate(first.detach(), (128, 128), mode="bilinear", align_corners=False) > 0
    assert torch.equal(new_masks, expected_mask.float())  # the detached first prediction as reference mask
    assert torch.equal(out["reversed"]["targets"], masks[:, 0])
    assert torch.equal(kwargs["target_boxes"], masks_to_boxes(masks[:, 0]))
    # the reversed pass sends no gradient through the first prediction
    grad_first = torch.autograd.grad(out["reversed"]["mask_logits"].mean(), first, allow_unused=True)[0]
    assert grad_first is None
    losses = model.loss(out, (masks[:, 0] > 0.5).float(), torch.ones_like(masks[:, 0]))
    assert set(losses) == {"loss", "loss_ce", "loss_dice"}
    # eval mode, or context_reversion off: one pass
    model.forward_tensors = original
    model.eval()
    with torch.no_grad():
        assert "reversed" not in model(as_features(target, reference, masks))
    assert "reversed" not in small_model(context_reversion=False).train()(as_features(target, reference, masks))


def test_instance_feature_queue() -> None:
    queue = InstanceFeatureQueue(max_per_class=2)
    features = torch.arange(12.0, requires_grad=True).view(4, 3)
    queue.push([5, 5, 5, 7], features)
    assert queue.size(5) == 2 and queue.size(7) == 1 and len(queue) == 3  # FIFO: oldest dropped
    stored = queue.sample_negatives(present_classes=[5], max_negatives=4)
    assert stored.shape == (1, 3) and torch.equal(stored[0], torch.tensor([9.0, 10.0, 11.0]))
    assert not stored.requires_grad
    assert queue.sample_negatives(present_classes=[5, 7], max_negatives=4).shape[0] == 0
    g = torch.Generator().manual_seed(0)
    picks = {tuple(queue.sample_negatives([7], 1, generator=g)[0].tolist()) for _ in range(20)}
    assert picks == {(3.0, 4.0, 5.0), (6.0, 7.0, 8.0)}  # only the two kept class-5 entries


def test_negative_instructions_get_empty_targets_with_weight_0_1() -> None:
    model = small_model(context_reversion=False).train()
    target, reference, masks = random_inputs()
    negatives = [torch.randn(3, 32), None]
    features = as_features(target, reference, masks, target_boxes=masks_to_boxes(masks[:, 0]))
    out = model(features, negative_prototypes=negatives)
    assert [n.shape[0] for n in out["negative_mask_logits"]] == [3, 0]
    # the criterion weighs them 0.1 against 1 for positives (tests/test_losses.py checks the values)
    assert model.criterion.negative_weight == 0.1
    losses = model.loss(out, (masks[:, 0] > 0.5).float(), torch.ones_like(masks[:, 0]))
    assert torch.isfinite(losses["loss"])


# ----------------------------------------------------------------------------- overfit on real COCO


def _episodes(coco_dir: Path, count: int):
    """``count`` same-class (reference, target) pairs from coco_mini, objects covering 10-50%."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_dir / "instances.json"))

    def class_mask(image_id: int, category: int) -> np.ndarray:
        info = coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, catIds=[category], iscrowd=False)):
            mask |= coco.annToMask(ann).astype(np.uint8)
        return mask

    episodes = []
    for category in sorted(coco.cats):
        found = []
        for image_id in sorted(coco.getImgIds(catIds=[category])):
            mask = class_mask(image_id, category)
            if 0.1 < mask.mean() < 0.5:
                image = np.asarray(Image.open(coco_dir / "images" / coco.imgs[image_id]["file_name"]).convert("RGB"))
                found.append((image, mask))
            if len(found) == 2:
                episodes.append((category, found[0], found[1]))
                break
        if len(episodes) == count:
            return episodes
    raise AssertionError("coco_mini has too few suitable pairs")


def _resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)) > 127).float()


def _iou(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    pred = F.interpolate(logits, gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0
    truth = gt > 0.5
    return (pred & truth).sum((1, 2)) / (pred | truth).sum((1, 2)).clamp(min=1)


@pytest.mark.real_data
@pytest.mark.real_weights
@pytest.mark.slow
def test_overfits_real_coco_episodes_with_real_mobilenet(coco_mini_dir: Path, mobilenet_v2_weights: Path) -> None:
    from refseg_models.encoders import build_encoder

    torch.manual_seed(0)
    episodes = _episodes(coco_mini_dir, 4)
    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights)  # 512 squash, layer4 16 x 16
    size = SMALL["input_size"]
    with torch.no_grad():  # frozen features computed once, as the feature store serves them
        ref = backbone(torch.stack([backbone.preprocess(e[1][0]) for e in episodes]))["layer4"]
        tgt = backbone(torch.stack([backbone.preprocess(e[2][0]) for e in episodes]))["layer4"]
    ref_masks = torch.stack([_resize_mask(e[1][1], size) for e in episodes])[:, None]
    tgt_masks = torch.stack([_resize_mask(e[2][1], size) for e in episodes])
    model = build_model("segic", in_channels=1280, feature_key="layer4", loss_points=64 * 64, **SMALL)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    features = EpisodeFeatures(
        reference_masks=ref_masks, target_backbone={"layer4": tgt}, reference_backbone={"layer4": ref[:, None]},
        target_boxes=masks_to_boxes(tgt_masks),
    )

    def evaluate() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = model(features, novel_class_eval=True)
        model.train()
        return _iou(model.mask_logits(out), tgt_masks)

    before = evaluate()
    for _ in range(OVERFIT_STEPS):
        loss = model.loss(model(features, generator=g), tgt_masks, torch.ones_like(tgt_masks))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    print(f"SegIC overfit IoU per episode: before {before.tolist()} after {after.tolist()}")
    assert after.mean() >= 0.6, (before, after)


OVERFIT_STEPS = 20
