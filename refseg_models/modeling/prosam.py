"""ProSAM (paper: "ProSAM: Enhancing the Robustness of SAM-based Visual Reference Segmentation with
Probabilistic Prompts"): VRP-SAM + a variational (Student-t) prompt head.

Decisions for what the paper leaves open (stated in docs/methods.md):
* two Linear(256, 256) heads on VRP-SAM's 50 x 256 decoder output: mu and s;
  sigma = softplus(s) + 1e-4 (instead of exp(log_sigma): positive, smooth, no clamping needed).
  Trainable parameters: 1,592,064 + 2 * 65,792 = 1,723,648 (paper: 1.73M).
* multivariate Student-t with diagonal scale, nu = 5 fixed; reparameterised
  z = mu + sigma * eps * sqrt(nu / u), eps ~ N(0, I_256) and ONE u ~ Chi2(nu) per prompt vector
  (per 256-d token and Monte Carlo sample), shared by its 256 dimensions (eq. 5-7: d in eq. 5 is the
  dimensionality). Per-element u would give 256 independent 1-d t variables and lose the joint
  outliers the heavy-tail argument rests on. ``distribution="gaussian"`` drops the factor (ablation).
* training loss: mean over K = 10 samples of BCE + Dice (eq. 10), no KL term. The K samples are
  decoded as one batch of B*K prompt sets against the cached target embedding (repeated, not
  recomputed).
* inference: the mean prompt mu (sec. 4.3); ``predict`` also offers the Table 8 strategies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from refseg_models.criterion import PromptMaskCriterion
from refseg_models.errors import ModelError
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.sam_decoder import SamDecoder, upsample_logits
from refseg_models.modeling.vrp_sam import PromptEncoderMethod, VisualReferencePromptEncoder, VRPSamConfig

DISTRIBUTIONS = ("student_t", "gaussian")
INFERENCE_STRATEGIES = (
    "mean_prompt",
    "max_logits",
    "mean_logits",
    "max_binary",
    "mean_binary",
    "majority_binary",
)


def sample_prompts(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    num_samples: int,
    distribution: str = "student_t",
    nu: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reparameterised samples from a diagonal Student-t (or Gaussian) around mu.

    Args:
      mu, sigma: B x N x D location and scale (sigma > 0).
      num_samples: K.
      distribution: "student_t": z = mu + sigma * eps * sqrt(nu / u) with eps ~ N(0, I_D) and ONE
        u ~ Chi2(nu) per D-dimensional prompt vector (shared by its D entries: a multivariate t);
        "gaussian": z = mu + sigma * eps.
    Returns:
      B x K x N x D samples, differentiable w.r.t. mu and sigma.
    """
    if distribution not in DISTRIBUTIONS:
        raise ModelError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if num_samples < 1:
        raise ModelError(f"num_samples must be >= 1, got {num_samples}")
    shape = (mu.shape[0], num_samples, *mu.shape[1:])
    eps = torch.randn(shape, device=mu.device, dtype=mu.dtype, generator=generator)
    if distribution == "student_t":
        # Chi2(nu) = Gamma(nu / 2, rate 1/2) = 2 * Gamma(nu / 2, 1); torch._standard_gamma takes no
        # generator, so draw it as a sum of squared normals when nu is an integer (exact), else
        # through torch.distributions (global RNG).
        vector_shape = (*shape[:-1], 1)  # one u per prompt vector, broadcast over its D entries
        if float(nu).is_integer():
            normals = torch.randn((int(nu), *vector_shape), device=mu.device, dtype=mu.dtype, generator=generator)
            u = normals.square().sum(0)
        else:
            u = torch.distributions.Chi2(torch.tensor(float(nu), device=mu.device, dtype=mu.dtype)).sample(vector_shape)
        eps = eps * torch.sqrt(nu / u)
    return mu.unsqueeze(1) + sigma.unsqueeze(1) * eps


@dataclass(frozen=True)
class ProSamConfig(VRPSamConfig):
    """VRP-SAM's fields plus the variational head: K samples (10), nu (5), the distribution, and
    the head initialisation (not stated by the paper; see docs/methods.md for what trains)."""

    num_samples: int = 10
    nu: float = 5.0
    distribution: str = "student_t"
    initial_sigma: float | None = None
    mu_init: str = "default"


class ProSam(PromptEncoderMethod):
    """ProSAM on features: VRP-SAM's prompt encoder + mu / sigma heads; frozen SAM decoding."""

    config_class = ProSamConfig
    prompt_encoder_class = VisualReferencePromptEncoder

    def __init__(self, config: ProSamConfig, prompt_encoder: VisualReferencePromptEncoder, sam_decoder: SamDecoder) -> None:
        super().__init__()
        if config.distribution not in DISTRIBUTIONS:
            raise ModelError(f"unknown distribution {config.distribution!r}; choose one of {DISTRIBUTIONS}")
        if config.distribution == "student_t" and config.nu <= 2:
            raise ModelError(f"nu must be > 2 for a finite variance, got {config.nu}")
        if config.num_samples < 1:
            raise ModelError(f"num_samples must be >= 1, got {config.num_samples}")
        self.config = config
        dim = config.hidden_dim
        self.prompt_encoder = prompt_encoder
        self.mu_head = nn.Linear(dim, dim)
        self.sigma_head = nn.Linear(dim, dim)
        # Initialisation is not stated by the paper: default nn.Linear (sigma ~ softplus(0) = 0.69 at
        # start, mu RMS ~0.6 for unit-scale tokens). Options: mu_init="xavier" puts mu at the scale of
        # VRP-SAM's tokens (RMS ~1); initial_sigma sets the bias so that sigma starts near that value.
        if config.mu_init == "xavier":
            nn.init.xavier_uniform_(self.mu_head.weight)
            nn.init.zeros_(self.mu_head.bias)
        elif config.mu_init != "default":
            raise ModelError(f"mu_init must be 'default' or 'xavier', got {config.mu_init!r}")
        if config.initial_sigma is not None:
            if config.initial_sigma <= 1e-4:
                raise ModelError(f"initial_sigma must be > 1e-4, got {config.initial_sigma}")
            with torch.no_grad():
                target = torch.tensor(config.initial_sigma - 1e-4)
                self.sigma_head.bias.fill_(float(target + torch.log(-torch.expm1(-target))))  # softplus^-1
        self.sam_decoder = sam_decoder
        self.num_samples = config.num_samples
        self.nu = config.nu
        self.distribution = config.distribution
        self.output_size = config.output_size
        self.criterion = PromptMaskCriterion(config.bce_weight, config.dice_weight)

    def distribution_params(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """mu, sigma: B x (k*50) x 256 (sigma = softplus(s) + 1e-4); pseudo_mask: B x k x 64 x 64."""
        enc = self.prompt_encoder(features)
        tokens = enc["tokens"]
        return {
            "mu": self.mu_head(tokens),
            "sigma": F.softplus(self.sigma_head(tokens)) + 1e-4,
            "pseudo_mask": enc["pseudo_mask"],
        }

    def prompt_tokens(self, features: EpisodeFeatures) -> torch.Tensor:
        """The mean prompt mu: B x (k*50) x 256 (what inference sends to SAM)."""
        return self.distribution_params(features)["mu"]

    def decode_tokens(self, target_sam: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """B x 256 x 64 x 64 + B x N x 256 -> B x 1 x out x out mask logits."""
        return upsample_logits(self.sam_decoder.decode(target_sam, tokens), self.output_size)

    def decode_samples(self, target_sam: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """B x 256 x 64 x 64 + B x K x N x 256 -> B x K x out x out logits, one batch of B*K prompt
        sets against the repeated (not recomputed) embedding."""
        b, k = samples.shape[:2]
        embeddings = target_sam.repeat_interleave(k, dim=0)
        low = self.sam_decoder.decode(embeddings, samples.flatten(0, 1))  # BK x 1 x 256 x 256
        return upsample_logits(low, self.output_size).reshape(b, k, self.output_size, self.output_size)

    def forward(
        self,
        features: EpisodeFeatures,
        sample: bool | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
          sample: decode K sampled prompts (default: in training mode) or the mean prompt.
          num_samples: K (default ``self.num_samples``, 10 in the paper).
        Returns:
          mask_logits: B x K x 512 x 512 when sampling (one channel per sample), else B x 1 x 512 x 512
            from mu.  mu, sigma: B x (k*50) x 256.  pseudo_mask: B x k x 64 x 64.
          samples: B x K x (k*50) x 256 (when sampling).  prompt_tokens: what SAM received
            (mu, or the samples).
        """
        self.check_features(features)
        sample = self.training if sample is None else sample
        params = self.distribution_params(features)
        out = dict(params)
        if sample:
            k = num_samples or self.num_samples
            samples = sample_prompts(params["mu"], params["sigma"], k, self.distribution, self.nu, generator)
            out["samples"] = samples
            out["prompt_tokens"] = samples
            out["mask_logits"] = self.decode_samples(features.target_sam, samples)
        else:
            out["prompt_tokens"] = params["mu"]
            out["mask_logits"] = self.decode_tokens(features.target_sam, params["mu"])
        return out

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean over the K sample channels of BCE + Dice at 512 (eq. 10), valid pixels only."""
        return self.criterion(outputs, targets, valid)

    def mask_logits(self, outputs: Mapping[str, Any]) -> torch.Tensor:
        """B x 1 x 512 x 512: the mean prompt's logits, or the mean over the K sampled logits."""
        logits = outputs["mask_logits"]
        return logits if logits.shape[1] == 1 else logits.mean(dim=1, keepdim=True)

    @torch.no_grad()
    def predict(
        self,
        features: EpisodeFeatures,
        strategy: str = "mean_prompt",
        num_samples: int = 10,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Binary masks B x 1 x 512 x 512 by one of the Table 8 inference strategies.

        "mean_prompt": sigmoid(logits(mu)) > 0.5 (the paper's inference). Over K sampled prompts:
        "max_logits" / "mean_logits": max / mean of the logit masks, > 0; "max_binary": union of the
        binary masks; "mean_binary": mean of the binary masks >= 0.5; "majority_binary": more than
        half of the K binary masks (strict majority).
        """
        if strategy not in INFERENCE_STRATEGIES:
            raise ModelError(f"unknown strategy {strategy!r}; choose one of {INFERENCE_STRATEGIES}")
        params = self.distribution_params(features)
        if strategy == "mean_prompt":
            return self.decode_tokens(features.target_sam, params["mu"]) > 0
        samples = sample_prompts(params["mu"], params["sigma"], num_samples, self.distribution, self.nu, generator)
        logits = self.decode_samples(features.target_sam, samples)  # B x K x H x W
        binary = (logits > 0).float()
        if strategy == "max_logits":
            merged = logits.max(dim=1, keepdim=True)[0] > 0
        elif strategy == "mean_logits":
            merged = logits.mean(dim=1, keepdim=True) > 0
        elif strategy == "max_binary":
            merged = binary.max(dim=1, keepdim=True)[0] > 0.5
        elif strategy == "mean_binary":
            merged = binary.mean(dim=1, keepdim=True) >= 0.5
        else:
            merged = binary.sum(dim=1, keepdim=True) > num_samples / 2
        return merged
