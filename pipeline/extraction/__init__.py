"""Ray Data feature extraction into :mod:`pipeline.store` stores (see ``docs/feature_store.md``)."""

from pipeline.extraction.config import ExtractionConfig
from pipeline.extraction.encoder_source import FactoryEncoder, RegistryEncoder
from pipeline.extraction.stage import ExtractionSummary, extract_store

__all__ = [
    "ExtractionConfig",
    "ExtractionSummary",
    "FactoryEncoder",
    "RegistryEncoder",
    "extract_store",
    "run_extraction",
]


def run_extraction(config: ExtractionConfig) -> ExtractionSummary:
    from pipeline.extraction.run import run_extraction as run

    return run(config)
