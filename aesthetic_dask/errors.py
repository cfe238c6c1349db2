"""Errors that end a job, each mapped to a documented exit code."""

from __future__ import annotations

# Exit codes of the CLI (README, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class InputError(ValueError):
    """Bad usage or input: a missing path, a missing column, a wrong type. Exit code 2."""


class DataError(ValueError):
    """A file or shard cannot be read whole; the job records it and goes on (exit code 3)."""
