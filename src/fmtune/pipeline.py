"""Temporary: the entry points' old import path while they move to fmtune.runner.pipeline (removed in this change)."""

from fmtune.runner.console import GateFailed  # noqa: F401
from fmtune.runner.pipeline import run  # noqa: F401
from fmtune.runner.console import console  # noqa: F401
