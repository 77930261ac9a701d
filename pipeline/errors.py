"""Error types that name the offending file or item, so nothing fails deep in a stack.

One error type per layer: readers and jobs raise :class:`RefsegError` subclasses (``DataError``,
``ConfigError``); the pure-PyTorch models raise :class:`refseg_models.errors.ModelError`. Both are
translated into one clear line, once, by :func:`run_cli` (the ``refseg`` console script and every
``jobs/*.py`` entry point go through it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from refseg_models.errors import ModelError


class RefsegError(Exception):
    """Base class for refseg's user-facing errors."""


class DataError(RefsegError):
    """A dataset file or item is missing, corrupt or inconsistent.

    ``reason`` is a short category ("image file not found", ...) used to count skips in reports;
    the message names the file or item.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class ConfigError(RefsegError):
    """A configuration value is out of range or inconsistent."""


# What a user can cause and must see as one line (never a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (RefsegError, ModelError)


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    """Run ``main`` and turn any user error into ``"<prog>: error: <message>"`` on stderr, exit 2
    (Ctrl-C: exit 130; a closed stdout pipe: exit 141, silently).

    Anything else is a bug in refseg and keeps its traceback.
    """
    try:
        code = int(main() or 0)
        sys.stdout.flush()  # a closed stdout pipe shows here, where it is handled, not at interpreter exit
        return code
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`refseg verify ... | head -2`): stop quietly, as a program
        # killed by SIGPIPE would (128 + 13). stdout goes to /dev/null first, or the interpreter's
        # final flush of it raises again (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
