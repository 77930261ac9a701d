"""Training-side data path: manifest rows -> features (store or live) -> EpisodeFeatures batches."""

from pipeline.training.episode_features import EpisodeBatch, EpisodeFeatureBuilder

__all__ = ["EpisodeBatch", "EpisodeFeatureBuilder"]
