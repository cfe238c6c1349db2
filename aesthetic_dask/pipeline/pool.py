"""The decode pool: a persistent set of host processes per worker process, fed jobs, giving crops back.

- **Processes** start from a forkserver (never a fork of a process that may hold CUDA) with
  torch, torchvision, Pillow and open_clip imported ahead, so a replacement starts in well under a
  second. Each gets SIGKILL when its parent dies (Linux), and exits when its pipe closes: pool
  processes never outlive their worker.
- **Shared memory.** Each process has a buffer of ``slots`` chunks of uint8 crops, an anonymous
  memfd (not ``/dev/shm``, so Docker's 64 MB default does not limit it) whose pages are reserved
  up front: no space is one clear error at pool start, never a SIGBUS mid-run.
- **Faults lose nothing.** A process that dies (a codec segfault, an OOM kill) is replaced; the
  samples it held get a reason, and its job goes on in the replacement from the next sample.
- One receiver thread multiplexes every process's pipe and exit sentinel; jobs wait in one FIFO
  for a free process.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import mmap
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .host import DecodeSettings, Job, serve

log = logging.getLogger("aesthetic_dask")

# What the forkserver imports once, so each host process starts with them loaded.
PRELOAD = ["torch", "torchvision", "PIL.Image", "open_clip", "aesthetic_dask.pipeline.host"]
SLOTS = 3  # per process: one being filled, one being read by the model's side, one spare
MAX_DEATHS_PER_JOB = 3  # then the partition fails with the reason instead of looping on a poison input


class PoolError(RuntimeError):
    """The pool cannot start here; the message is one line naming the fix."""


@dataclass
class Chunk:
    """Up to ``chunk`` consecutive samples of a job, decoded."""

    metas: list[Any] | None  # shard samples without bytes, else None
    reasons: list[str | None]  # per sample: None where a crop was made
    thumbnails: dict[int, bytes]  # by position in the chunk
    crops: np.ndarray | None  # (samples without a reason, 3, H, W) uint8, in shared memory until released
    _release: Any = None

    def release(self) -> None:
        """Give the crops' slot back to its process (call once they are copied out)."""
        if self._release is not None:
            self._release()
            self._release = None


@dataclass
class Done:
    failure: str | None
    kind: str | None = None  # None, "unread" (rows unknown) or "crash" (see host)


class JobHandle:
    """A submitted job: iterate it for its :class:`Chunk`s in order; then ``failure`` says whether
    its source was read whole."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.failure: str | None = None
        self.failure_kind: str | None = None

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            event = self.events.get()
            if isinstance(event, Done):
                self.failure, self.failure_kind = event.failure, event.kind
                return
            yield event


@dataclass
class _JobState:
    job: Job
    handle: JobHandle
    delivered: int = 0  # samples handed back (skipped by a replacement)
    held: Any = None  # the chunk being decoded: metas or a count
    thumbnails_made: int = 0
    deaths: int = 0


@dataclass
class _Seat:
    """One place in the pool: the process there now, its pipes, its shared buffer."""

    index: int
    process: Any = None
    to_child: Any = None
    from_child: Any = None
    generation: int = 0
    array: np.ndarray | None = None
    ready: bool = False
    state: _JobState | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: Any) -> None:
        with self.lock:
            try:
                self.to_child.send(message)
            except (OSError, ValueError):
                pass  # the process is gone: its sentinel tells the receiver


def shared_buffer(nbytes: int) -> int:
    """An fd of ``nbytes`` of shared memory with its pages reserved, or one clear :class:`PoolError`."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aesthetic-dask-decode", os.MFD_CLOEXEC)
        where = "shared memory (memfd)"
    else:  # no memfd: a file in /dev/shm, unlinked at once (nothing is left behind by a crash)
        import tempfile

        fd, path = tempfile.mkstemp(prefix="aesthetic-dask-", dir="/dev/shm")
        os.unlink(path)
        where = "/dev/shm"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        raise PoolError(
            f"the decode pool needs {nbytes / 2**20:.0f} MiB of {where} per process and cannot have it "
            f"({exc.strerror}); give the container more memory or shared memory (docker run --shm-size=1g), "
            "or lower decode_processes / model_inference_batch_size"
        ) from None
    return fd


class HostPool:
    """``processes`` host processes, each with ``SLOTS`` chunks of ``chunk`` crops of ``shape``."""

    def __init__(self, processes: int, chunk: int, shape: tuple[int, int, int]) -> None:
        if multiprocessing.current_process().daemon:
            raise PoolError(
                "this Dask worker runs as a daemonic process, which may not start the decode pool; "
                "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False (or config distributed.worker.daemon: false)"
            )
        self.processes, self.chunk, self.shape = processes, chunk, tuple(shape)
        self.slot_bytes = chunk * int(np.prod(shape))
        self.ctx = _context()
        self.seats = [_Seat(i) for i in range(processes)]
        self.pending: deque[_JobState] = deque()
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.closed = False
        self.deaths = 0  # processes replaced so far
        self.started_ok = False  # some process has ever said it is ready
        self.failed_starts = 0
        self.broken: str | None = None  # why processes cannot start here: every job fails with it
        self._wake_r, self._wake_w = self.ctx.Pipe(duplex=False)
        for seat in self.seats:
            self._start(seat)
        self.receiver = threading.Thread(target=self._receive, name="decode-pool", daemon=True)
        self.receiver.start()
        atexit.register(self.close)

    @property
    def pids(self) -> list[int]:
        return [seat.process.pid for seat in self.seats]

    def _start(self, seat: _Seat) -> None:
        from multiprocessing import reduction

        fd = shared_buffer(SLOTS * self.slot_bytes)
        mapping = mmap.mmap(fd, SLOTS * self.slot_bytes)
        parent_to, child_to = self.ctx.Pipe(duplex=True)  # a socket: the buffer's fd travels on it
        parent_from, child_from = self.ctx.Pipe(duplex=False)
        seat.generation += 1
        process = self.ctx.Process(target=serve, name=f"aesthetic-decode-{seat.index}", daemon=True,
                                   args=(child_to, child_from, seat.generation, SLOTS, self.chunk, self.shape))
        process.start()
        child_to.close()
        child_from.close()
        reduction.send_handle(parent_to, fd, process.pid)
        os.close(fd)
        seat.process, seat.to_child, seat.from_child, seat.ready = process, parent_to, parent_from, False
        seat.array = np.frombuffer(mapping, dtype=np.uint8).reshape(SLOTS, self.chunk, *self.shape)

    def submit(self, source: Any, decode: DecodeSettings) -> JobHandle:
        """Queue a job (:class:`host.ShardJob`, :class:`host.ParquetJob` or :class:`host.BytesJob`)."""
        if self.broken:
            raise PoolError(self.broken)
        if self.closed:
            raise PoolError("the decode pool is closed")
        state = _JobState(Job(next(self.ids), source, decode), JobHandle())
        with self.lock:
            self.pending.append(state)
            self._dispatch()
        return state.handle

    def _dispatch(self) -> None:
        """Give waiting jobs to idle, ready processes (under ``self.lock``)."""
        for seat in self.seats:
            if not self.pending:
                return
            if seat.ready and seat.state is None:
                seat.state = state = self.pending.popleft()
                job = state.job
                seat.send(("job", Job(job.id, job.source, job.decode, state.delivered, state.thumbnails_made)))

    def _receive(self) -> None:
        from multiprocessing.connection import wait

        while not self.closed:
            by_conn = {seat.from_child: seat for seat in self.seats}
            by_sentinel = {seat.process.sentinel: seat for seat in self.seats}
            for ready in wait([self._wake_r, *by_conn, *by_sentinel]):
                if ready is self._wake_r:
                    continue
                seat = by_conn.get(ready)
                if seat is not None:
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        continue  # the sentinel follows
                    self._on_message(seat, message)
                elif not self.closed:
                    self._on_death(by_sentinel[ready])
                    break  # the wait list changed

    def _on_message(self, seat: _Seat, message: tuple) -> None:
        kind = message[0]
        with self.lock:
            state = seat.state
            if kind == "ready":
                seat.ready = self.started_ok = True
            elif kind == "hold":
                state.held = message[2]
            elif kind == "chunk":
                _, _, slot, reasons, thumbs = message
                n_ok = sum(r is None for r in reasons)
                crops = seat.array[slot, :n_ok] if slot is not None else None
                release = None
                if slot is not None:
                    generation = seat.generation
                    release = lambda: generation == seat.generation and seat.send(("release", generation, slot))  # noqa: E731
                metas = state.held if isinstance(state.held, list) else None
                state.held, state.delivered = None, state.delivered + len(reasons)
                state.thumbnails_made += len(thumbs)
                state.handle.events.put(Chunk(metas, reasons, thumbs, crops, release))
            elif kind == "done":
                state.handle.events.put(Done(message[2], message[3]))
                seat.state = None
            self._dispatch()

    def _on_death(self, seat: _Seat) -> None:
        """Replace a dead process; the samples it held get a reason and its job goes on from the next one."""
        while True:  # what it sent before dying comes first
            try:
                if not seat.from_child.poll():
                    break
                self._on_message(seat, seat.from_child.recv())
            except (EOFError, OSError):
                break
        code = seat.process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        reason = f"decode process died ({how}) while decoding this sample"
        if not seat.ready and not self.started_ok:
            self.failed_starts += 1
            if self.failed_starts >= 2 * self.processes:  # never once started: they never will here
                self._break(f"the decode pool's processes cannot start ({how}); a script that runs a job must guard "
                            "its entry point with `if __name__ == \"__main__\":` (they import the main module)")
                return
        self.deaths += 1
        log.warning("decode process %s died (%s); replacing it", seat.process.pid, how)
        with self.lock:
            state, seat.state = seat.state, None
            seat.to_child.close()
            seat.from_child.close()
            self._start(seat)
            if state is not None:
                held = state.held
                if held is not None:
                    n = len(held) if isinstance(held, list) else held
                    metas = held if isinstance(held, list) else None
                    state.handle.events.put(Chunk(metas, [reason] * n, {}, None))
                    state.held, state.delivered = None, state.delivered + n
                state.deaths += 1
                if state.deaths >= MAX_DEATHS_PER_JOB:
                    state.handle.events.put(Done(f"decode processes died {state.deaths} times on this input ({how})",
                                                 "unread"))
                else:
                    self.pending.appendleft(state)
            self._dispatch()

    def _break(self, reason: str) -> None:
        """Processes cannot start here: every waiting and running job fails with ``reason``."""
        log.error("%s", reason)
        self.broken = reason
        with self.lock:
            for state in [s.state for s in self.seats if s.state] + list(self.pending):
                state.handle.events.put(Done(reason, "crash"))
            self.pending.clear()
            for seat in self.seats:
                seat.state = None
        self.close()

    def close(self) -> None:
        """Stop every process (they also stop by themselves if this process dies)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._wake_w.send(None)
        except OSError:
            pass
        for seat in self.seats:
            seat.send(("stop",))
        for seat in self.seats:
            seat.process.join(timeout=5)
            if seat.process.is_alive():
                seat.process.kill()
                seat.process.join(timeout=5)
        with self.lock:
            for state in [s.state for s in self.seats if s.state] + list(self.pending):
                state.handle.events.put(Done("the decode pool was closed", "crash"))


def _context() -> Any:
    """forkserver (Linux) with the heavy imports preloaded; spawn elsewhere. Never fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


_POOL: HostPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(processes: int, chunk: int, shape: tuple[int, int, int]) -> HostPool:
    """This process's pool, started once (and again only for another size or crop shape)."""
    global _POOL
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool.closed or (pool.processes, pool.chunk, pool.shape) != (processes, chunk, tuple(shape)):
            if pool is not None:
                pool.close()
            pool = _POOL = HostPool(processes, chunk, shape)
        return pool
