"""Counted, reported skips: bad items are never dropped silently."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TextIO

MAX_EXAMPLES = 5


@dataclass
class SkipReport:
    """Counts skipped items per reason and keeps a few examples of each."""

    context: str
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, item: object) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(str(item))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self) -> str:
        if not self:
            return f"{self.context}: nothing skipped"
        lines = [f"{self.context}: skipped {self.total} item(s)"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {count:6d} x {reason} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)

    def print(self, stream: TextIO | None = None) -> None:
        if self:
            print(self.summary(), file=stream if stream is not None else sys.stderr)

    def add(self, other: dict) -> None:
        """Add the counts (and examples, up to ``MAX_EXAMPLES`` per reason) of another report's
        :meth:`as_dict` (e.g. a Ray worker's)."""
        for reason, count in other["counts"].items():
            self.counts[reason] += count
            room = MAX_EXAMPLES - len(self.examples[reason])
            if room > 0:
                self.examples[reason].extend(other["examples"].get(reason, [])[:room])

    def as_dict(self) -> dict[str, object]:
        return {
            "context": self.context,
            "total": self.total,
            "counts": dict(self.counts),
            "examples": {reason: list(items) for reason, items in self.examples.items()},
        }
