"""build_encoder: every registry name, its shapes, ids and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refseg_models.encoders import Backbone, FrozenEncoder, available_encoders, build_encoder, get_preprocessor
from refseg_models.errors import ModelError
from tiny_sam import TINY_SAM, tiny_sam_registered

# name -> {output: (C, h, w)} for the default preprocessing of each encoder.
EXPECTED_SHAPES = {
    "sam_vit_h": {"image_embedding": (256, 64, 64)},
    "sam_vit_l": {"image_embedding": (256, 64, 64)},
    "sam_vit_b": {"image_embedding": (256, 64, 64)},
    "resnet50_v2": {"layer2": (512, 64, 64), "layer3": (1024, 64, 64), "layer4": (2048, 64, 64)},
    "resnet50_tv": {"layer2": (512, 64, 64), "layer3": (1024, 32, 32), "layer4": (2048, 16, 16)},
    "vgg16": {"layer2": (256, 64, 64), "layer3": (512, 32, 32), "layer4": (512, 32, 32)},
    "mobilenet_v2": {"layer2": (32, 64, 64), "layer3": (96, 32, 32), "layer4": (1280, 16, 16)},
    "sam_proxy_mobilenet_v2": {"image_embedding": (256, 32, 32)},
    "dinov2_vits14": {"patch_tokens": (384, 64, 64)},
    "dinov2_vitb14": {"patch_tokens": (768, 64, 64)},
    "dinov2_vitl14": {"patch_tokens": (1024, 64, 64)},
}


def test_registry_names():
    assert available_encoders() == sorted(EXPECTED_SHAPES)


def test_the_tiny_test_sam_is_not_refsegs_own():
    """Tests and benchmarks register their tiny SAM ViT (tests/tiny_sam.py): while registered it is
    built like any encoder (SAM's output geometry); refseg's registry itself does not hold it."""
    with tiny_sam_registered(), torch.device("meta"):
        encoder = build_encoder(TINY_SAM, allow_random_init=True)
        out = encoder(torch.zeros(1, 3, encoder.input_size, encoder.input_size))
    assert encoder.encoder_id == TINY_SAM and tuple(out["image_embedding"].shape) == (1, 256, 64, 64)
    with pytest.raises(ModelError, match="unknown encoder 'sam_vit_tiny'"):
        build_encoder(TINY_SAM, allow_random_init=True)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_output_shapes_of_every_encoder(name):
    # Meta device: full-size architectures (ViT-H included) run shape-exact without compute or memory.
    with torch.device("meta"):
        encoder = build_encoder(name, allow_random_init=True)
        batch = torch.zeros(2, 3, encoder.input_size, encoder.input_size)
        out = encoder(batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, *s) for k, s in EXPECTED_SHAPES[name].items()}
    assert isinstance(encoder, FrozenEncoder)
    assert encoder.encoder_id == name
    assert encoder.preprocessing_id
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.output_shapes() == EXPECTED_SHAPES[name]
    if not name.startswith(("sam_", "dinov2_")):
        assert isinstance(encoder, Backbone)
        assert encoder.channels == {k: c for k, (c, _, _) in EXPECTED_SHAPES[name].items()}
        assert encoder.input_size == 512
        layer4 = encoder.forward_layer4(out["layer3"])
        assert layer4.shape == out["layer4"].shape


def test_unknown_name_lists_the_options():
    with pytest.raises(ModelError, match="unknown encoder 'sam_vit_x'.*mobilenet_v2.*sam_vit_b"):
        build_encoder("sam_vit_x", "whatever.pth")


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope" / "resnet50_v2.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        build_encoder("resnet50_v2", path)


def test_no_silent_random_init():
    with pytest.raises(ValueError, match="needs a checkpoint path.*allow_random_init=True"):
        build_encoder("mobilenet_v2")
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        build_encoder("sam_vit_b", None)


def test_bad_options_are_refused():
    with tiny_sam_registered(), pytest.raises(ValueError, match="unknown SAM preprocessing 'squash'"):
        build_encoder(TINY_SAM, allow_random_init=True, preprocessing="squash")
    with pytest.raises(ValueError, match="multiple of 14"):
        build_encoder("dinov2_vits14", allow_random_init=True, input_size=900)
    with pytest.raises(TypeError):
        build_encoder("vgg16", allow_random_init=True, no_such_option=1)


@pytest.mark.real_data
def test_get_preprocessor_matches_each_encoders_preprocess(coco_mini_dir):
    """Ray Data decode tasks use get_preprocessor(preprocessing_id) without building the model."""
    image_path = sorted(Path(coco_mini_dir, "images").iterdir())[5]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    configs = [(name, {}) for name in EXPECTED_SHAPES] + [
        (TINY_SAM, {"preprocessing": "sam_longest1024_pad"}),
        ("dinov2_vits14", {"input_size": 518, "resize": "squash"}),
    ]
    with tiny_sam_registered():
        for name, cfg in configs:
            with torch.device("meta"):
                encoder = build_encoder(name, allow_random_init=True, **cfg)
            expected = encoder.preprocess(image)
            assert expected.shape == (3, encoder.input_size, encoder.input_size), name
            assert torch.equal(get_preprocessor(encoder.preprocessing_id)(image), expected), name
    with pytest.raises(ModelError, match="unknown preprocessing_id 'squash512_pad_imagenet'"):
        get_preprocessor("squash512_pad_imagenet")
