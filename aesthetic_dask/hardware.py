"""What the machine a process runs on has: GPUs (as dask-cuda counts them) and cores, and the
decode pool's size from them. Asked by the client (to choose the cluster) and by each worker (to
size its pool), so it belongs to neither."""

from __future__ import annotations

import os


def visible_gpu_count() -> int:
    """GPUs this process can see, counted as dask-cuda counts them (NVML, honouring
    CUDA_VISIBLE_DEVICES: MIG ids, ``NoDevFiles``, containers without /dev/nvidia*)."""
    try:
        from dask_cuda.utils import get_n_gpus

        return int(get_n_gpus())
    except Exception:  # noqa: BLE001 - no dask-cuda, no NVML, no driver: no GPU for a CUDA cluster
        return 0


def has_dask_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("dask_cuda") is not None


def pick_device() -> str:
    """``cuda`` when a GPU and the ``gpu`` extra are present, else ``cpu``."""
    return "cuda" if visible_gpu_count() > 0 and has_dask_cuda() else "cpu"


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as dask-cuda pins it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_processes(configured: int | None, device: str) -> int:
    """Host processes of one model worker's decode pool: ``decode_processes`` when set; else, on a
    GPU worker, the cores per GPU (dask-cuda pins each worker to its GPU's cores) less one for the
    model's own process; on a CPU worker all its cores (the pool and the model share them, and the
    decoders wait when the model is the bound)."""
    if configured:
        return configured
    if device != "cuda":
        return max(1, cores())
    per_gpu = min(cores(), (os.cpu_count() or 1) // max(1, visible_gpu_count()))
    return max(1, per_gpu - 1)
