"""Ctrl-C and SIGTERM for the CLI: the first stops the job cleanly, a second stops it at once.

The first SIGINT or SIGTERM raises in the main thread (``KeyboardInterrupt``, or
:class:`Terminated`): the job unwinds, releases OUT and says one line. While the job writes its
final manifest and report (:func:`deferred`) the first signal waits until they are whole, so an
OUT never says "done" without its report. A second signal, while the first is being handled,
prints one line and exits 1 at once (never death by signal, exit 130).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import EXIT_FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill` ending the job), handled like Ctrl-C: one line, the log, exit 1."""


class _State:
    signals = 0
    deferring = 0
    pending: int | None = None
    teardown_registered = False


def _raise_for(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: Any) -> None:
    _State.signals += 1
    if _State.signals > 1:
        os.write(sys.stderr.fileno(), b"aesthetic-dask: error: interrupted again; stopped at once "
                                      b"(re-run the same command to resume)\n")
        os._exit(EXIT_FAILED)
    if _State.deferring:
        _State.pending = signum
        return
    _raise_for(signum)


def install() -> dict[int, Any] | None:
    """Take SIGINT and SIGTERM for this command (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _State.signals, _State.deferring, _State.pending = 0, 0, None
    return {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, Any] | None) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """A first signal that arrives inside waits until the block is done, then is raised."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        _raise_for(signum)


def exit_on_signal(code: int) -> None:
    """The command is over and the process is exiting with ``code``: a signal now (a Ctrl-C pressed
    twice) ends it with that code at once, never by the signal."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: os._exit(code))


def quiet_teardown() -> None:
    """Ignore signals once the process is tearing down: Python's own teardown, after the atexit
    callbacks, puts the default handlers back, so a Ctrl-C pressed twice would then kill the
    process by the signal (exit 130) after its code was decided. Registered once, as early as
    possible (``python -m aesthetic_dask`` does before its imports), so it runs last."""
    if not _State.teardown_registered:
        _State.teardown_registered = True
        atexit.register(_ignore_signals)


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
