"""Checks before an extraction starts: room for its actors and decode tasks, what a decode task holds.

A pipeline the cluster can never schedule would hang silently, so these refuse such settings with one
line naming the options to change, before any image is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError

# A decode worker holds torch (~650 MiB RSS measured) besides its chunk's pixels.
DECODE_WORKER_BASE_BYTES = 768 * 1024**2


def state_bytes(module: Any) -> int:
    state = module.state_dict() if hasattr(module, "state_dict") else {}
    return sum(t.numel() * t.element_size() for t in state.values())


def weightless(encoder: Any) -> tuple[Any | None, tuple[int, ...]]:
    """(the encoder moved to the meta device if its ``preprocess`` is then unchanged, else None;
    the preprocessed shape). Moves ``encoder`` itself: call it after the real one is serialised."""
    import torch

    probe = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)  # odd, non-square
    expected = encoder.preprocess(probe)
    if not isinstance(encoder, torch.nn.Module):
        return None, tuple(expected.shape)
    light = encoder.to("meta")
    try:
        again = light.preprocess(probe)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return None, tuple(expected.shape)
    if again.device.type != "cpu" or again.dtype != expected.dtype or not torch.equal(again, expected):
        return None, tuple(expected.shape)
    return light, tuple(expected.shape)


def decode_memory(batch_size: int, pixel_shape: tuple[int, ...], encoder_bytes: int, resources: dict) -> int:
    """Bytes a decode task reserves: torch, the encoder's weights when it has no weightless copy
    (``encoder_bytes``) and ~3 copies of a chunk's float32 pixels; refused when the cluster has less."""
    needed = DECODE_WORKER_BASE_BYTES + encoder_bytes + 3 * batch_size * 4 * int(np.prod(pixel_shape))
    if resources.get("memory", float("inf")) < needed:
        raise ConfigError(
            f"a decode task reserves {needed / 2**30:.1f} GiB (torch + {batch_size} images of pixels), "
            f"the cluster offers {resources['memory'] / 2**30:.1f} GiB: it could never be scheduled; "
            "lower --batch-size or give Ray more memory"
        )
    return needed


def check_room(resources: dict, num_actors: int, actor_cpus: float, decode_cpus: float, gpus: float) -> None:
    """Refuse settings under which the pipeline could never make progress (it would hang silently).

    Ray Data starts the encoder actor pool first; if the actors hold every CPU, no decode task can
    ever be scheduled and nothing moves. Both writers need room for one decode task beside the
    actors (``writer="actors"``: each actor waits on its own decode tasks)."""
    cpus, gpus_available = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    actors_cpus = num_actors * actor_cpus
    if actors_cpus + decode_cpus > cpus:
        raise ConfigError(
            f"{num_actors} encoder actor(s) x {actor_cpus:g} CPU (--num-actors x --actor-num-cpus) = {actors_cpus:g} "
            f"of the cluster's {cpus:g} CPUs leave {max(cpus - actors_cpus, 0):g} for decode tasks, each needs "
            f"{decode_cpus:g} (--decode-num-cpus): no image could ever be decoded and the extraction would hang. "
            "Lower --actor-num-cpus / --num-actors or --decode-num-cpus."
        )
    if num_actors * gpus > gpus_available:
        raise ConfigError(
            f"{num_actors} encoder actor(s) x {gpus:g} GPU need {num_actors * gpus:g} GPUs, the cluster has "
            f"{gpus_available:g}: the actors could never start. Lower --num-actors or --num-gpus-per-actor."
        )
