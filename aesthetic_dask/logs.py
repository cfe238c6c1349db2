"""Where a run's log goes: ``OUT/job.log``, or a per-run file under the user's cache.

The log file is opened in OUT only once the job has taken OUT as its own (:func:`accept_out`), so
a run refused before (bad options, another job's OUT, a directory holding foreign files) leaves
OUT as it was; its records are then written to ``~/.cache/aesthetic-dask/logs/run-<time>-<pid>.log``
(one file per run, never shared).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LOGGER = "aesthetic_dask"
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


class JobLogHandler(logging.Handler):
    """Holds records in memory until OUT exists, then writes them (and all later ones) to OUT/job.log."""

    def __init__(self, out: Path | None, cache_dir: Path) -> None:
        super().__init__(logging.DEBUG)
        self.out, self.cache_dir = out, cache_dir
        self.file: logging.FileHandler | None = None
        self.pending: list[logging.LogRecord] = []
        self.accepted = False  # the job has taken OUT: its job.log may be written there

    @property
    def path(self) -> Path | None:
        return Path(self.file.baseFilename) if self.file else None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None and self.accepted and self.out is not None and self.out.is_dir():
            self._open(self.out / "job.log")
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def _open(self, path: Path) -> None:
        self.file = logging.FileHandler(path)
        self.file.setFormatter(_FORMAT)
        for record in self.pending:
            self.file.emit(record)
        self.pending.clear()

    def spill(self) -> Path | None:
        """The log's path, writing held records to a per-run file in the cache if OUT never appeared."""
        if self.file is None:
            try:
                logs = self.cache_dir / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                self._open(logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            except OSError:
                return None
        return self.path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def accept_out() -> None:
    """The job has taken OUT as its own: the held records (and all later ones) go to OUT/job.log."""
    for handler in logging.getLogger(LOGGER).handlers:
        if isinstance(handler, JobLogHandler):
            handler.accepted = True


def setup(verbose: bool, out: Path | None, cache_dir: Path) -> JobLogHandler:
    """Console lines (INFO with -v, else warnings) and the job log; returns the job log's handler."""
    root = logging.getLogger(LOGGER)
    for old in list(root.handlers):  # a previous main() in this process (tests, notebooks)
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False  # libraries that call logging.basicConfig must not echo our lines
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    handler = JobLogHandler(out, cache_dir)
    root.addHandler(handler)
    # distributed's own warnings and errors (a task's "Compute Failed" with its traceback, a
    # cancelled instruction at Ctrl-C) go to the job log, never to the console: the job says
    # what failed itself, once, in its own words (the cluster is started with silence_logs).
    # Likewise tornado's and asyncio's (a callback's traceback as the cluster shuts down at Ctrl-C):
    # with a handler of their own they never reach logging's last-resort stderr handler.
    for name in ("distributed", "tornado", "asyncio"):
        other = logging.getLogger(name)
        for old in [h for h in other.handlers if isinstance(h, _Forward)]:
            other.removeHandler(old)
        other.addHandler(_Forward(handler))
    return handler


class _Forward(logging.Handler):
    """Warnings and errors of another logger, into the job log."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(logging.WARNING)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)
