"""The decode pool: a persistent set of host processes per worker process, fed jobs, giving crops back.

- **Processes** are forked by the pool's launcher (:mod:`.launcher`), a plain subprocess that
  imports torch, torchvision and Pillow once: they start in any process (a daemonic Dask worker,
  a notebook, ``python -c``, a script without a main guard), never from a fork of a process that
  may hold CUDA, and a replacement starts in milliseconds. They never outlive their worker: the
  launcher kills them when the worker's end of its socket closes (SIGKILL of the worker
  included), and each dies with the launcher.
- **Their environment is the decoder's**, not the worker's: Dask's nanny sets
  ``MALLOC_TRIM_THRESHOLD_=65536`` for its workers, which makes every decoded image's buffers
  page-fault again (~1.5x the decode time); the launcher starts without it.
- **Shared memory.** Each process has a buffer of ``slots`` slots of :data:`SLOT_BYTES`, an
  anonymous memfd (not ``/dev/shm``, so Docker's 64 MB default does not limit it) whose pages are
  reserved up front: no space is one clear error at pool start, never a SIGBUS mid-run.
- **One pool per worker process serves every config**: a job says its chunk size and crop shape;
  a larger size only adds processes. Nothing is closed by a config change.
- **Faults lose nothing.** A process that dies (a codec segfault, an OOM kill) is replaced; the
  samples it held get a reason, and its job goes on in the replacement from the next sample.
- One receiver thread multiplexes every process's pipe and the launcher's socket; jobs wait in
  one FIFO for a free process.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .handles import Chunk, Done, JobHandle
from .host import DecodeSettings, DecodeRequest, crops_view
from .launcher import decode_environment, describe_exit

log = logging.getLogger("aesthetic_dask")

SLOTS = 3  # per process: one being filled, one being read by the model's side, one spare
MAX_CHUNK = 64  # crops per chunk at most
SLOT_BYTES = MAX_CHUNK * 3 * 224 * 224  # 9.2 MiB: 64 crops of 224 px, 28 of 336 px
MAX_DEATHS_PER_JOB = 3  # then the partition fails with the reason instead of looping on a poison input


class PoolError(RuntimeError):
    """The pool cannot start here; the message is one line naming the fix."""


@dataclass
class _JobState:
    job: DecodeRequest
    handle: JobHandle
    delivered: int = 0  # samples handed back (skipped by a replacement)
    held: Any = None  # the chunk being decoded: metas or a count
    thumbnails_made: int = 0
    deaths: int = 0


@dataclass
class _Seat:
    """One place in the pool: the process there now, its pipes, its shared buffer."""

    index: int
    pid: int | None = None
    to_child: Any = None
    from_child: Any = None  # None once it reached its end (the process is gone; the launcher says how)
    generation: int = 0
    array: np.ndarray | None = None  # (SLOTS, SLOT_BYTES) uint8
    ready: bool = False
    state: _JobState | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: Any) -> None:
        with self.lock:
            try:
                self.to_child.send(message)
            except (OSError, ValueError, AttributeError):
                pass  # the process is gone: the launcher tells the receiver


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
    """``processes`` host processes, each with ``SLOTS`` slots of ``SLOT_BYTES``."""

    def __init__(self, processes: int) -> None:
        self.seats: list[_Seat] = []
        self.pending: deque[_JobState] = deque()
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.closed = False
        self.deaths = 0  # processes replaced so far
        self.started_ok = False  # some process has ever said it is ready
        self.failed_starts = 0
        self.launcher_starts = 0
        self.broken: str | None = None  # why processes cannot start here: every job fails with it
        self._wake_r, self._wake_w = os.pipe()
        self._start_launcher()
        self.grow(processes)
        self.receiver = threading.Thread(target=self._receive, name="decode-pool", daemon=True)
        self.receiver.start()
        atexit.register(self.close)

    @property
    def processes(self) -> int:
        return len(self.seats)

    @property
    def pids(self) -> list[int | None]:
        return [seat.pid for seat in self.seats]

    def wait_ready(self, timeout: float = 60) -> bool:
        """Wait until every process has said it is ready (tests, benchmarks)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.broken:
            if all(seat.ready for seat in self.seats):
                return True
            time.sleep(0.01)
        return False

    def grow(self, processes: int) -> None:
        """At least ``processes`` processes (a pool never shrinks: idle processes cost nothing)."""
        with self.lock:
            for _ in range(len(self.seats), processes):
                seat = _Seat(len(self.seats))
                self.seats.append(seat)  # before its start: the launcher's answer names its index
                self._start(seat)
        self._wake()

    def _start_launcher(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.launcher_starts += 1
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "aesthetic_dask.pipeline.launcher", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=decode_environment(), stdin=subprocess.DEVNULL)
        theirs.close()
        self.control = ours
        self.control_lock = threading.Lock()

    def _start(self, seat: _Seat) -> None:
        """Ask the launcher for a process at ``seat`` (its pid comes in ``started``, then ``ready``)."""
        import mmap
        from multiprocessing import Pipe

        fd = shared_buffer(SLOTS * SLOT_BYTES)
        mapping = mmap.mmap(fd, SLOTS * SLOT_BYTES)
        parent_to, child_to = Pipe(duplex=True)
        parent_from, child_from = Pipe(duplex=False)
        seat.generation += 1
        message = pickle.dumps(("start", seat.index, seat.generation, SLOTS, SLOT_BYTES))
        try:
            with self.control_lock:
                socket.send_fds(self.control, [message], [child_to.fileno(), child_from.fileno(), fd])
        except OSError:
            pass  # the launcher is gone: the receiver starts another and this seat again
        finally:
            child_to.close()
            child_from.close()
            os.close(fd)
        seat.pid, seat.to_child, seat.from_child, seat.ready = None, parent_to, parent_from, False
        seat.array = np.frombuffer(mapping, dtype=np.uint8).reshape(SLOTS, SLOT_BYTES)

    def submit(self, source: Any, decode: DecodeSettings, chunk: int) -> JobHandle:
        """Queue a job (a decode source: an input kind's, e.g. :class:`sources.shards.ShardImages`,
        or :class:`host.BytesImages`) handed back in chunks of up to ``chunk`` crops (fewer where
        its crops are larger than a slot holds)."""
        if self.broken:
            raise PoolError(self.broken)
        if self.closed:
            raise PoolError("the decode pool is closed")
        crop_bytes = int(np.prod(decode.spec.crop_shape))
        if crop_bytes > SLOT_BYTES:
            raise PoolError(f"a crop of {decode.spec.crop_shape} is larger than a decode slot ({SLOT_BYTES} bytes)")
        chunk = max(1, min(chunk, MAX_CHUNK, SLOT_BYTES // crop_bytes))
        state = _JobState(DecodeRequest(next(self.ids), source, decode, chunk), JobHandle())
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
                seat.send(("job", DecodeRequest(job.id, job.source, job.decode, job.chunk, state.delivered, state.thumbnails_made)))

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _receive(self) -> None:
        from multiprocessing.connection import wait

        while not self.closed:
            with self.lock:
                by_conn = {seat.from_child: seat for seat in self.seats if seat.from_child is not None}
            control = self.control
            for ready in wait([self._wake_r, control, *by_conn]):
                if ready == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif ready is control:
                    if not self._on_launcher(control):
                        break  # the wait list changed
                else:
                    seat = by_conn[ready]
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        seat.from_child = None  # the launcher says how it ended
                        ready.close()
                        break
                    self._on_message(seat, message)

    def _on_launcher(self, control: socket.socket) -> bool:
        """A message from the launcher; False when it is gone (and was replaced)."""
        try:
            data = control.recv(65536)
        except OSError:
            data = b""
        if self.closed:
            return False
        if not data:
            self._on_launcher_lost()
            return False
        message = pickle.loads(data)
        if message[0] == "ready":
            return True
        if message[0] == "started":
            _, index, generation, pid = message
            seat = self.seats[index]
            if seat.generation == generation:
                seat.pid = pid
            return True
        _, pid, code = message  # exit
        for seat in self.seats:
            if seat.pid == pid:
                self._on_death(seat, code)
                return False
        return True

    def _on_launcher_lost(self) -> None:
        """The launcher died (its processes die with it): start another and every process again."""
        code = self.launcher.wait()
        how = describe_exit(code)
        if not self.started_ok and self.launcher_starts >= 2:
            self._break(f"the decode pool's launcher ({sys.executable} -m aesthetic_dask.pipeline.launcher) "
                        f"exited ({how}) before starting a process; its error is in the worker's log")
            return
        log.warning("the decode pool's launcher exited (%s); starting it again", how)
        self._start_launcher()
        for seat in self.seats:
            self._on_death(seat, None, f"decode process lost with its launcher ({how}) while decoding this sample")

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
                crops = crops_view(seat.array, slot, n_ok, state.job.decode.spec.crop_shape) if slot is not None else None
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

    def _on_death(self, seat: _Seat, code: int | None, reason: str | None = None) -> None:
        """Replace a dead process; the samples it held get a reason and its job goes on from the next one."""
        while seat.from_child is not None:  # what it sent before dying comes first
            try:
                if not seat.from_child.poll():
                    break
                self._on_message(seat, seat.from_child.recv())
            except (EOFError, OSError):
                break
        how = describe_exit(code)
        reason = reason or f"decode process died ({how}) while decoding this sample"
        if not seat.ready and not self.started_ok and code is not None:
            self.failed_starts += 1
            if self.failed_starts >= 2 * len(self.seats):  # never once started: they never will here
                self._break(f"the decode pool's processes cannot start ({how}); their error is in the worker's log")
                return
        self.deaths += 1
        if code is not None:
            log.warning("decode process %s died (%s); replacing it", seat.pid, how)
        with self.lock:
            state, seat.state = seat.state, None
            for conn in (seat.to_child, seat.from_child):
                if conn is not None:
                    conn.close()
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
        self._wake()
        for seat in self.seats:
            seat.send(("stop",))
        self.control.close()  # the launcher kills what is left and exits
        try:
            self.launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.launcher.kill()
            self.launcher.wait(timeout=5)
        with self.lock:
            for state in [s.state for s in self.seats if s.state] + list(self.pending):
                state.handle.events.put(Done("the decode pool was closed", "crash"))


_POOL: HostPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(processes: int) -> HostPool:
    """This process's pool, started once; grown where ``processes`` asks for more."""
    global _POOL
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool.closed:
            pool = _POOL = HostPool(processes)
        elif pool.processes < processes:
            pool.grow(processes)
        return pool
