"""A job or refilter stopped at one of its writes: every file OUT gets goes through
:func:`storage.atomic_open`, so the n-th write stands for any point of the work. Used by the tests
(a few seeds) and ``benchmarks/bench_faults.py`` (many)."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

from aesthetic_dask import storage


class Killed(BaseException):
    """The process stopped here (SIGKILL, a power cut): not an Exception, so nothing handles it."""


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@contextmanager
def stopped_at_write(index: int | None, after: bool, error: BaseException) -> Iterator[list[int]]:
    """Raise ``error`` at write number ``index`` (from 0), before the file is there or, with
    ``after``, once it is committed; None counts the writes only. Yields the count so far."""
    real, count = storage.atomic_open, [0]

    @contextmanager
    def atomic_open(fs, path, tmp_dir=None, durable=True):
        n = count[0]
        count[0] += 1
        if n == index and not after:
            raise error
        with real(fs, path, tmp_dir, durable) as f:
            yield f
        if n == index and after:
            raise error

    storage.atomic_open = atomic_open
    try:
        yield count
    finally:
        storage.atomic_open = real
