"""Frozen SAM prompt encoder + mask decoder, decoding learned prompt tokens batch-aligned.

VRP-SAM, ProSAM and FCP (and the PerSAM / SegIC baselines) all end in SAM's own ``PromptEncoder`` and
``MaskDecoder`` (segment_anything.modeling), frozen. Two things the package does not do directly:

* ``MaskDecoder.predict_masks`` does ``torch.repeat_interleave(image_embeddings, tokens.shape[0])``,
  i.e. it assumes ONE image for MANY prompt sets. Training needs B images with B prompt sets (one
  embedding per prompt set). ``SamDecoder.forward`` therefore calls the decoder's own submodules
  (transformer, output_upscaling, hypernetwork MLPs, IoU head) in the same order and with the same
  arithmetic as ``predict_masks``, batch-aligned. For B = 1 it equals ``MaskDecoder.forward`` exactly
  (tested); the package is neither modified nor vendored.
* The sparse prompt is a free tensor of learned tokens (B x N x 256), not points/boxes. With no
  point or box prompt SAM's prompt encoder yields zero sparse tokens, so the sparse prompt is exactly
  the learned tokens; the dense prompt is ``no_mask_embed`` broadcast to 64 x 64.

Sizes are SAM's fixed ones (identical for vit_b / vit_l / vit_h): embedding dim 256, image embedding
64 x 64, input 1024, TwoWayTransformer depth 2, MLP 2048, 8 heads, 3 + 1 mask tokens.

Gradients flow through the frozen decoder into the prompt tokens (its parameters have
``requires_grad=False``, the graph is kept).
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn
from torch.nn import functional as F

from refseg_models.encoders.checkpoint import load_state_dict_strict
from refseg_models.errors import ModelError, WeightsNotFoundError

SAM_EMBED_DIM = 256
SAM_EMBEDDING_SIZE = 64
SAM_INPUT_SIZE = 1024
SAM_LOW_RES_SIZE = 256

_PREFIXES = ("prompt_encoder.", "mask_decoder.")


class SamDecoder(nn.Module):
    """SAM's frozen prompt encoder + mask decoder with a batch-aligned forward.

    Attributes:
      prompt_encoder: segment_anything ``PromptEncoder`` (used for ``no_mask_embed``, the dense
        positional encoding ``get_dense_pe()`` and, for baselines, point / box / mask prompts).
      mask_decoder: segment_anything ``MaskDecoder``.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SamDecoder":
        # Frozen: stays in eval mode when a parent model is put in train mode.
        return super().train(False)

    def no_mask_dense_embeddings(self, batch_size: int) -> torch.Tensor:
        """``no_mask_embed`` broadcast to B x 256 x 64 x 64 (SAM's dense prompt without a mask)."""
        h, w = self.prompt_encoder.image_embedding_size
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        sparse_tokens: torch.Tensor,
        dense_embeddings: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per image embedding.

        Args:
          image_embeddings: B x 256 x 64 x 64 SAM image embeddings (one per prompt set; repeat it
            yourself, e.g. ``repeat_interleave``, to decode several prompt sets against one image).
          sparse_tokens: B x N x 256 sparse prompt tokens (N may be 0).
          dense_embeddings: optional B x 256 x 64 x 64 dense prompt; default ``no_mask_embed``.
          multimask_output: as in SAM: False -> the single-mask token (mask 0), True -> masks 1..3.

        Returns:
          low_res_masks: B x 1 (or 3) x 256 x 256 mask logits.
          iou_predictions: B x 1 (or 3).
        """
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != SAM_EMBED_DIM:
            raise ModelError(f"image_embeddings must be B x 256 x h x w, got {tuple(image_embeddings.shape)}")
        if sparse_tokens.dim() != 3 or sparse_tokens.shape[-1] != SAM_EMBED_DIM:
            raise ModelError(f"sparse_tokens must be B x N x 256, got {tuple(sparse_tokens.shape)}")
        batch = image_embeddings.shape[0]
        if sparse_tokens.shape[0] != batch:
            raise ModelError(
                f"one image embedding per prompt set: got {batch} embeddings and {sparse_tokens.shape[0]} "
                "prompt sets (repeat the embeddings to decode several prompt sets per image)"
            )
        if tuple(image_embeddings.shape[-2:]) != tuple(self.prompt_encoder.image_embedding_size):
            raise ModelError(
                f"image_embeddings spatial size {tuple(image_embeddings.shape[-2:])} != SAM's "
                f"{tuple(self.prompt_encoder.image_embedding_size)}"
            )
        if dense_embeddings is None:
            dense_embeddings = self.no_mask_dense_embeddings(batch)
        masks, iou_pred = self._predict_masks(image_embeddings, sparse_tokens.to(image_embeddings.dtype), dense_embeddings)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def decode(self, image_embeddings: torch.Tensor, sparse_tokens: torch.Tensor) -> torch.Tensor:
        """B x 256 x 64 x 64 embeddings + B x N x 256 tokens -> B x 1 x 256 x 256 low-res logits
        (dense prompt = ``no_mask_embed``, ``multimask_output=False``)."""
        return self.forward(image_embeddings, sparse_tokens)[0]

    def _predict_masks(
        self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same steps as MaskDecoder.predict_masks, except that the image embedding and positional
        # encoding are used batch-aligned instead of repeat_interleave'd per prompt set.
        md = self.mask_decoder
        batch = sparse.shape[0]
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)

        src = image_embeddings + dense
        image_pe = self.prompt_encoder.get_dense_pe().to(src.dtype)
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + md.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled_embedding = md.output_upscaling(src)
        hyper_in = torch.stack(
            [md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(md.num_mask_tokens)], dim=1
        )
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = md.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def upsample_logits(low_res_logits: torch.Tensor, size: int = 512) -> torch.Tensor:
    """B x C x 256 x 256 low-res logits -> B x C x size x size, bilinear with ``align_corners=True``:
    as VRP-SAM and FCP reach their 512 x 512 working resolution (``SAM2pred.forward_mask_decoder``,
    SAM2pred.py line 70 in both syp2ysy/VRP-SAM and SuhoPark0706/FCP). SAM's own
    ``postprocess_masks`` uses align_corners=False; the corner-aligned grid moves boundaries by up
    to half a low-res pixel, so the authors' choice is followed."""
    return F.interpolate(low_res_logits, size=(size, size), mode="bilinear", align_corners=True)


def build_sam_decoder(
    checkpoint: str | Path | None = None, image_embedding_size: int = SAM_EMBEDDING_SIZE
) -> SamDecoder:
    """SAM's prompt encoder + mask decoder with SAM's fixed sizes, frozen.

    Args:
      checkpoint: a full SAM checkpoint (``sam_vit_{b,l,h}_*.pth``; only its ``prompt_encoder.*`` and
        ``mask_decoder.*`` keys are used) or a file holding just those keys. ``None`` leaves
        segment-anything's random initialisation (tests, parameter counts, or a later
        ``load_sam_decoder_weights``).
      image_embedding_size: 64 for every released SAM (vit_b / l / h). Smaller values only for the
        small random-init test SAMs (e.g. a tiny ViT at 512 input -> 32 x 32), which keep CPU tests
        fast; the decoder's parameters do not depend on it.
    """
    embedding = image_embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=SAM_EMBED_DIM,
        image_embedding_size=(embedding, embedding),
        input_image_size=(SAM_INPUT_SIZE, SAM_INPUT_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=SAM_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    decoder = SamDecoder(prompt_encoder, mask_decoder)
    if checkpoint is not None:
        load_sam_decoder_weights(decoder, checkpoint)
    return decoder


def load_sam_decoder_weights(decoder: SamDecoder, checkpoint: str | Path) -> None:
    """Load the ``prompt_encoder.*`` and ``mask_decoder.*`` keys of a SAM checkpoint, strictly.

    Other keys (``image_encoder.*``) are ignored. Raises FileNotFoundError for a missing file and
    ModelError naming the file and the missing / unexpected / mis-shaped keys otherwise.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsNotFoundError(f"SAM checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    selected = {k: v for k, v in state.items() if k.startswith(_PREFIXES)}
    if not selected:
        raise ModelError(
            f"{path}: no 'prompt_encoder.*' or 'mask_decoder.*' keys (is this a SAM checkpoint? "
            f"first keys: {list(state)[:5]})"
        )
    load_state_dict_strict(decoder, selected, source=f"{path} (SAM prompt encoder / mask decoder)")
