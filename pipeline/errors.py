"""Error types that name the offending file or item, so nothing fails deep in a stack."""

from __future__ import annotations


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
