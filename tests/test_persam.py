"""PerSAM training-free baseline: no trainable parameters, prototype / location prior / point
selection against hand computations, the cascaded refinement prompts, SAM weights from a checkpoint
file, and the location prior on REAL features of real coco_mini pairs (real MobileNetV2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refseg_models import build_model
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.errors import ModelError
from refseg_models.modeling.persam import location_prior, persam_prototypes, select_points

from coco_helpers import coco_class_pairs


def build_persam(**config):
    return build_model("persam", allow_random_init="sam_checkpoint" not in config, **config)


def test_no_trainable_parameters_and_frozen_decoder() -> None:
    model = build_persam()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    assert model.trainable_parameters() == [] and model.trainable_state_dict() == {}
    assert sum(p.numel() for p in model.parameters()) == 6_220 + 4_058_340  # SAM prompt enc + mask dec
    model.train()
    assert not model.sam_decoder.training  # stays frozen in eval mode


def test_prototype_is_masked_mean_averaged_over_shots() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 2, 4, 8, 8, generator=g)
    masks = torch.zeros(1, 2, 64, 64)
    masks[0, 0, :32, :32] = 1  # -> 4 x 4 cells top-left
    masks[0, 1, 32:, :] = 1  # -> bottom half
    got = persam_prototypes(ref, masks)
    expected = (ref[0, 0, :, :4, :4].mean((1, 2)) + ref[0, 1, :, 4:, :].mean((1, 2))) / 2
    assert torch.allclose(got[0], expected, atol=1e-6)


def test_location_prior_and_points_respect_the_valid_region() -> None:
    target = torch.randn(1, 4, 8, 8)
    proto = target[0, :, 2, 6].clone()[None]  # the prototype IS the feature at (y=2, x=6)
    sim = location_prior(target, proto, input_size=64)
    assert sim.shape == (1, 64, 64)
    cos = F.cosine_similarity(target[0], proto[0][:, None, None], dim=0)
    up = F.interpolate(F.interpolate(cos[None, None], scale_factor=4, mode="bilinear"), (64, 64), mode="bilinear")
    assert torch.allclose(sim[0], up[0, 0], atol=1e-5)
    # full frame: positive at the argmax, negative at the argmin
    points, labels = select_points(sim, [(64, 64)])
    y, x = divmod(int(sim[0].argmax()), 64)
    assert points[0, 0].tolist() == [x, y] and labels.tolist() == [[1, 0]]
    # a padded frame whose valid part excludes the argmax column range: points stay inside
    points, _ = select_points(sim, [(64, 40)])
    assert points[0, :, 0].max() < 40
    valid = sim[0, :, :40]
    y, x = divmod(int(valid.argmax()), 40)
    assert points[0, 0].tolist() == [x, y]


def test_cascaded_refinement_prompts() -> None:
    torch.manual_seed(0)
    model = build_persam(refinement_steps=2)
    calls = []

    def spy(module, args, kwargs):
        calls.append({k: (None if v is None else v) for k, v in kwargs.items()})

    handle = model.sam_decoder.prompt_encoder.register_forward_pre_hook(spy, with_kwargs=True)
    target = torch.randn(2, 256, 64, 64)
    reference = torch.randn(2, 1, 256, 64, 64)
    masks = torch.zeros(2, 1, 1024, 1024)
    masks[..., 100:600, 200:700] = 1
    with torch.no_grad():
        out = model.segment(target, reference, masks, valid_sizes=[(1024, 768), (700, 1024)])
    handle.remove()
    assert len(calls) == 3
    # step 1: points only; step 2: + previous logits as mask prompt; step 3: + box of that mask
    assert calls[0]["masks"] is None and calls[0]["boxes"] is None
    assert calls[1]["masks"].shape == (2, 1, 256, 256) and calls[1]["boxes"] is None
    assert calls[2]["masks"].shape == (2, 1, 256, 256) and calls[2]["boxes"].shape == (2, 4)
    for call in calls:
        coords, labels = call["points"]
        assert torch.equal(coords, out["points"]) and labels.tolist() == [[1, 0], [1, 0]]
    # the box is the tight box of the step-2 mask (inside the valid region) or the valid region
    boxes = calls[2]["boxes"]
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert boxes[0, 2] < 768 and boxes[1, 3] < 700
    assert out["mask_logits"].shape == (2, 1, 256, 256)
    assert out["iou_predictions"].shape == (2, 1)


def test_refinement_steps_option_and_episode_input() -> None:
    model = build_persam(refinement_steps=0)
    target = torch.randn(1, 256, 64, 64)
    reference = torch.randn(1, 1, 256, 64, 64)
    masks = torch.ones(1, 1, 64, 64)
    backbone = {name: torch.zeros(1, 8, 4, 4) for name in ("layer2", "layer3", "layer4")}
    episode = EpisodeFeatures(
        target_sam=target,
        target_backbone=backbone,
        reference_backbone={k: v[:, None] for k, v in backbone.items()},
        reference_masks=masks,
        reference_sam=reference,
        valid_sizes=((1024, 700),),
    )
    with torch.no_grad():
        a = model(episode)["mask_logits"]
        b = model.segment(target, reference, masks, valid_sizes=[(1024, 700)])["mask_logits"]
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="reference_sam"):
        model(EpisodeFeatures(reference_masks=masks, target_sam=target))
    with pytest.raises(ModelError, match="refinement_steps"):
        build_persam(refinement_steps=3)


def test_sam_decoder_weights_load_from_a_sam_checkpoint(tmp_path: Path) -> None:
    source = build_persam()
    state = {f"{k}": v + 0.5 for k, v in source.sam_decoder.state_dict().items()}
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(3)  # ignored: image encoder part
    path = tmp_path / "sam_test.pth"
    torch.save(state, path)
    loaded = build_persam(sam_checkpoint=path)
    for key, value in loaded.sam_decoder.state_dict().items():
        assert torch.equal(value, state[key])
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        build_persam(sam_checkpoint=path)


# ----------------------------------------------------------------------------- real features


def _class_pairs(coco_dir: Path, count: int):
    """``count`` one-class pairs of decoded RGB images and masks (5-50 % cover)."""
    return [[(np.asarray(Image.open(path).convert("RGB")), mask) for path, mask in pair]
            for pair in coco_class_pairs(coco_dir, count, min_cover=0.05)]


@pytest.mark.real_data
@pytest.mark.real_weights
def test_location_prior_points_land_on_the_object_with_real_features(
    coco_mini_dir: Path, mobilenet_v2_weights: Path
) -> None:
    """PerSAM's prototype -> cosine -> top-1 / bottom-1 mechanics on REAL semantic features.

    No real SAM exists here, so the prior runs on the real MobileNetV2's layer4 (the functions are
    feature-agnostic). The positive point must fall on the target object far more often than the
    object's area (the hit rate of a random point), the negative point no more often than chance.
    MobileNetV2's layer4 is a weak 16 x 16 map: measured on these 20 pairs, the positive point hits
    the object in about half of them, at roughly 3x the chance rate.
    """
    from refseg_models.encoders import build_encoder

    pairs = _class_pairs(coco_mini_dir, 20)
    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights)
    size = 512
    with torch.no_grad():
        ref = backbone(torch.stack([backbone.preprocess(p[0][0]) for p in pairs]))["layer4"]
        tgt = backbone(torch.stack([backbone.preprocess(p[1][0]) for p in pairs]))["layer4"]

    def frame(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)) > 127)

    ref_masks = torch.stack([frame(p[0][1]) for p in pairs]).float()[:, None]
    tgt_masks = torch.stack([frame(p[1][1]) for p in pairs])
    prototypes = persam_prototypes(ref[:, None], ref_masks)
    sim = location_prior(tgt, prototypes, input_size=size)
    points, _ = select_points(sim, [(size, size)] * len(pairs))
    xy = points.long()
    idx = torch.arange(len(pairs))
    positive_hits = tgt_masks[idx, xy[:, 0, 1], xy[:, 0, 0]].float()
    negative_hits = tgt_masks[idx, xy[:, 1, 1], xy[:, 1, 0]].float()
    chance = tgt_masks.float().mean()
    print(
        f"PerSAM prior on real features: positive on object {positive_hits.mean():.2f}, "
        f"negative on object {negative_hits.mean():.2f}, chance {chance:.2f} ({len(pairs)} pairs)"
    )
    assert positive_hits.mean() >= 2 * chance
    assert negative_hits.mean() <= chance
