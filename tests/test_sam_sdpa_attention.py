"""SAM's attention through SDPA equals the installed segment_anything ``Attention`` (fp32, CPU, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling.image_encoder import Attention, Block, window_partition

from refseg_models.encoders import build_encoder
from refseg_models.encoders.sam_attention import SdpaAttention, sdpa_attention_from, use_sdpa_attention
from refseg_models.encoders.sam_image_encoder import SAM_ENCODER_CONFIGS, build_sam_image_encoder_vit

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _randomised_block(dim: int, heads: int, window: int, seed: int) -> Block:
    """A segment_anything ``Block`` as ``_build_sam`` makes them (64 x 64 tokens), every parameter
    random: SAM zero-initialises rel_pos, which would hide a wrong relative-position bias."""
    torch.manual_seed(seed)
    block = Block(dim, heads, qkv_bias=True, use_rel_pos=True, window_size=window, input_size=(64, 64))
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if name.startswith("norm") and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)  # LayerNorm gains near 1: unit-scale tokens into the attention
            else:
                parameter.normal_(0.0, 1.0 if "rel_pos" in name else 0.02)
    return block.eval()


# (dim, heads, window): ViT-B's and ViT-H's geometry (head dim 64 and 80), windowed and global blocks.
GEOMETRIES = [
    pytest.param(768, 12, 14, id="vit_b-window"),
    pytest.param(768, 12, 0, id="vit_b-global"),
    pytest.param(1280, 16, 14, id="vit_h-window", marks=pytest.mark.slow),
    pytest.param(1280, 16, 0, id="vit_h-global", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dim,heads,window", GEOMETRIES)
def test_attention_and_block_match_segment_anything(dim, heads, window):
    block = _randomised_block(dim, heads, window, seed=dim + window)
    tokens = torch.randn(1, 64, 64, dim)  # windowed: 25 windows of 14 x 14 (64 padded to 70) as the batch
    # What the attention itself sees: 14 x 14 windows (64 -> 70 padded: 25 windows) or the whole grid.
    attention_input = window_partition(block.norm1(tokens), window)[0] if window else block.norm1(tokens)
    reference = block.attn
    fast = sdpa_attention_from(reference)
    assert isinstance(fast, SdpaAttention) and fast.qkv is reference.qkv and fast.rel_pos_h is reference.rel_pos_h
    with torch.no_grad():
        expected = reference(attention_input)
        got = fast(attention_input)
        torch.testing.assert_close(got, expected, **TOLERANCE)
        # The relative-position bias matters at these weights (a dropped bias could not pass above).
        fast.rel_pos_h, fast.rel_pos_w = torch.nn.Parameter(reference.rel_pos_h * 0), torch.nn.Parameter(reference.rel_pos_w * 0)
        assert (fast(attention_input) - expected).norm() > 0.1 * expected.norm()
        if window:  # the whole block (window partition and its reversal, residuals, MLP), swapped
            expected_block = block(tokens)
            block.attn = sdpa_attention_from(reference)
            torch.testing.assert_close(block(tokens), expected_block, **TOLERANCE)


def test_swap_keeps_state_dict_and_covers_every_block():
    with torch.device("meta"):
        reference = sam_model_registry["vit_b"]().image_encoder
        ours = build_sam_image_encoder_vit("vit_b")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(type(block.attn) is SdpaAttention for block in ours.blocks)
    assert all(type(block.attn) is Attention for block in reference.blocks)
    assert sum(block.window_size == 0 for block in ours.blocks) == len(SAM_ENCODER_CONFIGS["vit_b"].global_attn_indexes)
    assert all(type(b.attn) is Attention for b in build_sam_image_encoder_vit("vit_tiny", "segment_anything").blocks)
    assert use_sdpa_attention(ours) is ours  # idempotent: already swapped blocks stay as they are


@pytest.mark.slow
def test_vit_b_encoder_matches_segment_anything_at_random_weights(tmp_path):
    """The whole ViT-B-geometry encoder (1024 input, 12 blocks, 4 global) at random weights: the
    installed segment_anything model's weights saved as a SAM checkpoint (``image_encoder.*`` keys, as
    ``sam_vit_b_01ec64.pth``) and loaded strictly by ours."""
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]().image_encoder.eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "rel_pos" in name or name == "pos_embed":  # zero-initialised by SAM: make them matter
                parameter.normal_(0.0, 1.0 if "rel_pos" in name else 0.02)
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save({f"image_encoder.{k}": v for k, v in reference.state_dict().items()}, checkpoint)
    ours = build_encoder("sam_vit_b", checkpoint, preprocessing="sam_longest1024_pad")
    assert all(type(block.attn) is SdpaAttention for block in ours.image_encoder.blocks)
    pixels = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = reference(pixels)
        got = ours(pixels)["image_embedding"]
    assert got.shape == (1, 256, 64, 64)
    # Twelve blocks of fp32 rounding add up: measured here 1.2e-5 largest absolute difference on
    # outputs up to 5.2 in magnitude (||diff|| / ||ref|| = 2.3e-6), so the bound is 1e-5 relative to
    # the output's scale (per block the bound is 1e-5 elementwise, above).
    error = (got - expected).abs()
    assert error.max() <= 1e-5 * expected.abs().max()
    assert error.norm() <= 1e-5 * expected.norm()
