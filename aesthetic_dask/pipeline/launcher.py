"""The decode pool's launcher: one plain child process per pool that imports the decoders once and
forks each decode process on request.

Why not :mod:`multiprocessing`: it forbids a daemonic process to have children, and a Dask
worker is one with Dask's defaults (``distributed.worker.daemon: true``: ``dask worker``, a
default ``LocalCluster``, managed deployments); and its spawn and forkserver methods re-import the
user's main module in every child (a notebook, ``python -``, ``python -c`` or a script without a
main guard then fails). This process is started with :mod:`subprocess` as
``python -m aesthetic_dask.pipeline.launcher FD``: it depends on neither rule, and imports only
this package. Like a forkserver it never touches CUDA or threads, so forking it is safe, and a
replacement decode process starts in milliseconds with torch, torchvision and Pillow imported.

Protocol on the ``SOCK_SEQPACKET`` socket ``FD`` (one pickled message per packet):

- pool -> launcher: ``("start", seat, generation, slots, slot_bytes)`` carrying three fds (the
  decode process's command socket, its result pipe, its shared buffer);
- launcher -> pool: ``("ready", pid)`` once its imports are done, ``("started", seat,
  generation, pid)`` after each fork, ``("exit", pid, code)`` when a decode process ends
  (``code`` as :attr:`subprocess.Popen.returncode`: negative for a signal).

Lifetime: the pool's end of the socket closes when the pool's process dies, however it dies
(SIGKILL included); the launcher then kills its decode processes and exits. Each decode process
also gets SIGKILL if the launcher dies (``PR_SET_PDEATHSIG``; the launcher has one thread).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import traceback

# Set by Dask's nanny for its workers; wrong for decoding: every decoded image's buffers would
# page-fault again (see pool.py). The launcher and its decode processes start without it.
WORKER_ONLY_ENV = ("MALLOC_TRIM_THRESHOLD_",)
# What the launcher imports once, so each decode process starts with them loaded.
# The input kinds declare the decode sources a process unpickles (sources.shards.ShardImages, ...).
PRELOAD = ("torch", "torchvision", "PIL.Image", "open_clip", "aesthetic_dask.pipeline.host",
           "aesthetic_dask.sources.registry")
MAX_FDS = 3


def decode_environment() -> dict[str, str]:
    """The launcher's environment: the worker's, less what is set for the worker alone, with the
    worker's import path (so the package imports as it does in the worker)."""
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ONLY_ENV}
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def describe_exit(code: int | None) -> str:
    """How a decode process ended, from its ``("exit", pid, code)`` message (None: the launcher itself did)."""
    if code is None:
        return "its launcher exited"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def main(fd: int) -> None:
    control = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a decode process imports what it needs itself and says what failed
            pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through wake_w
    children: set[int] = set()
    launcher = os.getpid()
    _send(control, ("ready", launcher))
    while True:
        readable, _, _ = select.select([control, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(control, children)
        if control in readable:
            try:
                data, fds, _, _ = socket.recv_fds(control, 65536, MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:  # the pool's process is gone (or closed the pool)
                break
            message = pickle.loads(data)
            if message[0] == "start":
                pid = _fork(message[2:], fds, (control.fileno(), wake_r, wake_w), launcher)
                children.add(pid)
                _send(control, ("started", message[1], message[2], pid))
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def _fork(args: tuple, fds: list[int], close: tuple[int, ...], launcher: int) -> int:
    """Fork a decode process serving the pool over ``fds``; the launcher keeps none of them."""
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            os.close(fd)
        from .host import serve

        if not _die_with(launcher):
            os._exit(0)
        serve(*fds, *args)
    except BaseException:  # noqa: BLE001 - said on the worker's stderr; the pool sees the exit code
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _die_with(parent: int) -> bool:
    """Linux: SIGKILL when ``parent`` dies. False if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


def _reap(control: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(control, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _send(control: socket.socket, message: tuple) -> None:
    try:
        control.send(pickle.dumps(message))
    except OSError:  # the pool is gone: the next read says so
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
