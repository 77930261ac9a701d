"""VRP-SAM: parameter count, frozen SAM decoding, SAM decoder checkpoint loading, pseudo mask,
positional encoding, k-shot, annotation-type masks. Small channel configs keep these fast; the
real-image checks are in test_overfit_sam_methods.py."""

from __future__ import annotations


import math
from pathlib import Path

import pytest
import torch

from model_helpers import (  # noqa: F401 (single_thread: a fixture)
    SMALL_CHANNELS,
    assert_gradients_reach_exactly_the_trainable_parameters,
    single_thread,
    toy_episode_features,
    trainable,
)

from refseg_models import build_model
from refseg_models.errors import ModelError
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.position_encoding import sine_position_encoding
from refseg_models.modeling.pseudo_mask import masked_reference_layer4, prior_pseudo_mask
from refseg_models.modeling.sam_decoder import build_sam_decoder, load_sam_decoder_weights

SMALL = SMALL_CHANNELS




def small_vrp(grid: int = 32) -> torch.nn.Module:
    """VRP-SAM with a toy backbone on a test-size SAM grid (32 x 32, 128 x 128 output): fast."""
    torch.manual_seed(0)
    return build_model(
        "vrp_sam", backbone_channels=SMALL, feature_size=grid, output_size=128,
        sam_decoder=build_sam_decoder(image_embedding_size=grid),
    )


def make_features(
    b: int = 2, k: int = 1, channels: tuple[int, int, int] = SMALL, seed: int = 0, grid: int = 32, with_sam_refs: bool = False
) -> EpisodeFeatures:
    return toy_episode_features(b, k, channels=channels, grid=grid, seed=seed, with_sam_refs=with_sam_refs)


# --- parameter counts (the paper's ResNet-50 configuration; no weights needed) -----------------
def test_vrp_sam_trainable_parameters_match_the_spec() -> None:
    model = build_model("vrp_sam", allow_random_init=True)
    assert trainable(model) == 1_592_064
    assert sum(p.numel() for p in model.trainable_parameters()) == 1_592_064
    enc = model.prompt_encoder
    assert trainable(enc.down) == 393_216
    assert trainable(enc.merge) == 131_328
    assert trainable(enc.decoder) - enc.decoder.queries.weight.numel() == 1_054_720
    # The frozen SAM prompt encoder / mask decoder are part of the module but not trainable.
    assert all(not p.requires_grad for p in model.sam_decoder.parameters())
    assert sum(p.numel() for p in model.sam_decoder.parameters()) > 4_000_000


def test_attention_weights_are_xavier_initialised() -> None:
    model = build_model("vrp_sam", backbone_channels=SMALL, allow_random_init=True)
    w = model.prompt_encoder.decoder.cross_reference.attn.in_proj_weight.detach()
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
    assert float(w.abs().max()) <= bound + 1e-6
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


# --- SAM decoding ------------------------------------------------------------------------------
def test_batched_decode_equals_segment_anything_mask_decoder() -> None:
    torch.manual_seed(0)
    dec = build_sam_decoder()
    emb = torch.randn(3, 256, 64, 64)
    tokens = torch.randn(3, 7, 256)
    ours, iou = dec(emb, tokens)
    assert ours.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
    with torch.no_grad():
        for i in range(3):
            sparse, dense = dec.prompt_encoder(points=None, boxes=None, masks=None)
            assert sparse.shape[1] == 0  # no point/box prompt -> the learned tokens are the whole sparse prompt
            ref, ref_iou = dec.mask_decoder(
                image_embeddings=emb[i : i + 1],
                image_pe=dec.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=torch.cat([sparse, tokens[i : i + 1]], dim=1),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(ours[i : i + 1], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[i : i + 1], ref_iou, atol=1e-5, rtol=1e-5)
    multi, multi_iou = dec(emb[:1], tokens[:1], multimask_output=True)
    assert multi.shape == (1, 3, 256, 256) and multi_iou.shape == (1, 3)


def test_decode_rejects_unaligned_batches() -> None:
    dec = build_sam_decoder()
    with pytest.raises(ValueError, match="one image embedding per prompt set"):
        dec.decode(torch.zeros(2, 256, 64, 64), torch.zeros(3, 5, 256))
    with pytest.raises(ValueError, match="spatial size"):
        dec.decode(torch.zeros(1, 256, 32, 32), torch.zeros(1, 5, 256))


def test_gradients_reach_prompt_tokens_through_the_frozen_decoder() -> None:
    dec = build_sam_decoder()
    dec.train()  # stays frozen / eval
    assert not dec.training
    tokens = torch.randn(2, 5, 256, requires_grad=True)
    dec.decode(torch.randn(2, 256, 64, 64), tokens).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.parameters())


def test_sam_decoder_checkpoint_loading(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_sam_decoder()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    full = {**state, "image_encoder.patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)}
    path = tmp_path / "sam_full.pth"
    torch.save(full, path)
    loaded = build_sam_decoder(path)
    emb, tokens = torch.randn(1, 256, 64, 64), torch.randn(1, 3, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(emb, tokens), source.decode(emb, tokens))

    missing = dict(state)
    missing.pop("mask_decoder.iou_token.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing.pth.*mask_decoder\.iou_token\.weight"):
        build_sam_decoder(tmp_path / "missing.pth")

    extra = {**state, "mask_decoder.extra.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): mask_decoder\.extra\.weight"):
        build_sam_decoder(tmp_path / "extra.pth")

    wrong = {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 128)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_sam_decoder_weights(build_sam_decoder(), tmp_path / "wrong.pth")

    torch.save({"backbone.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'prompt_encoder"):
        build_sam_decoder(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        build_sam_decoder(tmp_path / "absent.pth")


def test_models_can_share_one_loaded_sam_decoder(tmp_path: Path) -> None:
    dec = build_sam_decoder()
    a = build_model("vrp_sam", backbone_channels=SMALL, sam_decoder=dec)
    b = build_model("prosam", backbone_channels=SMALL, sam_decoder=dec)
    assert a.sam_decoder is b.sam_decoder
    with pytest.raises(ValueError, match="either"):
        build_model("vrp_sam", sam_decoder=dec, sam_checkpoint=tmp_path / "x.pth")


# --- positional encoding -----------------------------------------------------------------------
def test_sine_position_encoding_matches_formula() -> None:
    pos = sine_position_encoding(64, 64, 128)
    assert pos.shape == (1, 256, 64, 64)
    y, x = 10, 37
    yn = (y + 1) / (64 + 1e-6) * 2 * math.pi
    xn = (x + 1) / (64 + 1e-6) * 2 * math.pi
    for i in (0, 1, 6, 7, 127):
        freq = 10000 ** (2 * (i // 2) / 128)
        fn = math.sin if i % 2 == 0 else math.cos
        assert pos[0, i, y, x].item() == pytest.approx(fn(yn / freq), abs=1e-5)  # y-half first
        assert pos[0, 128 + i, y, x].item() == pytest.approx(fn(xn / freq), abs=1e-5)


# --- pseudo mask -------------------------------------------------------------------------------
class _ToyBackbone:
    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        return 2 * layer3


def test_masked_reference_layer4_masks_layer3_nearest() -> None:
    layer3 = torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 16, 16)
    mask[:, :8, :8] = 1
    out = masked_reference_layer4(_ToyBackbone(), layer3, mask)
    expected = torch.zeros(1, 3, 4, 4)
    expected[..., :2, :2] = 2
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        masked_reference_layer4(_ToyBackbone(), layer3, torch.zeros(2, 16, 16))


def test_prior_pseudo_mask_is_max_cosine_over_masked_reference() -> None:
    target = torch.zeros(1, 2, 2, 2)
    target[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # matches the foreground reference feature
    target[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # matches only a background reference feature
    target[0, :, 1, 0] = torch.tensor([1.0, 1.0])  # 45 degrees from the foreground feature
    reference = torch.zeros(1, 2, 2, 2)
    reference[0, :, 0, 0] = torch.tensor([3.0, 0.0])
    reference[0, :, 1, 1] = torch.tensor([0.0, 5.0])
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    pm = prior_pseudo_mask(target, reference, mask)
    assert pm.shape == (1, 1, 2, 2)
    assert pm[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert pm[0, 0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert pm[0, 0, 1, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert pm[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-6)  # zero target feature: eps, no NaN


# --- the model ---------------------------------------------------------------------------------
def test_forward_shapes_and_only_prompt_encoder_gets_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("vrp_sam", backbone_channels=SMALL, allow_random_init=True)
    model.train()
    assert not model.sam_decoder.training
    feats = make_features(b=2, grid=64)
    out = model(feats)
    assert out["mask_logits"].shape == (2, 1, 512, 512)
    assert out["low_res_logits"].shape == (2, 1, 256, 256)
    assert out["prompt_tokens"].shape == (2, 50, 256)
    assert out["pseudo_mask"].shape == (2, 1, 64, 64)
    # A 16 x 16 layer4 (non-dilated backbone) gives a pseudo mask resized to the 64 x 64 grid.
    target = torch.zeros(2, 512, 512)
    target[:, 100:300, 150:400] = 1
    losses = model.loss(out, target, torch.ones_like(target))
    assert set(losses) == {"loss", "loss_bce", "loss_dice"}
    losses["loss"].backward()
    assert_gradients_reach_exactly_the_trainable_parameters(model)
    assert trainable(model) == trainable(model.prompt_encoder)


def test_k_shot_concatenates_per_shot_tokens() -> None:
    torch.manual_seed(0)
    model = small_vrp().eval()
    feats = make_features(b=2, k=2)
    with torch.no_grad():
        tokens = model.prompt_tokens(feats)
        assert tokens.shape == (2, 100, 256)
        for shot in range(2):
            single = model.prompt_tokens(feats.shot(shot))
            torch.testing.assert_close(tokens[:, shot * 50 : (shot + 1) * 50], single, atol=1e-5, rtol=1e-5)
        assert model(feats)["mask_logits"].shape == (2, 1, 128, 128)


@pytest.mark.parametrize("kind", ["mask", "box", "scribble", "points", "empty"])
def test_every_annotation_type_is_just_a_binary_mask(kind: str) -> None:
    torch.manual_seed(0)
    model = small_vrp().eval()
    mask = torch.zeros(1, 1, 512, 512)
    if kind == "mask":
        yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
        mask[0, 0] = (((yy - 250) ** 2 + (xx - 260) ** 2) < 120**2).float()
    elif kind == "box":
        mask[..., 130:370, 140:380] = 1
    elif kind == "scribble":
        for t in range(200):
            mask[..., 200 + t // 2 : 206 + t // 2, 150 + t : 156 + t] = 1
    elif kind == "points":
        for y, x in [(200, 200), (260, 300), (320, 250)]:
            mask[..., y - 2 : y + 3, x - 2 : x + 3] = 1
    feats = make_features(b=1)
    feats = EpisodeFeatures(
        reference_masks=mask, target_sam=feats.target_sam, target_backbone=feats.target_backbone,
        reference_backbone=feats.reference_backbone, reference_masked_layer4=feats.reference_masked_layer4,
    )
    with torch.no_grad():
        out = model(feats)
    assert torch.isfinite(out["mask_logits"]).all()
    assert torch.isfinite(out["pseudo_mask"]).all()


def test_clear_errors_for_missing_or_inconsistent_features() -> None:
    model = small_vrp()
    feats = make_features(b=1)
    no_l4 = EpisodeFeatures(
        reference_masks=feats.reference_masks, target_sam=feats.target_sam,
        target_backbone=feats.target_backbone, reference_backbone=feats.reference_backbone,
    )
    with pytest.raises(ModelError, match="vrp_sam needs EpisodeFeatures fields.*reference_masked_layer4"):
        model(no_l4)
    no_sam = EpisodeFeatures(
        reference_masks=feats.reference_masks, target_backbone=feats.target_backbone,
        reference_backbone=feats.reference_backbone, reference_masked_layer4=feats.reference_masked_layer4,
    )
    with pytest.raises(ModelError, match="target_sam"):
        model(no_sam)
    with pytest.raises(ModelError, match="reference_backbone"):
        EpisodeFeatures(
            reference_masks=feats.reference_masks, target_sam=feats.target_sam, target_backbone=feats.target_backbone,
            reference_backbone={**feats.reference_backbone, "layer3": feats.reference_backbone["layer3"][:, :, :5]},
        )
    with pytest.raises(ModelError, match="backbone maps differ"):
        EpisodeFeatures(
            reference_masks=feats.reference_masks, target_sam=feats.target_sam,
            target_backbone={k: v for k, v in feats.target_backbone.items() if k != "layer4"},
            reference_backbone=feats.reference_backbone,
        )
    with pytest.raises(ModelError, match="backbone_channels"):
        build_model("vrp_sam", backbone_channels=(1, 2), allow_random_init=True)
    with pytest.raises(ModelError, match="frozen, pretrained SAM"):
        build_model("vrp_sam")  # a forgotten SAM checkpoint is an error, never a random SAM
    with pytest.raises(ModelError, match="64 x 64 embedding grid.*32 x 32"):
        build_model("vrp_sam", feature_size=32, sam_decoder=build_sam_decoder())


def test_features_container_moves_and_selects() -> None:
    feats = make_features(b=3, k=2, with_sam_refs=True)
    half = feats.to("cpu", dtype=torch.float64).select(slice(0, 2))
    assert half.batch_size == 2 and half.shots == 2
    assert half.target_sam.dtype == torch.float64
    assert half.reference_sam is not None and half.reference_sam.shape[:2] == (2, 2)
    assert feats.shot(1).shots == 1


# --- SAM's low-res logits -> 512 as the authors upsample them ------------------------------------
def _authors_upsample(low_res_masks: torch.Tensor, ori_size: tuple[int, int]) -> torch.Tensor:
    # SAM2pred.forward_mask_decoder, SAM2pred.py line 70 (syp2ysy/VRP-SAM and SuhoPark0706/FCP):
    #   low_masks = F.interpolate(low_res_masks, size=ori_size, mode='bilinear', align_corners=True)
    return torch.nn.functional.interpolate(low_res_masks, size=ori_size, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("method", ["vrp_sam", "prosam", "fcp"])
def test_mask_logits_are_the_low_res_logits_upsampled_as_the_authors_do(method: str) -> None:
    torch.manual_seed(0)
    grid = 16  # low-res logits 64 x 64 -> 128 x 128
    model = build_model(
        method, backbone_channels=SMALL, feature_size=grid, output_size=128,
        sam_decoder=build_sam_decoder(image_embedding_size=grid),
    ).eval()
    feats = make_features(b=2, grid=grid, with_sam_refs=method == "fcp")
    with torch.no_grad():
        out = model(feats)
        tokens = out["prompt_tokens"]
        tokens = tokens[:, 0] if method == "fcp" else tokens  # FCP: B x k x N x 256, k = 1
        low = model.sam_decoder.decode(feats.target_sam, tokens)
    expected = _authors_upsample(low, (128, 128))
    torch.testing.assert_close(out["mask_logits"], expected, rtol=0, atol=1e-5)
    # align_corners=False (SAM's postprocess_masks) gives other logits: the check can tell them apart
    other = torch.nn.functional.interpolate(low, size=(128, 128), mode="bilinear", align_corners=False)
    assert (out["mask_logits"] - other).abs().max() > 1e-3
