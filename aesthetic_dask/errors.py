"""The one error taxonomy of aesthetic-dask, and the one mapping from a job's outcome to its exit code.

Every error the project raises on purpose is an :class:`AestheticDaskError` carrying its exit code;
``cli.main`` maps them once. A job that ran decides its status and exit code in
:func:`job_outcome`, from the whole OUT (finished partitions, failed ones, unreadable inputs).
"""

from __future__ import annotations

# Exit codes of the CLI (docs/production.md, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class AestheticDaskError(Exception):
    """Base of the project's errors; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class InputError(AestheticDaskError, ValueError):
    """Bad usage or input: a missing path, a missing column, a wrong type. Exit code 2."""

    exit_code = EXIT_USAGE


class MissingColumnError(InputError):
    """An input lacks a column the job needs."""

    def __init__(self, where: str, column: str, columns: list[str], hint: str = "") -> None:
        self.where, self.column, self.columns = where, column, list(columns)
        super().__init__(f"{where}: no column {column!r} (columns: {', '.join(map(str, columns))}){hint}")


class ConfigError(InputError):
    """A configuration file or override is invalid. Exit code 2."""


class WeightsError(AestheticDaskError, RuntimeError):
    """Weights cannot be found, downloaded, verified or loaded. Exit code 2."""

    exit_code = EXIT_USAGE


class DataError(AestheticDaskError, ValueError):
    """A file, shard or row range cannot be read whole. The job records it and goes on (exit code 3)."""

    exit_code = EXIT_PARTIAL


# How a partition failed: bad data (it would fail the same way again) or an exception (maybe transient).
FAILURE_DATA = "data"
FAILURE_ERROR = "error"


def job_outcome(planned: int, done: int, failure_kinds: list[str], failed_inputs: int) -> tuple[str, int]:
    """(status, exit code) of a job from the state of the whole OUT.

    - ``done`` / 0: every planned partition finished and every input was readable;
    - ``failed`` / 1: nothing finished and every partition failed with an exception (not bad data);
    - ``partial`` / 3: anything else, i.e. some inputs or partitions could not be read whole.
    """
    if not failure_kinds and not failed_inputs and done == planned:
        return "done", EXIT_OK
    if done == 0 and not failed_inputs and failure_kinds and all(k == FAILURE_ERROR for k in failure_kinds):
        return "failed", EXIT_FAILED
    return "partial", EXIT_PARTIAL
