"""ProSAM: parameter count, Student-t sampler (moments, gradients), batched K-sample decoding,
mean-prompt inference, Table 8 strategies, robustness curve mechanics, Proposition 1 numerically."""

from __future__ import annotations


import math

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
from refseg_models.modeling.prosam import INFERENCE_STRATEGIES, sample_prompts
from refseg_models.modeling.robustness import mask_iou, prompt_robustness_curve
from refseg_models.modeling.sam_decoder import build_sam_decoder
from refseg_models.modeling.inputs import EpisodeFeatures

SMALL = SMALL_CHANNELS




GRID = 32  # test-size SAM grid: 4x cheaper than SAM's 64 x 64, same code path


def small_prosam(**cfg: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "prosam", backbone_channels=SMALL, feature_size=GRID, output_size=128,
        sam_decoder=build_sam_decoder(image_embedding_size=GRID), **cfg,
    )


def make_features(b: int = 2, seed: int = 0) -> EpisodeFeatures:
    return toy_episode_features(b, 1, grid=GRID, seed=seed)


def test_prosam_trainable_parameters_match_the_spec() -> None:
    model = build_model("prosam", allow_random_init=True)
    assert trainable(model) == 1_723_648
    assert sum(p.numel() for p in model.trainable_parameters()) == 1_723_648
    assert trainable(model) - trainable(model.prompt_encoder) == 2 * 65_792
    assert all(not p.requires_grad for p in model.sam_decoder.parameters())


@pytest.mark.parametrize("distribution", ["student_t", "gaussian"])
def test_sampler_moments(distribution: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([[[0.5, -1.0]]])
    sigma = torch.tensor([[[2.0, 0.5]]])
    z = sample_prompts(mu, sigma, 400_000, distribution, nu=5.0, generator=gen)  # 1 x K x 1 x 2
    assert z.shape == (1, 400_000, 1, 2)
    factor = 5.0 / 3.0 if distribution == "student_t" else 1.0  # nu / (nu - 2)
    mean = z.mean(dim=1)[0, 0]
    var = z.var(dim=1)[0, 0]
    torch.testing.assert_close(mean, mu[0, 0], atol=0.02, rtol=0)
    torch.testing.assert_close(var, factor * sigma[0, 0] ** 2, rtol=0.05, atol=0)
    # Heavy tails: P(|z - mu| > 3 sigma) is ~0.030 for t(5) and ~0.0027 for a Gaussian.
    tail = ((z[0, :, 0, 0] - 0.5).abs() > 6.0).float().mean().item()
    if distribution == "student_t":
        assert 0.025 < tail < 0.035
    else:
        assert tail < 0.004


def test_student_t_is_multivariate_one_u_per_prompt_vector() -> None:
    """z = mu + sigma * eps * sqrt(nu / u) with ONE u per 256-d token: ||z - mu||^2 / sigma^2 is then
    d * F(d, nu) (mean d * nu / (nu - 2), heavy right tail); per-element u would concentrate it
    (a sum of 256 independent t^2: relative spread ~0.18, no mass beyond 2x the mean)."""
    d, nu, tokens = 256, 5.0, 20_000
    mu, sigma = torch.zeros(1, tokens, d), torch.full((1, tokens, d), 2.0)
    z = sample_prompts(mu, sigma, 1, "student_t", nu=nu, generator=torch.Generator().manual_seed(0))[0, 0]
    norm = (z / 2.0).square().sum(-1)  # tokens
    assert float(norm.mean()) == pytest.approx(d * nu / (nu - 2), rel=0.05)
    # ||z||^2 > 4 d  <=>  (chi2(d) / d) * nu / u > 4  ~  u < 5 / 4: P(chi2(5) < 1.25) ~ 0.06 (per element: ~0).
    far = float((norm > 4.0 * d).float().mean())
    assert 0.03 < far < 0.10
    # the per-token RMS varies from token to token (one sqrt(nu / u) scales the whole vector)
    per_token_rms = (z / 2.0).square().mean(-1).sqrt()
    assert float(per_token_rms.std() / per_token_rms.mean()) > 0.3


def test_sampler_gradients_reach_mu_and_sigma() -> None:
    mu = torch.zeros(2, 3, 4, requires_grad=True)
    sigma = torch.ones(2, 3, 4, requires_grad=True)
    z = sample_prompts(mu, sigma, 8, generator=torch.Generator().manual_seed(1))
    (z.square().mean() + z.mean()).backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert sigma.grad is not None and sigma.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        sample_prompts(mu, sigma, 2, distribution="cauchy")


def test_training_forward_decodes_k_samples_in_one_batch_against_the_shared_embedding() -> None:
    torch.manual_seed(0)
    model = small_prosam(num_samples=3).train()
    feats = make_features(b=2)
    calls: list[int] = []
    hook = model.sam_decoder.mask_decoder.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = model(feats, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert calls == [6]  # one decoder call with B*K = 6 prompt sets
    assert out["mask_logits"].shape == (2, 3, 128, 128)
    assert out["samples"].shape == (2, 3, 50, 256)
    assert out["mu"].shape == out["sigma"].shape == (2, 50, 256)
    assert (out["sigma"] > 0).all()
    # The batched decode equals decoding each sample on its own.
    with torch.no_grad():
        for j in range(3):
            single = model.decode_tokens(feats.target_sam, out["samples"][:, j])
            torch.testing.assert_close(out["mask_logits"][:, j : j + 1], single, atol=1e-4, rtol=1e-4)
    target = torch.zeros(2, 128, 128)
    target[:, 25:75, 25:75] = 1
    losses = model.loss(out, target, torch.ones_like(target))
    assert set(losses) == {"loss", "loss_bce", "loss_dice"}
    assert model.mask_logits(out).shape == (2, 1, 128, 128)  # the mean over the K sampled logits
    losses["loss"].backward()
    assert_gradients_reach_exactly_the_trainable_parameters(model)


def test_eval_uses_the_mean_prompt_and_strategies_agree_when_sigma_vanishes() -> None:
    torch.manual_seed(0)
    model = small_prosam().eval()
    feats = make_features(b=1)
    with torch.no_grad():
        out = model(feats)
        assert out["mask_logits"].shape == (1, 1, 128, 128)
        torch.testing.assert_close(out["prompt_tokens"], out["mu"])
        mean_mask = model.predict(feats, "mean_prompt")
        torch.testing.assert_close(mean_mask, out["mask_logits"] > 0)
        # sigma -> 1e-4 (softplus of a very negative pre-activation): every strategy = the mean prompt.
        model.sigma_head.weight.zero_()
        model.sigma_head.bias.fill_(-30.0)
        for strategy in INFERENCE_STRATEGIES:
            pred = model.predict(feats, strategy, num_samples=2, generator=torch.Generator().manual_seed(0))
            assert pred.shape == (1, 1, 128, 128) and pred.dtype == torch.bool
            assert (pred != mean_mask).float().mean().item() < 1e-3, strategy
    with pytest.raises(ValueError, match="unknown strategy"):
        model.predict(feats, "median")


def test_strategies_differ_as_defined_on_sampled_prompts() -> None:
    torch.manual_seed(0)
    model = small_prosam().eval()
    with torch.no_grad():
        model.sigma_head.bias.fill_(3.0)  # wide distribution: samples disagree
    feats = make_features(b=1)
    preds = {s: model.predict(feats, s, num_samples=5, generator=torch.Generator().manual_seed(3)) for s in INFERENCE_STRATEGIES}
    union, mean_bin, majority = preds["max_binary"], preds["mean_binary"], preds["majority_binary"]
    assert (majority <= mean_bin).all() and (mean_bin <= union).all()  # majority (> K/2) within mean (>= 0.5) within union
    assert (preds["max_logits"] == union).all()  # max logit > 0 iff some sample is positive


def test_head_initialisation_options() -> None:
    model = small_prosam(initial_sigma=0.13, mu_init="xavier").eval()
    with torch.no_grad():
        params = model.distribution_params(make_features(b=1))
    # sigma = softplus(W t + b) + 1e-4 with b = softplus^-1(0.13 - 1e-4): centred on 0.13.
    assert float(params["sigma"].median()) == pytest.approx(0.13, rel=0.3)
    assert float(params["mu"].pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.3)  # xavier: unit-scale mu
    default = small_prosam().eval()
    with torch.no_grad():
        params = default.distribution_params(make_features(b=1))
    assert float(params["sigma"].median()) == pytest.approx(0.69, rel=0.3)
    with pytest.raises(ValueError, match="mu_init"):
        small_prosam(mu_init="orthogonal")
    with pytest.raises(ValueError, match="initial_sigma"):
        small_prosam(initial_sigma=0.0)


def test_gaussian_variant_and_config_errors() -> None:
    model = small_prosam(distribution="gaussian", num_samples=2)
    out = model.train()(make_features(b=1))
    assert out["mask_logits"].shape == (1, 2, 128, 128)
    with pytest.raises(ValueError, match="nu"):
        build_model("prosam", nu=2.0, allow_random_init=True)
    with pytest.raises(ValueError, match="distribution"):
        build_model("prosam", distribution="laplace", allow_random_init=True)


def test_robustness_curve_mechanics() -> None:
    torch.manual_seed(0)
    model = small_prosam()
    feats = make_features(b=2)
    with pytest.raises(ValueError, match="eval"):
        prompt_robustness_curve(model.train(), feats, torch.zeros(2, 128, 128), [0.0])
    model.eval()
    with torch.no_grad():
        clean = model(feats)["mask_logits"] > 0
    # GT = the clean prediction: IoU 1 at zero noise, then it must drop once the noise swamps the tokens.
    gt = clean[:, 0].float()
    curve = prompt_robustness_curve(model, feats, gt, [0.0, 0.01, 100.0], generator=torch.Generator().manual_seed(0))
    assert len(curve) == 3
    assert curve[0] == pytest.approx(1.0)
    assert curve[1] > 0.9
    assert curve[2] < curve[0]
    rel = prompt_robustness_curve(model, feats, gt, [0.0], relative=True)
    assert rel[0] == pytest.approx(1.0)
    torch.manual_seed(0)
    vrp = build_model(
        "vrp_sam", backbone_channels=SMALL, feature_size=GRID, output_size=128,
        sam_decoder=build_sam_decoder(image_embedding_size=GRID),
    ).eval()
    assert len(prompt_robustness_curve(vrp, feats, gt, [0.0, 1.0])) == 2


def test_mask_iou() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b[0, 1:3] = True
    torch.testing.assert_close(mask_iou(a, b), torch.tensor([1 / 3, 1.0]))


def _toy_loss(x: torch.Tensor) -> torch.Tensor:
    """A smooth non-quadratic loss of a batch of D-vectors: N x D -> N."""
    a = torch.linspace(0.5, 2.0, x.shape[-1], dtype=x.dtype)
    return (torch.sin(a * x) + 0.5 * (a * x) ** 2 + 0.1 * x.pow(4)).sum(-1) + torch.log1p(x.pow(2).sum(-1))


@pytest.mark.parametrize("distribution", ["gaussian", "student_t"])
def test_proposition_1_noise_injection_equals_laplacian_penalty(distribution: str) -> None:
    """E[L(x + s*eps)] ~= L(x) + (s^2 c / 2) * Laplacian L(x), c = Cov(eps) scale (1, or nu/(nu-2)).

    Monte Carlo with antithetic pairs (the first-order term cancels exactly), float64."""
    torch.manual_seed(0)
    d, s = 6, 0.03
    x = torch.tensor([0.3, -0.7, 1.1, 0.05, -1.4, 0.8], dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda v: _toy_loss(v[None])[0], x)
    laplacian = torch.diagonal(hessian).sum().item()
    c = 1.0 if distribution == "gaussian" else 5.0 / 3.0
    gen = torch.Generator().manual_seed(0)
    noise = sample_prompts(
        torch.zeros(1, d, dtype=torch.float64), torch.full((1, d), s, dtype=torch.float64), 400_000,
        distribution, nu=5.0, generator=gen,
    )[0]
    lx = _toy_loss(x[None])[0].item()
    expected_gap = 0.5 * s * s * c * laplacian
    gap = (0.5 * (_toy_loss(x + noise) + _toy_loss(x - noise)) - lx).mean().item()
    assert gap == pytest.approx(expected_gap, rel=0.05)
    # The relation is second order: at 3x the noise the gap grows ~9x.
    gap3 = (0.5 * (_toy_loss(x + 3 * noise) + _toy_loss(x - 3 * noise)) - lx).mean().item()
    assert gap3 / gap == pytest.approx(9.0, rel=0.1)
    assert math.isfinite(laplacian) and laplacian > 0


def test_relative_noise_uses_one_rms_per_episode_also_for_fcp_tokens() -> None:
    """FCP's tokens are B x k x N x C: the relative noise scale is each item's RMS over all its
    prompt entries (one number per episode), not a per-channel RMS."""

    class Recorder:
        training = False

        def __init__(self, tokens: torch.Tensor) -> None:
            self.tokens, self.seen = tokens, []

        def prompt_tokens(self, features):
            return self.tokens

        def decode_tokens(self, target_sam, tokens):
            self.seen.append(tokens)
            return torch.zeros(tokens.shape[0], 1, 8, 8)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 2, 5, 4, generator=g)
    tokens[..., 0] *= 100.0  # one loud channel
    tokens[1] *= 3.0  # a louder episode
    model = Recorder(tokens)
    features = make_features(b=2)
    prompt_robustness_curve(model, features, torch.zeros(2, 8, 8), [0.5], generator=torch.Generator().manual_seed(7), relative=True)
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(7))
    ratio = (model.seen[0] - tokens) / noise  # = 0.5 * rms(item), the same for every entry of an item
    rms = tokens.pow(2).flatten(1).mean(1).sqrt()
    for item in range(2):
        torch.testing.assert_close(ratio[item], torch.full_like(ratio[item], 0.5 * float(rms[item])), rtol=1e-4, atol=1e-4)
