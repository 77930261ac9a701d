"""What every benchmark prints: one JSON object on stdout (and, with ``--json``, the same in a file),
and what every stored measurement names: its command, commit, versions and machine."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The machine a number was measured on, in the words the docs use."""
    return f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def provenance() -> dict:
    """The command (as run), the commit (and whether the tree had uncommitted changes), Python and
    torch versions and the machine, for a measurement stored in docs/measurements/."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "commit": _git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": machine(),
    }


def emit(result: dict, json_path: Path | None) -> int:
    """Print ``result`` as indented JSON, write it to ``json_path`` too when given; the exit code 0."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0
