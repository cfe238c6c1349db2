"""The one place that decides where a job runs: connect to a cluster or start a local one.

- ``scheduler`` / ``scheduler_file`` set: connect; the job neither starts nor stops that cluster.
- GPUs visible and dask-cuda installed: ``LocalCUDACluster``, one worker per GPU, each with a
  ``GPU`` resource of 1, so ``1 / num_gpus_per_worker`` partitions share a GPU.
- Otherwise a ``LocalCluster`` of threads in this process: numpy, pyarrow and torch release the
  GIL, and no data is copied between processes. For model work a single worker thread runs the
  model (torch already uses every core) while the partition's own threads decode images.
"""

from __future__ import annotations

import glob
import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from .config import Config

log = logging.getLogger("aesthetic_dask")

GPU_RESOURCE = "GPU"


def visible_gpu_count() -> int:
    """GPUs this process can see, without importing torch or CUDA libraries."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def _has_dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def pick_device() -> str:
    """``cuda`` when a GPU and the ``gpu`` extra are present, else ``cpu``."""
    return "cuda" if visible_gpu_count() > 0 and _has_dask_cuda() else "cpu"


def task_resources(config: Config, device: str) -> dict[str, float] | None:
    """Dask resources each partition task asks for."""
    return {GPU_RESOURCE: config.num_gpus_per_worker} if device == "cuda" else None


@contextmanager
def dask_client(config: Config, model_work: bool = False) -> Iterator[tuple[Any, str]]:
    """Yield ``(client, device)``; a local cluster started here is closed on exit."""
    from distributed import Client

    if config.scheduler or config.scheduler_file:
        client = Client(config.scheduler, scheduler_file=config.scheduler_file, timeout="30s")
        try:
            yield client, _cluster_device(client)
        finally:
            client.close()
        return

    device = pick_device()
    if device == "cuda":
        from dask_cuda import LocalCUDACluster

        threads = config.threads_per_worker or max(1, round(1 / config.num_gpus_per_worker))
        cluster = LocalCUDACluster(
            n_workers=config.n_workers,
            threads_per_worker=threads,
            resources={GPU_RESOURCE: 1},
            dashboard_address=None,
            silence_logs=logging.WARNING if not config.verbose else logging.INFO,
        )
    else:
        from distributed import LocalCluster

        threads = config.threads_per_worker or (1 if model_work else os.cpu_count() or 1)
        cluster = LocalCluster(
            n_workers=config.n_workers or 1,
            threads_per_worker=threads,
            processes=False,
            dashboard_address=None,
            silence_logs=logging.WARNING if not config.verbose else logging.INFO,
        )
    client = Client(cluster)
    try:
        yield client, device
    finally:
        client.close()
        cluster.close()


def _cluster_device(client: Any) -> str:
    """``cuda`` if the connected cluster's workers advertise the GPU resource."""
    workers = client.scheduler_info().get("workers", {})
    has_gpu = any(GPU_RESOURCE in w.get("resources", {}) for w in workers.values())
    return "cuda" if has_gpu else "cpu"


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
    """Threads torch uses for the model in a worker process.

    Dask's nanny sets OMP_NUM_THREADS=1 in the workers it starts, which would leave torch on one
    core; a worker running the model should use the cores it was given. AESTHETIC_DASK_TORCH_THREADS
    overrides (e.g. several model workers on one node).
    """
    forced = os.environ.get("AESTHETIC_DASK_TORCH_THREADS")
    if forced:
        return max(1, int(forced))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1
