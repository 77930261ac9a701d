"""SAM's image-encoder attention through ``F.scaled_dot_product_attention`` (same function, same weights).

segment_anything's ``Attention`` (``segment_anything/modeling/image_encoder.py``, ``Attention.forward``)
materialises ``(q * scale) @ k^T``, adds the decomposed relative-position terms
(``add_decomposed_rel_pos``: ``rel_h[b, i, kh] + rel_w[b, i, kw]``, computed from the UNSCALED query),
takes the softmax and multiplies by ``v``: three kernels and a B x heads x N x N fp32 matrix written
and read several times. PyTorch's segment-anything-fast (``segment_anything_fast/modeling/
image_encoder.py``, ``Attention.forward``, and ``flash_4.py``, ``_attention_rel_h_rel_w``, its
non-Triton branch) computes the same thing as one ``scaled_dot_product_attention`` call with the
two relative-position terms summed into an additive ``attn_mask``: SDPA scales ``q k^T`` by
``1 / sqrt(head_dim)`` (= SAM's ``scale``) and adds the mask before the softmax, so the function is
unchanged and only the kernel differs (flash / memory-efficient kernels on a GPU, a fused kernel on
the CPU). We take that branch, not segment-anything-fast's custom Triton kernel.

:class:`SdpaAttention` subclasses segment_anything's ``Attention`` and owns the same parameters
(``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), so state-dict keys, strict loading of the official
``sam_vit_*.pth`` files and the init are untouched; :func:`use_sdpa_attention` swaps it into every
block of a built ``ImageEncoderViT``, sharing the block's parameter tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention mask.

    ``q``: B x heads x (H * W) x d, unscaled (as ``add_decomposed_rel_pos`` uses it);
    ``rel_pos_h`` / ``rel_pos_w``: (2H - 1) x d, (2W - 1) x d. Returns B x heads x (H * W) x (H * W)
    in ``q``'s dtype: ``bias[b, n, (qh, qw), (kh, kw)] = <q, Rh[qh, kh]> + <q, Rw[qw, kw]>``.
    """
    b, heads, _, dim = q.shape
    h, w = size
    # get_rel_pos is segment_anything's own (same indexing and interpolation); cast so that under
    # autocast the bias has q's dtype, as SDPA requires of a float mask.
    rel_h_table = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # H x H x d
    rel_w_table = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # W x W x d
    grid = q.reshape(b, heads, h, w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_h_table)  # B x heads x H x W x H
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_w_table)  # B x heads x H x W x W
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)


class SdpaAttention(Attention):
    """segment_anything's ``Attention`` (same constructor and parameters) computed with SDPA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> B x H x W x C."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x (H * W) x d
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def sdpa_attention_from(attention: Attention) -> SdpaAttention:
    """An :class:`SdpaAttention` that owns ``attention``'s parameter tensors (not copies)."""
    input_size = None
    if attention.use_rel_pos:
        input_size = ((attention.rel_pos_h.shape[0] + 1) // 2, (attention.rel_pos_w.shape[0] + 1) // 2)
    with torch.device("meta"):  # its own freshly initialised tensors are replaced below: allocate none
        fast = SdpaAttention(
            attention.qkv.in_features,
            num_heads=attention.num_heads,
            qkv_bias=attention.qkv.bias is not None,
            use_rel_pos=attention.use_rel_pos,
            input_size=input_size,
        )
    fast.qkv, fast.proj = attention.qkv, attention.proj
    if attention.use_rel_pos:
        fast.rel_pos_h, fast.rel_pos_w = attention.rel_pos_h, attention.rel_pos_w
    return fast.train(attention.training)


def use_sdpa_attention(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Swap every block's attention of ``encoder`` for :class:`SdpaAttention` (in place; same state dict)."""
    for block in encoder.blocks:
        if type(block.attn) is Attention:
            block.attn = sdpa_attention_from(block.attn)
    return encoder
