"""The training step's gradients do not depend on batching, autocast or the fused optimizer beyond a
stated tolerance: VRP-SAM, ProSAM and FCP through ``refseg_models`` directly (build_model, the
method's own loss, the recipe's AdamW), not the Ray loop.

* Batching: the gradient of one step over B episodes equals the per-episode gradients accumulated
  (each episode's loss over B), to fp32 rounding, when every target pixel is valid. With ignored
  pixels the BCE terms are means over the BATCH's valid pixels (``losses.sigmoid_bce_loss``), so
  episodes weigh by their valid-pixel counts; accumulating micro-batches must then scale BCE by
  valid pixels / all valid pixels and Dice by 1 / B, as checked for VRP-SAM below. Randomness is
  switched off (dropout 0) or drawn alike: ProSAM's Gaussian prompt samples come from one
  generator in the same order either way; its default Student-t sampler draws the chi-square
  normals after all the Gaussian ones, so its per-episode draws differ from the batched ones (same
  distribution, other numbers) and that case cannot be compared draw for draw.
* bf16 autocast (CPU here) against the fp32 step: relative error of the whole gradient vector
  (VRP-SAM, ProSAM); FCP: every loss value, and the gradient of every term but the guide loss,
  which is discontinuous at random init (its test says why, and checks it in fp32).
* Fused AdamW against the plain AdamW update: parameters after three steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import SMALL_CHANNELS, single_thread, toy_episode_features  # noqa: F401

from refseg_models import build_model
from refseg_models.modeling.sam_decoder import build_sam_decoder
from refseg_models.recipes import build_optimizer, recipe_for

GRID, OUT, B = 32, 128, 3
# Dropout off (its masks depend on the draw order); ProSAM: K = 3 Gaussian samples (see above).
NO_RANDOMNESS = {
    "vrp_sam": dict(feature_dropout=0.0),
    "prosam": dict(feature_dropout=0.0, distribution="gaussian", num_samples=3),
    "fcp": dict(feature_dropout=0.0, branch_attention_dropout=0.0, match_attention_dropout=0.0),
}


def _model(method: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        method, backbone_channels=SMALL_CHANNELS, feature_size=GRID, output_size=OUT,
        sam_decoder=build_sam_decoder(image_embedding_size=GRID), **{**NO_RANDOMNESS[method], **overrides},
    ).train()


def _batch(method: str, seed: int = 1):
    features = toy_episode_features(B, 1, grid=GRID, seed=seed, with_sam_refs=method == "fcp")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(B, OUT, OUT)
    for b in range(B):  # a different object box per episode
        y, x = torch.randint(0, OUT // 2, (2,), generator=generator).tolist()
        targets[b, y : y + OUT // 3, x : x + OUT // 4] = 1
    return features, targets, torch.ones(B, OUT, OUT)


def _forward_loss(model, features, targets, valid, generator=None):
    outputs = model(features, generator=generator) if model.name == "prosam" else model(features)
    return model.loss(outputs, targets, valid)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _flat(gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(gradients.items())])


# ||accumulated - batched|| / ||batched|| per parameter tensor: fp32 rounding of differently shaped
# products (measured here: see the test's output with -s); a real batching bug is O(1).
BATCHING_BOUND = 1e-5


@pytest.mark.parametrize("method", ["vrp_sam", "prosam", "fcp"])
def test_batched_step_gradient_equals_accumulated_per_episode_gradients(method):
    model = _model(method)
    features, targets, valid = _batch(method)
    model.zero_grad(set_to_none=True)
    _forward_loss(model, features, targets, valid, torch.Generator().manual_seed(7))["loss"].backward()
    batched = _gradients(model)

    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(7)  # consumed episode after episode: the same draws
    for b in range(B):
        loss = _forward_loss(model, features.select([b]), targets[b : b + 1], valid[b : b + 1], generator)["loss"]
        (loss / B).backward()
    accumulated = _gradients(model)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(batched) == set(accumulated) and set(batched) <= trainable and len(batched) > 10
    assert _flat(batched).norm() > 0
    errors = {name: ((accumulated[name] - g).norm() / g.norm().clamp(min=1e-12)).item() for name, g in batched.items()}
    worst = max(errors, key=errors.get)
    print(f"{method}: worst per-tensor relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] < BATCHING_BOUND, (worst, errors[worst])


def test_ignored_pixels_weigh_episodes_by_valid_pixels_in_the_bce_term():
    """VRP-SAM with a different ignored region per episode: the batched gradient is the per-episode
    BCE gradients weighted by valid pixels / all valid pixels plus the Dice gradients over B."""
    model = _model("vrp_sam")
    features, targets, valid = _batch("vrp_sam")
    for b in range(B):
        valid[b, : 20 * (b + 1)] = 0  # 20, 40, 60 ignored rows
    model.zero_grad(set_to_none=True)
    _forward_loss(model, features, targets, valid)["loss"].backward()
    batched = _flat(_gradients(model))

    counts = valid.flatten(1).sum(1)
    for weighting in ("valid_pixels", "uniform"):
        model.zero_grad(set_to_none=True)
        for b in range(B):
            terms = _forward_loss(model, features.select([b]), targets[b : b + 1], valid[b : b + 1])
            bce_weight = counts[b] / counts.sum() if weighting == "valid_pixels" else 1.0 / B
            (bce_weight * terms["loss_bce"] + terms["loss_dice"] / B).backward()
        error = ((_flat(_gradients(model)) - batched).norm() / batched.norm()).item()
        if weighting == "valid_pixels":
            assert error < 1e-5, error
        else:  # a plain mean of per-episode losses is another gradient: the weighting matters
            assert error > 1e-3, error


def _step_gradients(model, features, targets, valid, precision: str, terms=("loss",)) -> dict[str, torch.Tensor]:
    """Flat gradient of each named loss term of one step at ``precision`` (bf16: CPU autocast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        losses = _forward_loss(model, features, targets, valid, torch.Generator().manual_seed(7))
    assert losses["loss"].dtype == torch.float32  # the loss itself is reduced in fp32
    gradients = {}
    for term in terms:
        model.zero_grad(set_to_none=True)
        losses[term].backward(retain_graph=True)
        gradients[term] = _flat(_gradients(model))
    gradients["values"] = {term: losses[term].item() for term in losses}
    return gradients


def _relative(other: torch.Tensor, reference: torch.Tensor) -> float:
    return ((other - reference).norm() / reference.norm()).item()


# bf16 autocast vs fp32, whole gradient vector, measured here on this toy geometry (2-core CPU with
# AVX512-BF16, torch 2.14): VRP-SAM 7.3 % relative error (cosine 0.9974), ProSAM 4.4 % (0.9992).
# The bounds leave room for other CPUs' bf16 kernels; GPU numbers come from bench/gpu_suite.py.
AUTOCAST_RELATIVE_ERROR = 0.15
AUTOCAST_COSINE = 0.99


@pytest.mark.parametrize("method", ["vrp_sam", "prosam"])
def test_bf16_autocast_step_stays_close_to_the_fp32_step(method):
    model = _model(method)
    features, targets, valid = _batch(method)
    reference = _step_gradients(model, features, targets, valid, "float32")["loss"]
    low = _step_gradients(model, features, targets, valid, "bfloat16")["loss"]
    error, cosine = _relative(low, reference), torch.nn.functional.cosine_similarity(low, reference, dim=0).item()
    print(f"{method}: bf16 autocast gradient relative error {error:.4f}, cosine {cosine:.5f}")
    assert error > 1e-4, error  # bf16 did run
    assert error < AUTOCAST_RELATIVE_ERROR and cosine > AUTOCAST_COSINE, (error, cosine)


# The guide's gradient passes through the bf16 backbone taps and both attentions: measured 17 %
# here (the other terms 0.5-7 %); 1e-5 relative input noise in fp32 moves it by 0.2 %, so this is
# bf16 rounding, not an ill-conditioned loss.
FCP_GUIDE_RELATIVE_ERROR = 0.3


def test_fcp_bf16_autocast_losses_and_gradients_stay_close_to_fp32():
    """FCP under bf16 autocast: loss values within 1 % and every term's gradient within the bound.
    The attention weights and the min-max pseudo masks run in fp32 (``CrossAttentionLayer``): in
    bf16 they turned the guide loss 5.0 into 13.2. With the authors' guide loss (a sigmoid on the
    pseudo-mask probabilities, ``guide_loss="authors"``) the guide's gradient is well conditioned;
    the paper's form (plain BCE on min-max normalised near-uniform attention) selects the argmin /
    argmax key at random init, so only its value is compared there."""
    model = _model("fcp")
    features, targets, valid = _batch("fcp")
    terms = ("loss_bce", "loss_dice", "loss_ortho", "loss_guide")
    reference = _step_gradients(model, features, targets, valid, "float32", terms)
    low = _step_gradients(model, features, targets, valid, "bfloat16", terms)
    for term in terms:
        value, expected = low["values"][term], reference["values"][term]
        assert abs(value - expected) <= 0.01 * abs(expected), (term, value, expected)
        error = _relative(low[term], reference[term])
        print(f"fcp {term}: bf16 autocast gradient relative error {error:.4f}")
        assert error < (FCP_GUIDE_RELATIVE_ERROR if term == "loss_guide" else AUTOCAST_RELATIVE_ERROR), (term, error)


# ||fused update - plain update|| / ||plain update|| over three steps (see the test's output with -s).
FUSED_ADAMW_BOUND = 1e-5  # measured 5e-7 (VRP-SAM and FCP)


@pytest.mark.parametrize("method", ["vrp_sam", "fcp"])
def test_fused_adamw_updates_like_the_plain_adamw(method):
    plain = _model(method)
    fused = copy.deepcopy(plain)
    recipe = recipe_for(method, "coco20i")
    optimizers = {"plain": build_optimizer(plain, recipe), "fused": build_optimizer(fused, recipe, fused=True)}
    assert optimizers["fused"].defaults["fused"] and not optimizers["plain"].defaults["fused"]
    start = {name: p.detach().clone() for name, p in plain.named_parameters()}
    for step in range(3):
        # One gradient per step, given to both optimizers: what differs is only the update's arithmetic
        # (FCP's guide gradient would otherwise amplify the first step's rounding: see above).
        features, targets, valid = _batch(method, seed=step)
        optimizers["plain"].zero_grad(set_to_none=True)
        _forward_loss(plain, features, targets, valid)["loss"].backward()
        for p, q in zip(plain.parameters(), fused.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        optimizers["plain"].step()
        optimizers["fused"].step()
    # Compare the updates (parameter displacements), not the parameters: lr 1e-4 moves them by
    # ~1e-4 per step, so the parameters agree to 1e-7 whatever the update does.
    plain_update = torch.cat([(p.detach() - start[n]).flatten() for n, p in plain.named_parameters()])
    fused_update = torch.cat([(p.detach() - start[n]).flatten() for n, p in fused.named_parameters()])
    error = _relative(fused_update, plain_update)
    print(f"{method}: fused AdamW update relative difference {error:.2e} after 3 steps")
    assert plain_update.norm() > 0 and error < FUSED_ADAMW_BOUND, error


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_loops_train_step_runs_at_the_configured_precision(precision):
    """``TrainConfig.precision`` reaches the Ray loop's step: its gradient is the one of a step at that
    precision (and not the other's); weights stay fp32."""
    from types import SimpleNamespace

    from pipeline.training.loop import train_step

    model = _model("vrp_sam")
    reference = copy.deepcopy(model)
    features, targets, valid = _batch("vrp_sam")
    optimizer = build_optimizer(model, recipe_for("vrp_sam", "coco20i"))
    worker = SimpleNamespace(
        model=model, train_model=model, device=torch.device("cpu"), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), cfg=SimpleNamespace(precision=precision),
    )
    train_step(worker, SimpleNamespace(features=features, target_masks=targets.to(torch.uint8)))
    stepped = _flat(_gradients(model))
    expected = {p: _step_gradients(reference, features, targets, valid, p)["loss"] for p in ("float32", "bfloat16")}
    other = "float32" if precision == "bfloat16" else "bfloat16"
    assert _relative(stepped, expected[precision]) < 1e-6
    assert _relative(stepped, expected[other]) > 1e-4
    assert all(p.dtype == torch.float32 for p in model.parameters())
