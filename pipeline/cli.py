"""The ``refseg`` console script: one subcommand per user-facing task.

Subcommand groups live next to the code they drive and expose ``register(subparsers)``; this file
only lists them, so ``refseg --help`` shows everything that exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.errors import run_cli

COMMAND_MODULES = (
    "pipeline.commands",
    "pipeline.extraction.commands",
    "pipeline.inference.commands",
    "pipeline.proxy_sam.commands",
    "pipeline.training.compare",
    "pipeline.benchmark.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refseg", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args.handler(args), f"refseg {args.command}")


if __name__ == "__main__":
    sys.exit(main())
