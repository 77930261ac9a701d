"""SAM image encoder: architecture parity with segment_anything, strict loading, preprocessing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision import transforms as T

from refseg_models.encoders import CheckpointError, build_encoder
from refseg_models.encoders.sam_image_encoder import PREPROCESSING_SAM, PREPROCESSING_VRP
from refseg_models.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("tiny_sam")  # sam_vit_tiny: tests/tiny_sam.py


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    encoder = build_encoder("sam_vit_tiny", allow_random_init=True)
    # SAM zero-initialises pos_embed/rel_pos; randomise everything so round trips are meaningful.
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.02)
    return encoder


@pytest.fixture(scope="module")
def real_image(coco_mini_dir) -> np.ndarray:
    info = json.loads((coco_mini_dir / "instances.json").read_text())
    name = info["images"][1]["file_name"]
    return np.asarray(Image.open(coco_mini_dir / "images" / name).convert("RGB"))


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_architecture_matches_segment_anything_registry(variant):
    # On the meta device: exact parameter layout of the full-size models without allocating them.
    with torch.device("meta"):
        reference = sam_model_registry[variant]().image_encoder
        ours = build_encoder(f"sam_{variant}", allow_random_init=True)
    expected = {f"image_encoder.{k}": v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert ours.encoder_id == f"sam_{variant}"


def test_tiny_output_shape_and_frozen(tiny):
    assert tiny.output_shapes() == {"image_embedding": (256, 64, 64)}
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training
    with pytest.raises(ValueError, match="expects B x 3 x 512 x 512"):
        tiny(torch.zeros(1, 3, 1024, 1024))


def _save_full_sam_checkpoint(encoder, path, extra=None):
    state = {k: v.clone() for k, v in encoder.state_dict().items()}  # image_encoder.* keys
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    state.update(extra or {})
    torch.save(state, path)


def test_round_trip_full_and_bare_checkpoints(tiny, tmp_path):
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        expected = tiny(x)["image_embedding"]
    full = tmp_path / "sam_full.pth"
    _save_full_sam_checkpoint(tiny, full)
    bare = tmp_path / "sam_encoder_only.pth"
    torch.save(tiny.image_encoder.state_dict(), bare)
    wrapped = tmp_path / "training_checkpoint.pth"  # {"state_dict": ...} wrappers are unwrapped
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, wrapped)
    for path in (full, bare, wrapped):
        loaded = build_encoder("sam_vit_tiny", path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)["image_embedding"], expected, rtol=0, atol=0)


def test_strict_loading_errors_name_the_keys(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}

    missing = dict(state)
    del missing["image_encoder.neck.0.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): neck\.0\.weight") as info:
        build_encoder("sam_vit_tiny", tmp_path / "missing.pth")
    assert "missing.pth" in str(info.value)

    torch.save({**state, "image_encoder.blocks.9.norm1.weight": torch.ones(96)}, tmp_path / "unexpected.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.9\.norm1\.weight"):
        build_encoder("sam_vit_tiny", tmp_path / "unexpected.pth")

    torch.save({**state, "image_encoder.pos_embed": torch.zeros(1, 32, 32, 96)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 32, 32, 96\) vs model \(1, 64, 64, 96\)"):
        build_encoder("sam_vit_tiny", tmp_path / "shape.pth")

    # A ViT-B checkpoint into the tiny model: every problem is reported, not a random-init model.
    torch.save({"image_encoder.blocks.11.attn.qkv.weight": torch.zeros(2304, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="missing keys .*unexpected keys"):
        build_encoder("sam_vit_tiny", tmp_path / "wrong.pth")

    torch.save({**state, "something_else.weight": torch.zeros(1)}, tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match="something_else.weight"):
        build_encoder("sam_vit_tiny", tmp_path / "stray.pth")


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"image_encoder.x": SimpleNamespace(a=1)}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_encoder("sam_vit_tiny", tmp_path / "pickle.pth")


@pytest.mark.real_data
def test_vrp_preprocessing_is_vrp_sams_pipeline(tiny, real_image):
    x = tiny.preprocess(real_image)
    assert tiny.preprocessing_id == PREPROCESSING_VRP and x.shape == (3, 512, 512) and x.dtype == torch.float32
    # VRP-SAM (HSNet data code): torchvision Resize((512, 512)) on the PIL image, ToTensor, Normalize.
    authors = T.Compose([T.Resize((512, 512)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x, authors(Image.fromarray(real_image)), rtol=0, atol=1e-6)
    # Hand computation of one pixel: PIL's resized uint8 value, /255, ImageNet normalisation.
    pil = np.asarray(Image.fromarray(real_image).resize((512, 512), Image.BILINEAR))
    hand = (pil[100, 200, 1] / 255.0 - 0.456) / 0.224
    assert x[1, 100, 200].item() == pytest.approx(hand, abs=1e-6)


def test_vrp_upsample_is_align_corners_bilinear(tiny, monkeypatch):
    """512 -> 1024 resize inside forward, checked against a hand-written align_corners=True formula."""
    seen = {}
    monkeypatch.setattr(tiny.image_encoder, "forward", lambda t: seen.setdefault("x", t))
    x = torch.randn(1, 3, 512, 512)
    tiny(x)
    up = seen["x"]
    assert up.shape == (1, 3, 1024, 1024)
    for i, j in [(0, 0), (1023, 1023), (1, 700), (517, 3), (800, 1022)]:
        fy, fx = i * 511 / 1023, j * 511 / 1023  # align_corners=True source coordinates
        y0, x0 = int(fy), int(fx)
        y1, x1 = min(y0 + 1, 511), min(x0 + 1, 511)
        wy, wx = fy - y0, fx - x0
        v = x[0, 2]
        hand = (1 - wy) * ((1 - wx) * v[y0, x0] + wx * v[y0, x1]) + wy * ((1 - wx) * v[y1, x0] + wx * v[y1, x1])
        assert up[0, 2, i, j].item() == pytest.approx(hand.item(), abs=1e-4)  # float32 coordinates
    half_pixel = torch.nn.functional.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
    assert (up - half_pixel).abs().max() > 0.1  # the test tells the two conventions apart


@pytest.mark.real_data
def test_sam_mode_matches_sam_predictor(tiny, real_image):
    encoder = build_encoder("sam_vit_tiny", allow_random_init=True, preprocessing=PREPROCESSING_SAM)
    x = encoder.preprocess(real_image)
    assert encoder.preprocessing_id == "sam_longest1024_pad" and x.shape == (3, 1024, 1024)
    # segment_anything's own path: SamPredictor.set_image -> ResizeLongestSide -> Sam.preprocess.
    resized = ResizeLongestSide(1024).apply_image(real_image)
    sam_like = SimpleNamespace(
        pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
        image_encoder=SimpleNamespace(img_size=1024),
    )
    expected = Sam.preprocess(sam_like, torch.as_tensor(resized).permute(2, 0, 1).float()[None])[0]
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    h, w = resized.shape[:2]
    assert max(h, w) == 1024
    assert x[:, h:, :].abs().sum() == 0 and x[:, :, w:].abs().sum() == 0
    with torch.no_grad():
        out = encoder(x[None])["image_embedding"]
    assert out.shape == (1, 256, 64, 64) and torch.isfinite(out).all()


def test_bad_images_are_refused(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.preprocess(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        tiny.preprocess(np.zeros((10, 10), dtype=np.uint8))
