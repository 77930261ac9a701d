"""SegIC's prompt encoder: SAM's PromptEncoder with a dense-mask path that starts at input size.

SAM's own ``PromptEncoder`` downscales a mask prompt of 4x the embedding size (256 -> 64) with two
stride-2 convs. SegIC's dense prompt is the cosine map at the model's input resolution (896 for
DINOv2 at 14 x 64), so the authors' ``CustomPromptEncoder`` uses strides (7, 2): 896 -> 128 -> 64.
We subclass segment_anything's class (points, boxes, positional encoding and ``no_mask_embed`` are
SAM's, freshly initialised and trainable) and only replace the mask-downscaling stack.
"""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from refseg_models.errors import ModelError


class SegICPromptEncoder(PromptEncoder):
    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (896, 896),
        mask_in_chans: int = 16,
        mask_down_strides: tuple[int, int] = (7, 2),
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__(embed_dim, image_embedding_size, input_image_size, mask_in_chans, activation)
        first, second = mask_down_strides
        for axis in range(2):
            if image_embedding_size[axis] * first * second != input_image_size[axis]:
                raise ModelError(
                    f"mask_down_strides {mask_down_strides} take an input of {input_image_size} to "
                    f"{tuple(s // (first * second) for s in input_image_size)}, not to the image "
                    f"embedding size {image_embedding_size}"
                )
        # The dense prompt arrives at input resolution (see module docstring).
        self.mask_input_size = tuple(input_image_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=first, stride=first),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=second, stride=second),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
