"""What every benchmark prints: one JSON object on stdout (and, with ``--json``, the same in a file)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    """The machine a number was measured on, in the words the docs use."""
    return f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def emit(result: dict, json_path: Path | None) -> int:
    """Print ``result`` as indented JSON, write it to ``json_path`` too when given; the exit code 0."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0
