"""``refseg benchmark``: one command for a whole results table (docs/benchmark.md).

A table file (``benchmarks/*.yaml``, :mod:`pipeline.benchmark.spec`) declares methods x folds x
shots x seeds x reference types and the tracks (unseen classes, COCO -> PASCAL, FSS-1000, reference
robustness); :mod:`~pipeline.benchmark.cells` expands it into cells that run through the training
and evaluation jobs' APIs; :mod:`~pipeline.benchmark.runner` plans, runs and resumes them with MLflow
as the record; :mod:`~pipeline.benchmark.table` writes the table beside the papers' numbers
(:mod:`~pipeline.benchmark.published`) with each cell's cost.
"""
