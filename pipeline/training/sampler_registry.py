"""The training samplers by name, what each can feed, whose recipe it trains with and what it
prepares on the driver: data only.

The configuration (:class:`~pipeline.training.config.TrainConfig`) checks its sampler and picks its
recipe from these tables without importing a sampler (this module imports the registry helper and
the error type only, so nothing here can close an import circle). The samplers themselves live in
:mod:`pipeline.training.samplers` (the protocol and ``episodes``) and
:mod:`pipeline.training.segic_mixed`.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import ConfigError
from refseg_models.registry import Registry

SAMPLERS = Registry("training sampler", {
    "episodes": "pipeline.training.samplers:EpisodeSampler",
    "segic_mixed": "pipeline.training.segic_mixed:SegICMixedSampler",
}, error=ConfigError)

# The methods a sampler can feed; a sampler not listed feeds every method.
_FEEDS_ONLY: dict[str, tuple[str, ...]] = {"segic_mixed": ("segic",)}
# The recipe's dataset key (refseg_models.recipes.recipe_for) of a sampler's data; not listed: the fold's dataset.
_RECIPE_DATASET: dict[str, str] = {"segic_mixed": "mixed"}
# What a sampler prepares on the driver besides the fold (its stores, its data in the fold's prepared
# artifact): ``prepare(cfg, data, writer, extract_missing, workers)``; not listed: nothing.
PREPARATIONS = Registry("sampler preparation", {
    "segic_mixed": "pipeline.training.segic_mixed.preparation:prepare_mix",
}, error=ConfigError)


def check_sampler(name: str, method: str) -> None:
    """Refuse an unknown sampler, or one that cannot feed ``method``."""
    SAMPLERS.check(name)
    feeds = _FEEDS_ONLY.get(name)
    if feeds is not None and method not in feeds:
        raise ConfigError(f"the {name!r} sampler feeds {', '.join(feeds)} only, not {method}")


def recipe_dataset(sampler: str, dataset: str) -> str:
    """The dataset key of the recipe a run with ``sampler`` on ``dataset`` trains with."""
    return _RECIPE_DATASET.get(sampler, dataset)


def sampler_preparation(sampler: str) -> Callable[..., None] | None:
    """The driver-side preparation of ``sampler`` (kept out of the sampler's class, which the workers
    import without any raw-dataset module), or None."""
    return PREPARATIONS.get(sampler) if sampler in PREPARATIONS else None
