"""FCP: parameter count, masked cross-attention with the empty-mask guard, attention pseudo masks,
guide / orthogonality losses wired to the model, per-shot SAM features, gradients.

Unit tests run on a 32 x 32 grid (a test-size SAM decoder, ``image_embedding_size=32``) and
128 x 128 outputs to stay fast; the paper geometry (64 x 64, 512) is covered by the parameter
count and by test_vrp_sam.py's decoder tests."""

from __future__ import annotations


import pytest
import torch
from torch.nn import functional as F

from model_helpers import (  # noqa: F401 (single_thread: a fixture)
    SMALL_CHANNELS,
    assert_gradients_reach_exactly_the_trainable_parameters,
    single_thread,
    toy_episode_features,
    trainable,
)

from refseg_models import build_model
from refseg_models.modeling.attention import CrossAttentionLayer
from refseg_models.modeling.fcp import attention_pseudo_mask
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.sam_decoder import build_sam_decoder

SMALL = SMALL_CHANNELS
GRID = 32




def small_fcp(**cfg: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "fcp",
        backbone_channels=SMALL,
        feature_size=GRID,
        output_size=128,
        sam_decoder=build_sam_decoder(image_embedding_size=GRID),
        **cfg,
    )


def make_features(b: int = 2, k: int = 1, seed: int = 0, empty: bool = False) -> EpisodeFeatures:
    return toy_episode_features(b, k, grid=GRID, layer2_size=32, seed=seed, with_sam_refs=True, empty=empty)


def test_fcp_trainable_parameters_match_the_spec() -> None:
    model = build_model("fcp", allow_random_init=True)
    assert trainable(model) == 2_856_448
    assert sum(p.numel() for p in model.trainable_parameters()) == 2_856_448
    enc = model.prompt_encoder
    assert trainable(enc.down) == 393_216
    assert trainable(enc.sam_proj) == 65_536
    assert trainable(enc.decoder) == 2_397_696
    assert len(enc.decoder.support_layers) == len(enc.decoder.query_layers) == 3
    assert enc.decoder.support_prototypes.weight.shape == enc.decoder.query_prototypes.weight.shape == (50, 256)
    assert all(not p.requires_grad for p in model.sam_decoder.parameters())


def test_masked_cross_attention_blocks_keys_and_guards_the_empty_mask() -> None:
    torch.manual_seed(0)
    layer = CrossAttentionLayer(32, 4).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 12, 32)
    blocked = torch.ones(2, 12, dtype=torch.bool)
    blocked[0, 3:6] = False  # item 0: only keys 3..5 allowed; item 1: all blocked (empty mask)
    out, weights = layer(q, kv, kv, blocked=blocked, need_weights=True)
    assert torch.isfinite(out).all()
    assert weights is not None and weights.shape == (2, 5, 12)
    assert weights[0][:, blocked[0]].abs().max().item() == 0.0
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(5))
    # The empty mask falls back to attending everywhere (not NaN).
    free, free_weights = layer(q[1:], kv[1:], kv[1:], need_weights=True)
    torch.testing.assert_close(out[1:], free)
    torch.testing.assert_close(weights[1:], free_weights)


def test_attention_pseudo_mask_is_minmax_then_max_over_prototypes() -> None:
    attn = torch.tensor([[[0.1, 0.3, 0.5, 0.1], [0.4, 0.2, 0.2, 0.2]]])  # 1 x N=2 x L=4
    pm = attention_pseudo_mask(attn, 2)
    expected = torch.tensor([[0.0, 0.5, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).max(0)[0].reshape(1, 1, 2, 2)
    torch.testing.assert_close(pm, expected, atol=1e-6, rtol=0)


def test_support_branch_attends_only_inside_the_reference_mask() -> None:
    model = small_fcp(branch_attention_dropout=0.0, match_attention_dropout=0.0, feature_dropout=0.0).eval()
    feats = make_features(b=1)
    with torch.no_grad():
        out = model(feats)
    maps = out["attention_maps"]  # B x k x 2T x N x L
    assert maps.shape == (1, 1, 6, 50, GRID * GRID)
    inside = torch.nn.functional.interpolate(feats.reference_masks[:, 0:1], size=(GRID, GRID), mode="nearest")
    outside = inside.flatten() < 0.5
    for t in range(3):  # support maps
        assert maps[0, 0, t][:, outside].abs().max().item() == 0.0
    assert maps[0, 0, 3][:, outside].abs().sum().item() > 0  # query maps are not masked
    apm = out["attention_pseudo_masks"]
    assert apm.shape == (1, 1, 2, GRID, GRID)
    assert apm.min().item() >= 0.0 and apm.max().item() == pytest.approx(1.0, abs=1e-4)


def test_empty_reference_mask_gives_finite_outputs_in_train_and_eval() -> None:
    model = small_fcp()
    feats = make_features(b=2, empty=True)
    for mode in (True, False):
        model.train(mode)
        out = model(feats)
        for key in ("mask_logits", "prompt_tokens", "attention_pseudo_masks", "attention_maps"):
            assert torch.isfinite(out[key]).all(), (mode, key)


def test_losses_and_gradients_reach_only_the_trainable_part() -> None:
    model = small_fcp().train()
    feats = make_features(b=2)
    out = model(feats)
    assert out["mask_logits"].shape == (2, 1, 128, 128)
    assert out["prompt_tokens"].shape == (2, 1, 50, 256)
    target = torch.zeros(2, 512, 512)
    target[:, 100:300, 150:350] = 1
    losses = model.loss(out, target, torch.ones_like(target))
    assert set(losses) == {"loss", "loss_bce", "loss_dice", "loss_guide", "loss_ortho"}
    expected = losses["loss_bce"] + losses["loss_dice"] + 0.5 * losses["loss_guide"] + 0.05 * losses["loss_ortho"]
    torch.testing.assert_close(losses["loss"], expected)
    assert losses["loss_ortho"].item() > 0
    losses["loss"].backward()
    assert_gradients_reach_exactly_the_trainable_parameters(model)


def test_k_shot_uses_each_shots_own_sam_features_and_averages_logits() -> None:
    model = small_fcp().eval()
    feats = make_features(b=1, k=2)
    with torch.no_grad():
        both = model(feats)["mask_logits"]
        singles = [model(feats.shot(s))["mask_logits"] for s in range(2)]
        torch.testing.assert_close(both, (singles[0] + singles[1]) / 2, atol=1e-4, rtol=1e-4)
        # Changing only shot 1's SAM embedding changes the prediction.
        changed = EpisodeFeatures(
            reference_masks=feats.reference_masks, target_sam=feats.target_sam,
            target_backbone=feats.target_backbone, reference_backbone=feats.reference_backbone,
            reference_sam=torch.cat([feats.reference_sam[:, :1], -feats.reference_sam[:, 1:]], dim=1),
            reference_masked_layer4=feats.reference_masked_layer4,
        )
        assert not torch.allclose(model(changed)["mask_logits"], both)


def test_fcp_needs_reference_sam_features() -> None:
    model = small_fcp()
    feats = make_features(b=1)
    no_ref = EpisodeFeatures(
        reference_masks=feats.reference_masks, target_sam=feats.target_sam,
        target_backbone=feats.target_backbone, reference_backbone=feats.reference_backbone,
        reference_masked_layer4=feats.reference_masked_layer4,
    )
    with pytest.raises(ValueError, match="reference_sam"):
        model(no_ref)
    with pytest.raises(ValueError, match="T >= 2"):
        build_model("fcp", num_layers=1, allow_random_init=True)


def test_dropouts_and_minmax_epsilon_are_the_authors() -> None:
    """transformer_decoder: branch cross-attentions attention-dropout 0.5 with residual dropout 0,
    matching cross-attention attention-dropout 0.2, matching self-attention none; eps 1e-9."""
    decoder = build_model("fcp", allow_random_init=True).prompt_encoder.decoder
    for layer in [*decoder.support_layers, *decoder.query_layers]:
        assert layer.attn.dropout == 0.5 and layer.dropout.p == 0.0
    assert decoder.match_cross.attn.dropout == 0.2 and decoder.match_cross.dropout.p == 0.0
    assert decoder.match_self.attn.dropout == 0.0 and decoder.match_self.dropout.p == 0.0
    # a flat map (max == min) normalises to 0 / (0 + 1e-9); a range of 1e-8 is not swamped by eps
    attn = torch.tensor([[[0.0, 1e-8, 0.0, 0.0]]])
    assert attention_pseudo_mask(attn, 2).max().item() == pytest.approx(1e-8 / (1e-8 + 1e-9), rel=1e-4)


def test_guide_loss_weights_authors_and_paper() -> None:
    from refseg_models.losses import dice_from_probabilities, fcp_guide_loss, probability_bce_loss

    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    masks = [torch.rand(2, 8, 8, generator=g) for _ in range(2)]  # T = 3
    term = [probability_bce_loss(m, target) + dice_from_probabilities(m, target) for m in masks]
    authors = fcp_guide_loss(masks, target, form="paper")  # train.py: layer m divided by (T - 1 - m) -> 1/2, 1
    torch.testing.assert_close(authors, term[0] / 2 + term[1])
    paper = fcp_guide_loss(masks, target, weighting="paper", form="paper")  # eq. 9: uniform 1 / (T - 1)
    torch.testing.assert_close(paper, (term[0] + term[1]) / 2)
    assert build_model("fcp", guide_weighting="paper", allow_random_init=True).criterion.guide_weighting == "paper"


def _fcp_compute_pseudo_objective(logit_mask: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Transcribed from SuhoPark0706/FCP model/VRP_encoder.py: ``compute_pseudo_objective``
    (lines 310-314) with its ``dice_loss`` (lines 126-145). ``logit_mask``: B x 1 x 64 x 64 attention
    pseudo mask (probabilities), ``gt_mask``: B x 64 x 64."""
    bsz = logit_mask.size(0)
    loss_bce = F.binary_cross_entropy_with_logits(logit_mask.squeeze(1), gt_mask.float())
    inputs, targets = logit_mask.flatten(1), gt_mask.flatten(1)
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1 + 1e-9)
    return loss_bce + loss.sum() / bsz


def test_guide_loss_is_the_authors_pseudo_objective_by_default_and_the_papers_on_request() -> None:
    model = small_fcp().train()
    assert model.config.guide_loss == "authors"
    out = model(make_features(b=2))
    target = torch.zeros(2, 128, 128)
    target[:, 20:90, 30:100] = 1
    # FCP train.py lines 48-53: the GT nearest-resized to the attention grid, layer m's objective
    # divided by (len(pseudo_masks) - m)
    query_mask = F.interpolate(target.unsqueeze(1), size=(GRID, GRID), mode="nearest").squeeze(1)
    pseudo_masks = [out["attention_pseudo_masks"][:, 0, m].unsqueeze(1) for m in range(out["attention_pseudo_masks"].shape[2])]
    expected = sum(_fcp_compute_pseudo_objective(msk, query_mask) / (len(pseudo_masks) - m) for m, msk in enumerate(pseudo_masks))
    losses = model.loss(out, target, torch.ones_like(target))
    torch.testing.assert_close(losses["loss_guide"], expected, rtol=1e-6, atol=1e-7)
    # the paper's form (plain BCE + Dice on the probabilities) is another number
    paper = small_fcp(guide_loss="paper").criterion(out, target, torch.ones_like(target))
    assert abs(paper["loss_guide"].item() - expected.item()) > 0.05
    with pytest.raises(ValueError, match="guide_loss must be one of"):
        build_model("fcp", guide_loss="logits", allow_random_init=True)
