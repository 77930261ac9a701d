"""Post-norm attention blocks (Mask2Former's CrossAttentionLayer / SelfAttentionLayer, no FFN).

Used by VRP-SAM, ProSAM and FCP: ``torch.nn.MultiheadAttention``, residual then LayerNorm, positions
added to the keys only, every weight matrix xavier-uniform initialised. Tensors are batch-first here
(``batch_first=True``); that changes neither the parameters nor the arithmetic of the authors'
sequence-first layers.
"""

from __future__ import annotations

import torch
from torch import nn


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """queries attend to (keys + key_pos, values); out = LayerNorm(q + Dropout(attn)).

    ``attention_dropout``: MultiheadAttention's dropout on the attention weights;
    ``residual_dropout``: dropout on the attention output before the residual. FCP's authors set
    them apart (branch cross-attentions 0.5 / 0, matching 0.2 / 0); VRP-SAM uses 0 / 0.
    """

    def __init__(
        self, dim: int = 256, num_heads: int = 4, attention_dropout: float = 0.0, residual_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(residual_dropout)
        _xavier_init(self)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_pos: torch.Tensor | None = None,
        blocked: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
          queries: B x N x C. keys, values: B x L x C. key_pos: 1 or B x L x C (added to keys only).
          blocked: optional B x L bool, True = key may not be attended. Rows whose keys are all
            blocked (e.g. an empty reference mask) attend everywhere instead of producing NaN.
          need_weights: also return the head-averaged attention weights B x N x L (as
            MultiheadAttention returns them: after attention dropout in training mode).
        Returns: (B x N x C, weights or None)

        Under autocast a call that returns its weights runs in fp32: the weights are ~1/L each and
        feed FCP's min-max normalised pseudo masks and its guide / orthogonality losses, whose
        gradients amplify bf16 rounding of the logits into noise (measured:
        tests/test_training_step_equivalence.py). Calls without weights follow autocast.
        """
        device = queries.device.type
        if need_weights and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                fp32 = [None if t is None else t.float() for t in (queries, keys, values, key_pos)]
                return self.forward(*fp32, blocked=blocked, need_weights=True)
        k = keys if key_pos is None else keys + key_pos
        attn_mask = None
        if blocked is not None:
            # Empty-mask guard: a query row with every key blocked would softmax over -inf -> NaN.
            all_blocked = blocked.all(dim=1, keepdim=True)
            blocked = blocked & ~all_blocked
            b, n, heads = queries.shape[0], queries.shape[1], self.num_heads
            attn_mask = blocked[:, None, None, :].expand(b, heads, n, blocked.shape[1]).reshape(b * heads, n, -1)
        out, weights = self.attn(
            queries, k, values, attn_mask=attn_mask, need_weights=need_weights, average_attn_weights=True
        )
        return self.norm(queries + self.dropout(out)), weights


class SelfAttentionLayer(nn.Module):
    """tokens attend to themselves (no positions); out = LayerNorm(x + Dropout(attn)).

    Dropouts as in :class:`CrossAttentionLayer`."""

    def __init__(
        self, dim: int = 256, num_heads: int = 4, attention_dropout: float = 0.0, residual_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(residual_dropout)
        _xavier_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x N x C -> B x N x C."""
        out = self.attn(x, x, x, need_weights=False)[0]
        return self.norm(x + self.dropout(out))
