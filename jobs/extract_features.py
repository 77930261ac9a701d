"""Extract one feature store: ``python jobs/extract_features.py --output ... --encoder ...``.

Runs on an embedded local Ray by default and unchanged under
``ray job submit --working-dir . -- python jobs/extract_features.py ...`` (Ray then sets RAY_ADDRESS).
Re-running the same command resumes: finished shards (those with a ``_stats.json``) are skipped,
finished shards with failed images are retried (``--no-retry-failed`` keeps them).
Exit code: 0 all images extracted, 1 some images failed (listed; the store holds the rest), 2 error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Allow running from a checkout without `pip install -e .` (ray job submit uploads the working dir).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import run_cli  # noqa: E402
from pipeline.extraction.commands import add_extract_arguments, config_from_args, report_failures  # noqa: E402
from pipeline.extraction.run import run_extraction  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_extract_arguments(parser)
    args = parser.parse_args(argv)

    def extract() -> int:
        config = config_from_args(args)
        print(f"extraction config:\n{config.to_json()}", flush=True)
        return report_failures(run_extraction(config), "extract_features")

    return run_cli(extract, "extract_features")


if __name__ == "__main__":
    sys.exit(main())
