"""The one place that decides where a job runs: connect to a cluster or start a local one.

- ``scheduler`` / ``scheduler_file`` set: connect; the job neither starts nor stops that cluster.
- GPUs visible and dask-cuda installed: ``LocalCUDACluster``, one worker per GPU, each with a
  ``GPU`` resource of 1, so ``1 / num_gpus_per_worker`` partitions share a GPU.
- Otherwise a ``LocalCluster`` of threads in this process: numpy, pyarrow and torch release the
  GIL, and no data is copied between processes. For model work a single worker thread runs the
  model (torch already uses every core) while the partition's own threads decode images.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

from .config import Config
from .errors import InputError
from .hardware import cores, decode_processes, pick_device, visible_gpu_count

log = logging.getLogger("aesthetic_dask")

GPU_RESOURCE = "GPU"


@dataclass(frozen=True)
class ClusterOptions:
    """What this module needs of a job's options (the client builds it from the Config)."""

    scheduler: str | None = None
    scheduler_file: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    dashboard: str = "auto"
    num_gpus_per_worker: float = 0.25
    decode_processes: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> ClusterOptions:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def partitions_per_worker(config: ClusterOptions, device: str) -> int:
    """Partition tasks one model worker runs at once: one per host process of its pool and one
    more, so every process has a shard to read, and the next shard is waiting in the pool's queue
    while a finished partition writes its output (a partition's thread mostly waits on the pool
    and the model)."""
    return config.threads_per_worker or decode_processes(config.decode_processes, device) + 1


def task_resources(config: ClusterOptions, device: str, local: bool, workers: dict[str, Any] | None = None
                   ) -> dict[str, float] | None:
    """Dask resources each partition task asks for.

    On a connected cluster with GPUs, a share of a ``GPU`` resource, so partitions go to GPU
    workers only: ``num_gpus_per_worker`` at most (NeMo's GPU share per task), lowered so that
    every thread of every GPU worker (``workers``: ``scheduler_info()["workers"]``) can run a
    partition. The partitions of a worker share its one model; what bounds a GPU's feed is the
    worker's decode pool, which decodes only the partitions in flight. The job's own local GPU
    cluster has nothing else to route to, and its threads bound the partitions per GPU.
    """
    if device != "cuda" or local:
        return None
    fills = [w["resources"][GPU_RESOURCE] / max(1, w.get("nthreads", 1)) for w in (workers or {}).values()
             if w.get("resources", {}).get(GPU_RESOURCE)]
    # A hair under 1/n: n float shares must add up to no more than the worker's resource.
    share = min([config.num_gpus_per_worker, *(f * (1 - 1e-9) for f in fills)])
    return {GPU_RESOURCE: share}


def starved_workers(workers: dict[str, Any], pools: dict[str, int], resources: dict[str, float] | None) -> list[str]:
    """One line per connected model worker that runs fewer partitions at once than its decode
    pool has processes (those processes would idle), naming the fix."""
    lines = []
    for address, info in workers.items():
        pool = pools.get(address)
        if not pool:
            continue
        at_once = info.get("nthreads", 1)
        need = (resources or {}).get(GPU_RESOURCE)
        if need:
            have = info.get("resources", {}).get(GPU_RESOURCE, 0)
            at_once = min(at_once, int(have / need + 1e-6))
        if at_once < pool:
            command = "dask cuda worker" if resources else "dask worker"
            lines.append(f"warning: worker {address} runs {at_once} partition(s) at once but its decode pool has {pool} "
                         f"processes, so {pool - at_once} of them idle: start it with `{command} --nthreads {pool + 1}` "
                         "(or set decode_processes)")
    return lines


def worker_decode_pool(configured: int | None) -> int:
    """Run on a worker (``client.run``): the size of the decode pool it starts, without starting it."""
    return decode_processes(configured, "cuda" if visible_gpu_count() > 0 else "cpu")


# How long to wait for a scheduler to answer, and for a connected cluster to have a worker.
CONNECT_TIMEOUT_S = 10
WORKERS_TIMEOUT_S = 60


def cluster_address(config: ClusterOptions) -> tuple[str | None, str | None]:
    """(scheduler address, scheduler file) to connect to, or (None, None) to start a local cluster.

    The job's own options win; otherwise Dask's configuration: ``scheduler-address`` (set by
    ``DASK_SCHEDULER_ADDRESS``) and ``scheduler-file`` (``DASK_SCHEDULER_FILE``).
    """
    import dask

    if config.scheduler or config.scheduler_file:
        return config.scheduler, config.scheduler_file
    return dask.config.get("scheduler-address", None), dask.config.get("scheduler-file", None)


def connect(address: str | None, scheduler_file: str | None) -> Any:
    """A client of an existing cluster with at least one worker; one clear :class:`InputError` if not."""
    from distributed import Client

    where = f"--scheduler {address}" if address else f"--scheduler-file {scheduler_file}"
    if scheduler_file and not os.path.isfile(scheduler_file):
        raise InputError(f"{where}: no such file (start the cluster first, or check the path)")
    if address:
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port

        try:
            scheme, loc = parse_address(address)
            if scheme in ("tcp", "tls", "ws", "wss"):
                parse_host_port(loc)
        except ValueError as exc:
            raise InputError(f"{where}: not a scheduler address ({exc}); e.g. tcp://host:8786") from None
    try:
        client = Client(address, scheduler_file=scheduler_file, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError, ValueError) as exc:
        log.debug("cannot connect", exc_info=True)
        raise InputError(f"{where}: no scheduler answered within {CONNECT_TIMEOUT_S}s ({type(exc).__name__})") from None
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise InputError(f"{where}: the cluster has no workers after {WORKERS_TIMEOUT_S}s ({type(exc).__name__})") from None
    return client


def wants_dashboard(config: ClusterOptions) -> bool:
    """Whether a local cluster starts its dashboard: ``auto`` means when the job runs in a terminal."""
    import sys

    return config.dashboard == "true" or (config.dashboard == "auto" and sys.stderr.isatty())


@contextmanager
def dask_client(config: ClusterOptions, model_work: bool = False) -> Iterator[tuple[Any, str]]:
    """Yield ``(client, device)``; a local cluster started here is closed on exit."""
    from distributed import Client

    address, scheduler_file = cluster_address(config)
    if address or scheduler_file:
        client = connect(address, scheduler_file)
        try:
            yield client, _cluster_device(client)
        finally:
            client.close()
        return

    device = pick_device()
    # A dashboard on a free local port (never "port 8787 is in use"); distributed's own lines stay
    # out of the job's output, -v or not (they go to the job log: logs.setup): the job says what
    # it does and what failed itself.
    # Without a dashboard the scheduler still serves health and metrics over HTTP: on a free port
    # too, and no dashboard link is reported for it.
    dashboard = wants_dashboard(config)
    common = dict(dashboard_address=":0" if dashboard else None, silence_logs=logging.CRITICAL,
                  scheduler_kwargs=None if dashboard else {"dashboard_address": ":0"})
    if device == "cuda":
        from dask_cuda import LocalCUDACluster

        threads = partitions_per_worker(config, device)
        cluster = LocalCUDACluster(n_workers=config.n_workers, threads_per_worker=threads, resources={GPU_RESOURCE: 1}, **common)
    else:
        from distributed import LocalCluster

        threads = partitions_per_worker(config, device) if model_work else config.threads_per_worker or cores()
        cluster = LocalCluster(n_workers=config.n_workers or 1, threads_per_worker=threads, processes=False, **common)
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
