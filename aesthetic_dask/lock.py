"""One job per OUT: ``OUT/_lock.json``, a lease the running job holds and renews.

- **Taking it.** Locally, an exclusive create (``O_CREAT | O_EXCL``): of two jobs started at once,
  exactly one gets it (a lease being written is waited for, never taken over). On an object store, the lease is written and read back after a short
  settle: the job whose run id is there holds it (last writer wins; the other sees it and stops).
- **Held.** A heartbeat thread rewrites the lease every :data:`HEARTBEAT_S` seconds; the job
  removes it when it ends, however it ends.
- **Stale-lock rule.** A lease is stale, and is taken over (the summary says so), when its job's
  process is gone (same host: its pid no longer runs, e.g. after SIGKILL) or its heartbeat is
  older than :data:`STALE_S` seconds (any host). Otherwise a second job stops in seconds, with
  one line naming the running one. A lease file that cannot be read (empty, cut short, not JSON:
  e.g. a disk that filled as a job started) and is older than :data:`DAMAGED_S` is no lease at
  all: it is taken over too (a lease being written is complete in microseconds).
- **Fenced commits.** A job paused past the stale bound (SIGSTOP, a suspended VM, a long GC
  pause) may have lost OUT to another job by the time it resumes. So every commit checks the
  lease first: each file a task writes (a partition's data files and its record) checks it
  right before its rename or upload commits (:func:`holding`, which the worker runs each task
  under, and ``refilter`` its whole run), and a job's client checks it before the manifest and
  the index (:func:`check_held`). A job that finds its lease gone writes nothing more and stops with one
  line (:class:`LeaseLost`). What is left: the microseconds between a check and its rename (a
  filesystem offers no conditional rename; an object store no conditional put here).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import storage
from .errors import AestheticDaskError, InputError

LOCK_NAME = "_lock.json"
HEARTBEAT_S = 10.0
STALE_S = 90.0
SETTLE_S = 0.5  # object stores: how long a written lease settles before it is read back
DAMAGED_S = 2.0  # an unreadable lease file older than this is damaged, not being written


# What a task on a worker commits under (set by :func:`holding` around each task): the run whose
# lease fences its writes, and the job's fingerprint, which its record carries (a manifest lost or
# torn is rebuilt from records of this job alone).
_RUN: ContextVar[tuple[str, str | None] | None] = ContextVar("aesthetic_dask_commit", default=None)


class LeaseLost(AestheticDaskError):
    """This job's lease on OUT was taken over (it was paused past the stale bound): it stops
    without writing anything more. Exit code 1."""


@contextmanager
def holding(run_id: str | None, job_fingerprint: str | None = None, out: str | None = None,
            storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Run a task's commits under ``run_id``'s lease on ``out`` for the job ``job_fingerprint``
    (:func:`committing_as`): every file the task commits checks the lease right before its
    rename or upload commits (:func:`storage.commits_fenced_by`), so a task that was mid-write
    when the lease was lost commits nothing more, not even the file it was writing."""
    token = _RUN.set((run_id, job_fingerprint) if run_id else None)
    fence = None
    if run_id and out:
        fs, root = storage.split(out, storage_options)
        fence = lambda: _check_lease(fs, storage.join(root, LOCK_NAME), out, run_id)  # noqa: E731
    try:
        with storage.commits_fenced_by(fence):
            yield
    finally:
        _RUN.reset(token)


def committing_as() -> tuple[str | None, str | None]:
    """(run id, job fingerprint) of the task this thread runs; (None, None) outside a job's task."""
    return _RUN.get() or (None, None)


def check_held(layout: Any, run_id: str | None = None) -> None:
    """Raise :class:`LeaseLost` unless ``layout``'s OUT is still leased to ``run_id`` (default: the
    run of the task this thread runs, if any; outside a job's task, e.g. the notebook API's own
    writes, there is no lease to check)."""
    run_id = run_id or committing_as()[0]
    if run_id is not None:
        _check_lease(layout.fs, layout.path(LOCK_NAME), layout.root_url, run_id)


def _check_lease(fs: Any, lease_path: str, root_url: str, run_id: str) -> None:
    try:
        lease = json.loads(fs.cat_file(lease_path))
    except FileNotFoundError:
        lease = None
    except ValueError:  # being rewritten by its holder this instant: read once more
        time.sleep(0.05)
        return _check_lease(fs, lease_path, root_url, run_id)
    if not isinstance(lease, dict) or lease.get("run_id") != run_id:
        holder = f"run {lease.get('run_id')} (pid {lease.get('pid')} on {lease.get('host')})" if isinstance(lease, dict) \
            else "nobody (its lease file is gone)"
        raise LeaseLost(f"{root_url}: this job (run {run_id}) lost its lease on OUT to {holder}, most likely "
                        f"while it was paused for over {STALE_S:.0f}s; it stopped without writing anything more: "
                        "the other job's output stands (re-run this command once it is done)")


@dataclass
class OutLock:
    """The lease of one job (``run_id``) on ``layout``'s OUT."""

    layout: Any  # output.OutputLayout
    run_id: str
    took_over: dict[str, Any] | None = None  # the stale lease this job replaced, if any
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.layout.path(LOCK_NAME)

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def acquire(self) -> None:
        """Take OUT for this job, or one clear :class:`InputError` naming the job that has it."""
        layout = self.layout
        if layout.local:
            return self._acquire_local()
        current = self.read()
        if current is not None and not stale(current):
            raise InputError(_busy(layout.root_url, current))
        self.took_over = current
        self._write()
        if not layout.local:
            time.sleep(SETTLE_S)
        held = self.read()
        if held is None or held.get("run_id") != self.run_id:
            raise InputError(_busy(layout.root_url, held or {}))
        self._start()

    def _acquire_local(self) -> None:
        """The exclusive create decides; a stale lease is removed and the create raced for again,
        then read back (two jobs taking over one stale lease at once: only one keeps it)."""
        os.makedirs(self.layout.root, exist_ok=True)
        for _ in range(100):
            if self._create_exclusive():
                if self.took_over is not None:
                    time.sleep(SETTLE_S)
                    held = self.read()
                    if (held or {}).get("run_id") != self.run_id:
                        raise InputError(_busy(self.layout.root_url, held or {}))
                return self._start()
            current = self.read()
            if current is None:
                if not self._damaged():  # its holder is writing it this instant
                    time.sleep(0.05)
                    continue
                current = {"run_id": "unknown (its lease file was unreadable)", "heartbeat": None}
            if not stale(current):
                raise InputError(_busy(self.layout.root_url, current))
            self.took_over = current
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise InputError(_busy(self.layout.root_url, self.read() or {}))

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record(), f)
        return True

    def _damaged(self) -> bool:
        """The lease file exists, cannot be read, and is older than :data:`DAMAGED_S`."""
        try:
            return time.time() - os.path.getmtime(self.path) > DAMAGED_S and self.read() is None
        except FileNotFoundError:
            return False

    def read(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self.layout.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def _write(self) -> None:
        storage.write_bytes(self.layout.fs, self.path, json.dumps(self.record()).encode(), self.layout.tmp)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="aesthetic-dask-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (self.read() or {}).get("run_id") == self.run_id:
                    self._write()
            except OSError:
                pass  # a store that does not answer now: the next beat tries again

    def release(self) -> None:
        """Give OUT back (only the lease this job holds is removed)."""
        self._stop.set()
        try:
            if (self.read() or {}).get("run_id") == self.run_id:
                self.layout.remove([self.path])
        except OSError:
            pass


def stale(lease: dict[str, Any]) -> bool:
    """The stale-lock rule: its process is gone (same host), or its heartbeat is too old (or
    absent: a damaged lease)."""
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - float(lease.get("heartbeat") or 0) > STALE_S


def _busy(root: str, lease: dict[str, Any]) -> str:
    age = time.time() - float(lease.get("heartbeat") or 0)
    return (f"{root} is in use by another job (run {lease.get('run_id')}, pid {lease.get('pid')} on "
            f"{lease.get('host')}, alive {age:.0f}s ago); one job writes an OUT at a time: wait for it, or choose "
            f"another output directory (a lease without a heartbeat for {STALE_S:.0f}s is taken over)")
