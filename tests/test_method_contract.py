"""Every method passes the same contract test (refseg_models.method): forward, an ignore-aware loss,
the mask_logits frame, the trainable-parameter selection (and the recipe's optimizer over exactly
it), and the inference-checkpoint round trip with refusal of mismatched frozen features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model_helpers import SMALL_CHANNELS, single_thread, toy_episode_features  # noqa: F401

from refseg_models import available_models, build_model
from refseg_models.build import METHODS, method_class, method_config
from refseg_models.checkpoint import (
    EncoderIdentity,
    check_encoders,
    load_inference_checkpoint,
    model_from_checkpoint,
    save_inference_checkpoint,
)
from refseg_models.config import MethodConfig
from refseg_models.criterion import PromptMaskCriterion
from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec
from refseg_models.method import LOGITS_FRAMES, RefSegMethod, split_target
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.sam_decoder import build_sam_decoder
from refseg_models.recipes import RECIPES, Recipe, build_optimizer, build_scheduler, recipe_for

GRID = 16
# Every registered method is tested, none named here: its defaults adapted to toy features (the SAM grid,
# the backbone's maps, as the training loop adapts them to a store's), then made small where a field of
# that name exists. A new method reading a feature not listed here needs that feature's toy shape only.
TOY_SHAPES = {
    "sam": {"image_embedding": (256, GRID, GRID)},
    "backbone": {"layer2": (SMALL_CHANNELS[0], 32, 32), "layer3": (SMALL_CHANNELS[1], 16, 16),
                 "layer4": (SMALL_CHANNELS[2], 8, 8), "patch_tokens": (40, GRID, GRID)},
}
SMALL = dict(feature_size=GRID, output_size=64, num_samples=2, input_size=64, mask_down_strides=(2, 2),
             similarity_size=16, loss_points=256)
IDENTITIES = {
    "sam": EncoderIdentity("sam_vit_tiny", "random-init", "vrp512_to1024_imagenet"),
    "backbone": EncoderIdentity("mobilenet_v2", "random-init", "vrp512_squash_tf128"),
}


def _small_config(method: str):
    config = method_class(method).config_for_features(method_config(method), TOY_SHAPES)
    fields = config.to_dict()
    return config.replace(**{name: value for name, value in SMALL.items() if name in fields})


def _build(method: str, sam_decoder=None) -> RefSegMethod:
    torch.manual_seed(0)
    if method_class(method).uses_sam_decoder:
        sam_decoder = sam_decoder or build_sam_decoder(image_embedding_size=GRID)
        return build_model(method, _small_config(method), sam_decoder=sam_decoder)
    return build_model(method, _small_config(method))


def _features(model: RefSegMethod) -> EpisodeFeatures:
    """Random features of 2 one-shot episodes: what ``model``'s spec reads, at the toy shapes."""
    spec = model.feature_spec()
    g = torch.Generator().manual_seed(1)
    base = toy_episode_features(2, 1, grid=GRID, layer2_size=32, with_sam_refs=spec.reference_sam, seed=1)
    fields = dict(reference_masks=base.reference_masks)
    if spec.target_sam:
        fields["target_sam"] = base.target_sam
    if spec.reference_sam:
        fields["reference_sam"] = base.reference_sam
    if spec.backbone:
        shapes = TOY_SHAPES["backbone"]
        missing = [name for name in spec.backbone if name not in shapes]
        assert not missing, f"{model.name} reads backbone features {missing}: give them a toy shape in TOY_SHAPES"
        fields["target_backbone"] = {name: torch.randn(2, *shapes[name], generator=g).relu() for name in spec.backbone}
        fields["reference_backbone"] = {name: torch.randn(2, 1, *shapes[name], generator=g).relu() for name in spec.backbone}
    if spec.masked_reference_layer4:
        fields["reference_masked_layer4"] = torch.randn(2, 1, *TOY_SHAPES["backbone"]["layer4"], generator=g).relu()
    if spec.target_boxes:
        fields["target_boxes"] = torch.tensor([[4.0, 4.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0]])
    return EpisodeFeatures(**fields)


def _labels(size: int) -> torch.Tensor:
    """A B x S x S {0, 1, 255} label mask with an ignore band."""
    labels = torch.zeros(2, size, size, dtype=torch.uint8)
    labels[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels[:, :, : size // 8] = 255
    return labels


@pytest.mark.parametrize("method", available_models())
def test_method_contract(method: str, tmp_path: Path) -> None:
    check_contract(method, tmp_path)


def check_contract(method: str, tmp_path: Path) -> None:
    """The contract of refseg_models/method.py, for the method registered as ``method``."""
    model = _build(method)
    assert isinstance(model, RefSegMethod) and model.name == method
    assert model.logits_frame in LOGITS_FRAMES and model.logits_frame in model.feature_spec().encoders
    features = _features(model)

    # forward -> mask_logits B x 1 x H x W
    model.train()
    outputs = model(features)
    logits = model.mask_logits(outputs)
    assert logits.dim() == 4 and logits.shape[:2] == (2, 1) and torch.isfinite(logits).all()

    # loss: named terms; pixels with valid == 0 contribute nothing
    size = logits.shape[-1]
    targets, valid = split_target(_labels(size))
    torch.manual_seed(5)
    losses = model.loss(outputs, targets, valid)
    assert "loss" in losses and len(losses) >= 3 and all(torch.isfinite(v).all() for v in losses.values())
    flipped = torch.where(valid > 0, targets, 1 - targets)  # other labels on ignored pixels only
    torch.manual_seed(5)
    again = model.loss(outputs, flipped, valid)
    torch.testing.assert_close(again["loss"], losses["loss"])
    torch.manual_seed(5)
    unmasked = model.loss(outputs, flipped, torch.ones_like(valid))
    assert not torch.allclose(unmasked["loss"], losses["loss"])

    # trainable parameters: exactly the learnable part; the optimizer sees exactly them
    trainable = model.trainable_parameters()
    frozen = {id(p) for name in model.frozen_modules for p in model.get_submodule(name).parameters()}
    assert all(id(p) not in frozen for p in trainable)
    assert all(not p.requires_grad for name in model.frozen_modules for p in model.get_submodule(name).parameters())
    if trainable:
        losses["loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        assert all(p.grad is None for name in model.frozen_modules for p in model.get_submodule(name).parameters())
        optimizer = build_optimizer(model, Recipe(method=method))
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in trainable}
        assert any(name == method for name, _ in RECIPES), f"{method} trains: give it its paper's recipe (recipes.py)"
    else:
        with pytest.raises(ModelError, match="no trainable parameters"):
            build_optimizer(model, Recipe(method=method))

    # inference checkpoint round trip: same predictions in eval mode
    model.eval()
    encoders = {role: IDENTITIES[role] for role in model.feature_spec().encoders}
    path = save_inference_checkpoint(tmp_path / f"{method}.pt", model, encoders, {"fold": 0})
    checkpoint = load_inference_checkpoint(path)
    assert checkpoint.method == method and set(checkpoint.encoders) == set(encoders)
    decoder = getattr(model, "sam_decoder", None)
    rebuilt = model_from_checkpoint(checkpoint, sam_decoder=decoder)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model.mask_logits(model(features))
        torch.manual_seed(1)
        got = rebuilt.mask_logits(rebuilt(features))
    torch.testing.assert_close(got, expected)
    check_encoders(checkpoint, encoders)
    for role, identity in encoders.items():
        other = EncoderIdentity(identity.encoder_id, "f" * 64, identity.preprocessing_id)
        with pytest.raises(ModelError, match=f"{role} weights_sha256"):
            check_encoders(checkpoint, {**encoders, role: other})


def test_configs_write_defaults_once_and_round_trip() -> None:
    for method in available_models():
        config_class = method_class(method).config_class
        config = config_class()
        assert config_class.from_dict(config.to_dict()) == config
        with pytest.raises(ModelError, match="unknown option"):
            config_class.from_dict({"not_an_option": 1})
    model = _build("fcp")
    assert model.config.guide_weight == 0.5 and model.criterion.weight_dict["loss_guide"] == 0.5


def test_recipes_are_the_papers_and_schedules_step_per_iteration() -> None:
    vrp = recipe_for("vrp_sam", "coco20i")
    assert (vrp.lr, vrp.weight_decay, vrp.schedule, vrp.epochs, vrp.batch_size, vrp.seed) == (1e-4, 1e-6, "cosine", 50, 8, 321)
    prosam = recipe_for("prosam", "coco20i")
    assert (prosam.epochs, prosam.schedule, prosam.restart_epochs, prosam.seed) == (100, "cosine_restarts", 15, 321)
    assert (recipe_for("fcp", "pascal5i").lr, recipe_for("fcp", "pascal5i").epochs) == (2e-4, 100)
    assert (recipe_for("fcp", "coco20i").lr, recipe_for("fcp", "coco20i").epochs) == (1e-4, 50)
    segic = recipe_for("segic", "mixed")
    assert (segic.lr, segic.weight_decay, segic.milestones, segic.epochs, segic.batch_size) == (1e-4, 1e-4, (10,), 12, 32)
    assert all(r.source for r in RECIPES.values())
    with pytest.raises(ModelError, match="no recipe"):
        recipe_for("vrp_sam", "ade20k")

    model = _build("vrp_sam")
    optimizer = build_optimizer(model, vrp)
    scheduler = build_scheduler(optimizer, vrp, steps_per_epoch=10)  # 500 steps in all
    lrs = []
    for _ in range(500):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[250] == pytest.approx(5e-5, rel=0.02) and lrs[-1] < 1e-7
    # ProSAM: warm restarts every 15 epochs
    optimizer = build_optimizer(model, prosam)
    scheduler = build_scheduler(optimizer, prosam, steps_per_epoch=2)
    lrs = []
    for _ in range(61):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[30] == pytest.approx(1e-4) and lrs[29] < 1e-5  # restart at 15 epochs x 2 steps
    # SegIC: x 0.1 at epoch 10
    segic_model = _build("segic")
    optimizer = build_optimizer(segic_model, segic)
    scheduler = build_scheduler(optimizer, segic, steps_per_epoch=3)
    lrs = []
    for _ in range(36):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[29] == pytest.approx(1e-4) and lrs[30] == pytest.approx(1e-5)


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """A seventh method's config, written in this test only: its defaults and what it reads."""

    channels: int = 2048

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(backbone=("layer4",))


class ToyMethod(RefSegMethod):
    """The smallest trainable method: a 1x1 convolution of the target's layer4, BCE + Dice."""

    config_class = ToyConfig
    frozen_modules = ()

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.head = torch.nn.Conv2d(config.channels, 1, kernel_size=1)
        self.criterion = PromptMaskCriterion()

    @classmethod
    def from_config(cls, config: ToyConfig, sam_decoder=None) -> "ToyMethod":
        return cls(config)

    @classmethod
    def config_for_features(cls, config: ToyConfig, shapes) -> ToyConfig:
        return config.replace(channels=int(shapes["backbone"]["layer4"][0]))

    def forward(self, features: EpisodeFeatures) -> dict:
        self.check_features(features)
        return {"mask_logits": self.head(features.target_backbone["layer4"])}

    def loss(self, outputs, targets, valid) -> dict:
        return self.criterion(outputs, targets, valid)


def test_a_method_registered_once_goes_through_the_same_contract(tmp_path: Path, monkeypatch) -> None:
    """Adding a method (docs/methods.md, "Adding a method"): its file, one registry line, its recipe.
    Registered, it is built by name, checkpointed and loaded back by name and checked like the six,
    with nothing here naming it; without its recipe the contract says so."""
    with METHODS.registered("toy", f"{__name__}:ToyMethod"):
        assert "toy" in available_models() and ToyMethod.name == "toy"
        with pytest.raises(AssertionError, match="give it its paper's recipe"):
            check_contract("toy", tmp_path)
        monkeypatch.setitem(RECIPES, ("toy", "coco20i"), Recipe(method="toy", source="this test"))
        check_contract("toy", tmp_path)
    assert "toy" not in available_models()
