"""Writing a predicted mask and its overlay on the target image as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_COLOR = (255, 0, 0)


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, color: tuple[int, int, int] = OVERLAY_COLOR) -> np.ndarray:
    """H x W x 3 uint8 image + H x W bool mask -> H x W x 3 uint8 with the mask tinted by ``color``
    (alpha blend inside the mask) and a 1-pixel outline in full ``color``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} sizes differ")
    out = image.astype(np.float32).copy()
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    out[mask & ~inner] = tint
    return out.round().clip(0, 255).astype(np.uint8)


def write_outputs(out_dir: str | Path, image: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    """Write ``mask.png`` (L mode, 0 / 255) and ``overlay.png`` (RGB) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / "mask.png", out_dir / "overlay.png"
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path)
    Image.fromarray(overlay_image(image, mask)).save(overlay_path)
    return mask_path, overlay_path


CAPTION_HEIGHT = 22


def captioned_row(panels: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """Images of the same height side by side, each under a white caption bar with its text (black):
    H x W_i x 3 uint8 -> (CAPTION_HEIGHT + H) x sum(W_i) x 3 uint8."""
    font = ImageFont.load_default(size=14)
    tiles = []
    for image, caption in panels:
        bar = Image.new("RGB", (image.shape[1], CAPTION_HEIGHT), (255, 255, 255))
        ImageDraw.Draw(bar).text((4, 3), caption, fill=(0, 0, 0), font=font)
        tiles.append(np.concatenate([np.asarray(bar), image], axis=0))
    return np.concatenate(tiles, axis=1)
