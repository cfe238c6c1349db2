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
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .errors import InputError

LOCK_NAME = "_lock.json"
HEARTBEAT_S = 10.0
STALE_S = 90.0
SETTLE_S = 0.5  # object stores: how long a written lease settles before it is read back
DAMAGED_S = 2.0  # an unreadable lease file older than this is damaged, not being written


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
