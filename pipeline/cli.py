"""The ``refseg`` console script: one subcommand per user-facing task.

Subcommand groups live next to the code they drive and expose ``register(subparsers)``; this file
only lists them, so ``refseg --help`` shows everything that exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import run_cli

COMMAND_MODULES = (
    "pipeline.commands",
    "pipeline.extraction.commands",
    "pipeline.inference.commands",
    "pipeline.proxy_sam.commands",
    "pipeline.training.compare",
    "pipeline.benchmark.commands",
)


Register = Callable[[argparse._SubParsersAction], None]


def build_parser(prog: str = "refseg", registers: Sequence[Register] | None = None) -> argparse.ArgumentParser:
    """``prog`` with the subcommands ``registers`` add (default: every group of :data:`COMMAND_MODULES`)."""
    if registers is None:
        registers = [importlib.import_module(name).register for name in COMMAND_MODULES]
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in registers:
        register(subparsers)
    return parser


def run_subcommand(argv: Sequence[str] | None = None, prog: str = "refseg", registers: Sequence[Register] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's handler, user errors as one line (:func:`run_cli`):
    the ``refseg`` console script, and a group's stand-alone entry (``python -m pipeline.X.commands``)."""
    args = build_parser(prog, registers).parse_args(argv)
    return run_cli(lambda: args.handler(args), f"{prog} {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_subcommand(argv)


if __name__ == "__main__":
    sys.exit(main())
