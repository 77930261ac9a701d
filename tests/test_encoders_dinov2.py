"""DINOv2: official checkpoint key names, a reference forward, SegIC preprocessing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refseg_models.encoders import CheckpointError, build_encoder
from refseg_models.encoders.dinov2 import interpolate_pos_embed


def official_state_dict(dim: int, depth: int, registers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with the key names and shapes of the official dinov2_vit*14 backbone files
    (hub config: img_size 518 -> 37 x 37 positions, block_chunks=0), random values."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "cls_token": r(1, 1, dim, std=1.0),
        "pos_embed": r(1, 1 + 37 * 37, dim, std=1.0),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, 14, 14),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim, std=0.1),
        "norm.bias": r(dim),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, dim, std=1.0)
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(dim, std=0.1), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim, std=0.05), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim, std=0.05), p + "attn.proj.bias": r(dim),
            p + "ls1.gamma": 0.5 + r(dim, std=0.1),
            p + "norm2.weight": 1 + r(dim, std=0.1), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim, std=0.05), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim, std=0.05), p + "mlp.fc2.bias": r(dim),
            p + "ls2.gamma": 0.5 + r(dim, std=0.1),
        }  # fmt: skip
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, registers: int = 0) -> torch.Tensor:
    """DINOv2's forward_features written out from the official code (explicit softmax attention)."""
    b, _, h, w = x.shape
    dim = sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1)
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    h0, w0 = h // 14 + 0.1, w // 14 + 0.1
    patch = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(h0 / m, w0 / m), mode="bicubic")
    t = t + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(b, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, -1, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + y * sd[p + "ls1.gamma"]
        y = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + y * sd[p + "ls2.gamma"]
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 1 + registers :]
    return t.transpose(1, 2).reshape(b, dim, h // 14, w // 14)


@pytest.fixture(scope="module")
def vits14_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(official_state_dict(384, 12), path)
    return path


def test_official_checkpoint_loads_and_matches_reference_forward(vits14_checkpoint):
    encoder = build_encoder("dinov2_vits14", vits14_checkpoint, input_size=224, resize="squash")
    sd = torch.load(vits14_checkpoint, weights_only=True)
    assert set(encoder.vit.state_dict()) == set(sd)
    x = torch.randn(2, 3, 224, 280, generator=torch.Generator().manual_seed(3))  # non-square: h/w order
    with torch.no_grad():
        out = encoder(x)["patch_tokens"]
    assert out.shape == (2, 384, 16, 20)
    torch.testing.assert_close(out, reference_forward(sd, x, heads=6), rtol=1e-4, atol=1e-4)


def test_register_token_variant(tmp_path):
    sd = official_state_dict(384, 2, registers=4)
    path = tmp_path / "reg4.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="unexpected keys .*register_tokens"):
        build_encoder("dinov2_vits14", path)
    # depth 2 of 12 blocks: the strict loader reports the 10 missing blocks
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): blocks\.10\."):
        build_encoder("dinov2_vits14", path, num_register_tokens=4)


def test_pos_embed_interpolation_follows_dinov2():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    assert interpolate_pos_embed(pos, 37, 37) is pos  # 518 input: used as is
    out = interpolate_pos_embed(pos, 64, 64)  # 896 input
    assert out.shape == (1, 1 + 64 * 64, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    # The +0.1 offset (scale_factor 64.1 / 37) changes the values versus size=(64, 64): keep it.
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(64, 64), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (out[:, 1:] - by_size).abs().max() > 1e-3
    # Hand computation of one interpolated position: cubic convolution (A = -0.75), source
    # coordinate (i + 0.5) / s - 0.5 with s = 64.1 / 37, border indices clamped.
    def taps(i: int) -> list[tuple[int, float]]:
        src = (i + 0.5) / (64.1 / 37) - 0.5
        i0 = math.floor(src)
        t = src - i0

        def cubic(d: float, a: float = -0.75) -> float:
            d = abs(d)
            return (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

        return [(min(max(i0 + o, 0), 36), cubic(t - o)) for o in (-1, 0, 1, 2)]

    for y, x in [(10, 20), (0, 63), (63, 31)]:
        hand = sum(wy * wx * grid[0, :, sy, sx] for sy, wy in taps(y) for sx, wx in taps(x))
        torch.testing.assert_close(out[0, 1 + y * 64 + x], hand, rtol=1e-4, atol=1e-4)


def test_strict_errors_name_keys(tmp_path):
    sd = official_state_dict(384, 12)
    del sd["blocks.3.ls2.gamma"]
    sd["blocks.3.ls2.scale"] = torch.zeros(384)
    sd["pos_embed"] = torch.zeros(1, 1 + 16 * 16, 384)  # a 224-pretrained file
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        build_encoder("dinov2_vits14", tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1): blocks.3.ls2.gamma" in message
    assert "unexpected keys (1): blocks.3.ls2.scale" in message
    assert "pos_embed: checkpoint (1, 257, 384) vs model (1, 1370, 384)" in message


@pytest.mark.real_data
def test_segic_preprocessing(coco_mini_dir):
    info = json.loads((coco_mini_dir / "instances.json").read_text())
    image = np.asarray(Image.open(coco_mini_dir / "images" / info["images"][3]["file_name"]).convert("RGB"))
    encoder = build_encoder("dinov2_vitb14", allow_random_init=True)
    assert encoder.preprocessing_id == "longest896_pad_imagenet" and encoder.input_size == 896
    x = encoder.preprocess(image)
    assert x.shape == (3, 896, 896) and x.dtype == torch.float32
    h, w = image.shape[:2]
    scale = 896 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    assert x[:, nh:, :].abs().sum() == 0 and x[:, :, nw:].abs().sum() == 0  # zero AFTER normalisation
    assert (x[:, : nh, : nw] != 0).any(dim=0).float().mean() > 0.99
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))  # torchvision resize on PIL
    hand = (resized[nh // 2, nw // 3, 2] / 255.0 - 0.406) / 0.225
    assert x[2, nh // 2, nw // 3].item() == pytest.approx(hand, abs=1e-5)
    squash = build_encoder("dinov2_vitb14", allow_random_init=True, input_size=518, resize="squash")
    assert squash.preprocessing_id == "squash518_imagenet" and squash.preprocess(image).shape == (3, 518, 518)
    assert squash.output_shapes() == {"patch_tokens": (768, 37, 37)}
