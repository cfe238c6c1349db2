"""The device a worker process's model runs on and what that process computes with, decided where
the model runs (never in the client): the device, the array module (cupy or numpy), torch's
threads, and the nanny's settings undone for the model's process."""

from __future__ import annotations

import functools
import os
from typing import Any

from ..hardware import cores


@functools.cache
def model_device() -> str:
    """``cuda`` where torch sees a CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_ARRAY_MODULE: Any = None


def array_module() -> Any:
    """The array module this process computes with: cupy when it has cupy and a CUDA device,
    else numpy. Decided where the work runs (a worker), by what that process really has, never
    from a resource name; both give the same result."""
    global _ARRAY_MODULE
    if _ARRAY_MODULE is None:
        cupy, devices = None, 0
        try:
            import cupy

            devices = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # noqa: BLE001 - no cupy, no driver, no device: numpy
            pass
        _ARRAY_MODULE = choose_array_module(cupy, devices)
    return _ARRAY_MODULE


def choose_array_module(cupy: Any, devices: int) -> Any:
    """cupy when it is installed and there is a CUDA device, else numpy."""
    import numpy

    return cupy if cupy is not None and devices > 0 else numpy


_TRIM_THRESHOLD = 128 * 1024 * 1024


def configure_model_process() -> None:
    """Undo, once per process, what Dask's nanny sets for its workers and slows the model down.

    The nanny starts workers with OMP_NUM_THREADS=1 (torch on one core) and
    MALLOC_TRIM_THRESHOLD_=65536 (glibc returns freed memory at once, so every large activation is
    page-faulted again: ~15% of ViT-L/14 speed on CPU). Called where the model loads, so it holds
    for local clusters and for `dask worker` processes alike.
    """
    import torch

    torch.set_num_threads(torch_threads())
    if os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-1, _TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc


def torch_threads() -> int:
    """Threads torch uses for its CPU operations in a worker process.

    Dask's nanny sets OMP_NUM_THREADS=1 in the workers it starts, which would leave torch on one
    core; a worker running the model should use the cores it was given. On GPU workers too: one
    thread there made the run slower on an H100 (264 against 364 images/s, see
    benchmarks/results/*-torch-threads-1.json): batches are stacked and converted on the host.
    AESTHETIC_DASK_TORCH_THREADS overrides (e.g. several model workers on one node).
    """
    forced = forced_torch_threads()
    return forced if forced is not None else max(1, cores())


def forced_torch_threads() -> int | None:
    """``AESTHETIC_DASK_TORCH_THREADS`` where set: the model's torch threads, fixed."""
    forced = os.environ.get("AESTHETIC_DASK_TORCH_THREADS")
    return max(1, int(forced)) if forced else None
