"""User-facing errors. The CLI prints these without a traceback; everything else is a bug."""

from __future__ import annotations


class FmtuneError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(FmtuneError):
    """A bad option, config file key or value."""


class DataError(FmtuneError):
    """A data file that cannot be used as given (names file, line/row, column and the fix)."""


class GateFailed(FmtuneError):
    """The run finished but failed a gate the user set (e.g. --max-forgetting): exit code 3."""


class ModelError(FmtuneError):
    """A base model that cannot be loaded safely (not found, pickle-only, remote code...)."""
