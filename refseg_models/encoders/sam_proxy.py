"""The proxy SAM: a small promptable segmenter trained here, loaded like a real SAM checkpoint.

No real SAM weights exist on the machines refseg is developed and tested on. The proxy SAM stands
in for SAM's image encoder on CPU machines (tests, CI, the README's main job, a laptop):

* image encoder = the real ImageNet MobileNetV2 (``mobilenet_v2``, frozen, NOT in the proxy file: it
  comes from its own weights file) + a small trained **neck** that turns its layer2/3/4 maps into
  SAM's ``image_embedding`` (256 x G x G; G = 16 for the shipped file, a 512 squash input);
* prompt encoder + mask decoder = segment-anything's own ``PromptEncoder`` and ``MaskDecoder``
  classes, unchanged, in SAM's standard 256-d configuration (exactly what
  :func:`refseg_models.modeling.sam_decoder.build_sam_decoder` builds), trained together with the
  neck, SAM-style (box and point prompts, multimask output, IoU head; ``docs/proxy_sam.md``).

Frame convention (as VRP-SAM uses SAM): the 512 squash image is SAM's 1024 x 1024 input viewed at
half resolution, so box / point prompts are given in that 1024 frame (``input_image_size=(1024,
1024)``) and the decoder runs on the G x G embedding (``image_embedding_size=(G, G)``).

The proxy file (one ``torch.load(weights_only=True)`` file, fp16 tensors) holds:

* ``image_encoder.neck.*``: the neck; ``prompt_encoder.*`` / ``mask_decoder.*``: SAM's decoder, so
  ``build_sam_decoder(path, image_embedding_size=G)`` loads it through the same code as a real SAM
  checkpoint;
* ``proxy_sam``: plain metadata (format name and version, grid, neck configuration, the sha256 of the
  MobileNetV2 weights it was trained on, a sha256 over its own tensors, the command and seed that
  produced it).

Because the file pins the backbone's sha256 (a different backbone file is refused), the file's own
sha256 identifies the whole image encoder: it is a correct ``weights_sha256`` for feature stores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from refseg_models.encoders.checkpoint import CheckpointError, freeze, load_state_dict_strict
from refseg_models.encoders.mobilenet_v2 import MobileNetV2Backbone, build_mobilenet_v2_backbone
from refseg_models.errors import ModelError, WeightsNotFoundError

PROXY_ENCODER = "sam_proxy_mobilenet_v2"  # its name in the encoder registry
PROXY_FORMAT = "refseg-sam-proxy"
PROXY_FORMAT_VERSION = 1
METADATA_KEY = "proxy_sam"
NECK_PREFIX = "image_encoder.neck."
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
EMBED_DIM = 256
INPUT_SIZE = 512  # the VRP-SAM squash frame; SAM's 1024 frame at half resolution
BACKBONE_CHANNELS = {"layer2": 32, "layer3": 96, "layer4": 1280}
BACKBONE_SIZES = {"layer2": 64, "layer3": 32, "layer4": 16}  # at a 512 input

# The shipped proxy (top-level ``assets/`` of the repository) and its sha256: the loader of the
# default asset refuses any other bytes.
DEFAULT_PROXY_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "sam_proxy_mobilenet_v2.pt"
SHIPPED_PROXY_SHA256 = "d06cf7a62c366033dbd83e26651b0c73d7f6e40912aa88b47c36374873024c36"

DEFAULT_NECK_CONFIG: dict[str, Any] = {
    "grid": 32, "blocks": 2, "expansion": 2, "kernel": 7, "layer2": True, "position": "fourier",
}
# highest frequency (cycles per image) of the fixed position features the neck adds (``position="fourier"``)
POSITION_MAX_FREQUENCY = 4


def sha256_of_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, sorted by name: the file's content
    check (a flipped byte in any tensor changes it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The neck
# --------------------------------------------------------------------------------------------------
class _ConvNextBlock(nn.Module):
    """Depthwise k x k conv -> LayerNorm2d -> 1x1 (dim -> expansion * dim) -> GELU -> 1x1 back, residual."""

    def __init__(self, dim: int, expansion: int, kernel: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, expansion * dim, 1)
        self.pwconv2 = nn.Conv2d(expansion * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x)))))


def fourier_position_features(grid: int, max_frequency: int = POSITION_MAX_FREQUENCY) -> torch.Tensor:
    """Fixed 2-D Fourier position features at the cell centres of a ``grid`` x ``grid`` map: sin and
    cos of ``2 pi (fx x + fy y)`` for every integer frequency pair with ``|fx|, |fy| <= max_frequency``
    in one half-plane (cycles per image; ``x, y`` in [0, 1]). Plane waves of all directions (not
    only x and y) so that a linear read-out can express 2-D regions such as a box
    -> ``2 * n_pairs x grid x grid`` (80 channels for ``max_frequency=4``)."""
    pairs = [(fx, fy) for fx in range(-max_frequency, max_frequency + 1) for fy in range(0, max_frequency + 1)
             if fy > 0 or fx > 0]
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    freq = torch.tensor(pairs, dtype=torch.float64)
    angles = 2 * math.pi * (freq[:, 0, None, None] * x + freq[:, 1, None, None] * y)
    return torch.cat([angles.sin(), angles.cos()]).float()


class ProxyNeck(nn.Module):
    """MobileNetV2 layer2/3/4 -> SAM's 256 x G x G image embedding.

    layer4 (1280 ch, 16 x 16) and layer3 (96 ch, 32 x 32) are projected by 1x1 convs and resized
    (bilinear) to G; layer2 (32 ch, 64 x 64, stride 8) is folded into channels by a pixel unshuffle
    (no information lost: it keeps the stride-8 detail the decoder's 4x upscaling needs for
    boundaries) and projected. Fixed sin/cos position features (projected by a learned 1x1 conv) are
    added, as SAM's ViT adds absolute position embeddings: the decoder's masks are dot products of
    a per-prompt vector with these features, so position in the embedding lets a prompt select a
    region directly. The sum goes through LayerNorm2d, ``blocks`` ConvNeXt-style blocks and
    a final 1x1 conv + LayerNorm2d (SAM's image encoder neck also ends in LayerNorm2d).
    """

    def __init__(
        self, grid: int = 32, blocks: int = 2, expansion: int = 2, kernel: int = 7, layer2: bool = True,
        position: str = "fourier",
    ) -> None:
        super().__init__()
        if grid not in (16, 32, 64):
            raise ModelError(f"proxy SAM grid must be 16, 32 or 64, got {grid}")
        if position not in ("fourier", "none"):
            raise ModelError(f"proxy SAM neck position must be 'fourier' or 'none', got {position!r}")
        self.position = position
        if position == "fourier":
            self.register_buffer("position_features", fourier_position_features(grid), persistent=False)
            self.proj_pos = nn.Conv2d(self.position_features.shape[0], EMBED_DIM, 1)
        self.grid = grid
        self.use_layer2 = bool(layer2)
        self.proj4 = nn.Conv2d(BACKBONE_CHANNELS["layer4"], EMBED_DIM, 1)
        self.proj3 = nn.Conv2d(BACKBONE_CHANNELS["layer3"], EMBED_DIM, 1)
        if self.use_layer2:
            self.unshuffle = max(1, BACKBONE_SIZES["layer2"] // grid)
            self.proj2 = nn.Conv2d(BACKBONE_CHANNELS["layer2"] * self.unshuffle**2, EMBED_DIM, 1)
        self.norm_in = LayerNorm2d(EMBED_DIM)
        self.blocks = nn.Sequential(*[_ConvNextBlock(EMBED_DIM, expansion, kernel) for _ in range(blocks)])
        self.proj_out = nn.Conv2d(EMBED_DIM, EMBED_DIM, 1)
        self.norm_out = LayerNorm2d(EMBED_DIM)

    def _at_grid(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.grid and x.shape[-2] == self.grid:
            return x
        return F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self._at_grid(self.proj4(features["layer4"])) + self._at_grid(self.proj3(features["layer3"]))
        if self.use_layer2:
            layer2 = features["layer2"]
            if self.unshuffle > 1:
                layer2 = F.pixel_unshuffle(layer2, self.unshuffle)
            x = x + self._at_grid(self.proj2(layer2))
        if self.position == "fourier":
            x = x + self.proj_pos(self.position_features.to(x.dtype))[None]
        x = self.blocks(self.norm_in(x))
        return self.norm_out(self.proj_out(x))


def build_neck(config: Mapping[str, Any] | None = None) -> ProxyNeck:
    cfg = {**DEFAULT_NECK_CONFIG, **dict(config or {})}
    unknown = sorted(set(cfg) - set(DEFAULT_NECK_CONFIG))
    if unknown:
        raise ModelError(f"unknown proxy-SAM neck options {unknown}; known: {sorted(DEFAULT_NECK_CONFIG)}")
    return ProxyNeck(**cfg)


# --------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------
class SamProxyEncoder(nn.Module):
    """Frozen proxy SAM image encoder: 512 squash batch -> ``{"image_embedding": B x 256 x G x G}``.

    Follows the frozen-encoder contract (``refseg_models/encoders/base.py``): ``encoder_id``,
    ``preprocessing_id`` (the MobileNetV2's ``vrp512_squash_tf128``: same 512 squash as VRP-SAM's
    SAM frame, TF scaling), ``input_size`` 512, ``preprocess``, ``forward``, ``output_shapes``.
    ``embed(features)`` runs only the neck on cached MobileNetV2 features.
    """

    encoder_id = "sam_proxy_mobilenet_v2"

    def __init__(self, backbone: MobileNetV2Backbone, neck: ProxyNeck, metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.metadata = dict(metadata or {})
        self.input_size = backbone.input_size
        self.preprocessing_id = backbone.preprocessing_id
        self.grid = neck.grid
        freeze(self)

    def train(self, mode: bool = True) -> "SamProxyEncoder":
        return super().train(False)  # frozen by contract

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> 3 x 512 x 512 float32 (PIL-bilinear squash, ``(x - 128) / 128``)."""
        return self.backbone.preprocess(image)

    def embed(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MobileNetV2 ``{"layer2", "layer3", "layer4"}`` -> B x 256 x G x G (the neck alone)."""
        return self.neck(features)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.input_size, self.input_size):
            raise ModelError(
                f"{self.encoder_id} expects B x 3 x {self.input_size} x {self.input_size}, got {tuple(batch.shape)}"
            )
        return {"image_embedding": self.neck(self.backbone(batch))}

    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"image_embedding": (EMBED_DIM, self.grid, self.grid)}


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def read_proxy_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a proxy SAM file, with its format and tensor checksum verified.

    Raises:
        WeightsNotFoundError: no such file.
        CheckpointError: unreadable, not a proxy SAM file, another format version, or tensors that do
            not match the checksum recorded in the file (a corrupted or edited file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"proxy SAM checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated files, pickles that are not weights
        raise CheckpointError(f"cannot read proxy SAM checkpoint {path} with torch.load(weights_only=True): {error}") from error
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != PROXY_FORMAT:
        raise CheckpointError(
            f"{path} is not a proxy SAM checkpoint (no {METADATA_KEY!r} metadata with format {PROXY_FORMAT!r}); "
            "a real SAM checkpoint goes to build_encoder('sam_vit_b' / 'sam_vit_l' / 'sam_vit_h', path)"
        )
    if meta.get("version") != PROXY_FORMAT_VERSION:
        raise CheckpointError(f"{path}: proxy SAM format version {meta.get('version')!r}, this code reads {PROXY_FORMAT_VERSION}")
    state = {k: v for k, v in obj.items() if k != METADATA_KEY}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: proxy SAM checkpoint holds non-tensor entries besides {METADATA_KEY!r}")
    actual = tensors_sha256(state)
    if actual != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"{path}: tensor checksum {actual[:16]}... does not match the one recorded in the file "
            f"({str(meta.get('tensors_sha256'))[:16]}...): the file is corrupted or was edited"
        )
    return state, meta


def verify_shipped_checkpoint(path: str | Path, expected_sha256: str | None = None) -> Path:
    """``path`` if its sha256 is the shipped proxy's (``SHIPPED_PROXY_SHA256``), else ModelError."""
    path = Path(path)
    expected = expected_sha256 or SHIPPED_PROXY_SHA256
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the shipped proxy SAM checkpoint is missing: {path} (it is part of the repository's assets/)"
        )
    actual = sha256_of_file(path)
    if actual != expected:
        raise ModelError(
            f"{path} is not the shipped proxy SAM checkpoint: sha256 {actual}, expected {expected} "
            "(replaced or modified file; restore it from the repository)"
        )
    return path


def default_proxy_sam_checkpoint() -> Path:
    """The shipped proxy SAM file (``assets/sam_proxy_mobilenet_v2.pt``), sha256-verified.

    The CPU default wherever a SAM checkpoint is needed and none is given; pass a real SAM checkpoint
    instead to use SAM."""
    return verify_shipped_checkpoint(DEFAULT_PROXY_CHECKPOINT)


def proxy_sam_grid(checkpoint: str | Path) -> int:
    """The embedding grid G of a proxy SAM file (what ``build_sam_decoder(image_embedding_size=)`` and
    the methods' ``feature_size`` need)."""
    return int(read_proxy_checkpoint(checkpoint)[1]["grid"])


def is_proxy_sam_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds proxy SAM metadata (cheap format check, no checksum)."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(obj, dict) and isinstance(obj.get(METADATA_KEY), dict) and obj[METADATA_KEY].get("format") == PROXY_FORMAT


def _is_default_asset(path: Path) -> bool:
    try:
        return path.resolve() == DEFAULT_PROXY_CHECKPOINT.resolve()
    except OSError:
        return False


def build_sam_proxy_encoder(
    checkpoint: str | Path | None,
    backbone_checkpoint: str | Path | None = None,
    neck: Mapping[str, Any] | None = None,
) -> SamProxyEncoder:
    """The proxy SAM image encoder (frozen) from a proxy file and the MobileNetV2 weights it was
    trained on.

    Args:
        checkpoint: proxy SAM file (``default_proxy_sam_checkpoint()`` for the shipped one; that path
            is sha256-verified). ``None``: random neck (``build_encoder(..., allow_random_init=True)``;
            shapes and speed only), with a random backbone unless ``backbone_checkpoint`` is given.
        backbone_checkpoint: the real MobileNetV2 weights (``../shared/weights/mobilenet_v2_imagenet.pth``);
            required with a checkpoint, and its sha256 must be the one the proxy was trained on.
        neck: neck options for a random-init encoder (a file's own configuration always wins).

    Raises:
        ModelError: no ``backbone_checkpoint``, or one whose sha256 differs from the recorded one
            (the message names both hashes); the default asset with other bytes than shipped.
        CheckpointError: not a proxy SAM file, corrupted tensors, keys that do not fit the neck.
    """
    if checkpoint is None:
        backbone = build_mobilenet_v2_backbone(backbone_checkpoint)
        return SamProxyEncoder(backbone, freeze(build_neck(neck)), {"random_init": True})
    path = Path(checkpoint)
    if _is_default_asset(path):
        verify_shipped_checkpoint(path)
    state, meta = read_proxy_checkpoint(path)
    if backbone_checkpoint is None:
        raise ModelError(
            f"proxy SAM {path} needs backbone_checkpoint=<the MobileNetV2 weights it was trained on, "
            f"sha256 {meta.get('backbone_sha256')}> (e.g. ../shared/weights/mobilenet_v2_imagenet.pth; on the "
            "CLI: --encoder-options '{\"backbone_checkpoint\": \"...\"}')"
        )
    if not Path(backbone_checkpoint).is_file():
        raise WeightsNotFoundError(f"MobileNetV2 weights for the proxy SAM not found: {backbone_checkpoint}")
    backbone_sha = sha256_of_file(backbone_checkpoint)
    if backbone_sha != meta.get("backbone_sha256"):
        raise ModelError(
            f"backbone {backbone_checkpoint} (sha256 {backbone_sha}) is not the MobileNetV2 the proxy SAM {path} "
            f"was trained on (sha256 {meta.get('backbone_sha256')})"
        )
    neck_module = build_neck(meta.get("neck"))
    neck_state = {k[len(NECK_PREFIX):]: v.float() for k, v in state.items() if k.startswith(NECK_PREFIX)}
    load_state_dict_strict(neck_module, neck_state, source=f"{path} (proxy SAM neck)")
    stray = sorted(k for k in state if not k.startswith((NECK_PREFIX,) + DECODER_PREFIXES))
    if stray:
        raise CheckpointError(f"{path}: unexpected keys {stray[:12]}")
    backbone = build_mobilenet_v2_backbone(backbone_checkpoint)
    encoder = SamProxyEncoder(backbone, neck_module, meta)
    if encoder.grid != int(meta.get("grid", -1)):
        raise CheckpointError(f"{path}: metadata grid {meta.get('grid')} != neck grid {encoder.grid}")
    return encoder


def proxy_checkpoint_state(
    neck: nn.Module, decoder: nn.Module, metadata: Mapping[str, Any], dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """The object a proxy SAM file holds: neck under ``image_encoder.neck.*``, the decoder's
    ``prompt_encoder.*`` / ``mask_decoder.*`` (``decoder`` is a ``SamDecoder``), tensors cast to
    ``dtype``, and the metadata completed with format, version and the tensor checksum."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in neck.state_dict().items():
        state[NECK_PREFIX + name] = tensor.detach().to(dtype).clone()
    for name, tensor in decoder.state_dict().items():
        if not name.startswith(DECODER_PREFIXES):
            raise ModelError(f"decoder state key {name!r} is not under {DECODER_PREFIXES}")
        state[name] = tensor.detach().to(dtype).clone()
    meta = {**dict(metadata), "format": PROXY_FORMAT, "version": PROXY_FORMAT_VERSION, "tensors_sha256": tensors_sha256(state)}
    return {**state, METADATA_KEY: meta}
