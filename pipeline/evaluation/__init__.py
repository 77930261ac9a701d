"""Evaluation: HSNet's few-shot metric and the evaluation resolution."""

from pipeline.evaluation.meter import FewShotMeter
from pipeline.evaluation.resolution import EvalResolution

__all__ = ["EvalResolution", "FewShotMeter"]
