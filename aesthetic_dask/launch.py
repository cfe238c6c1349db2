"""The one job skeleton: what every job kind does once it has planned its work, from the cluster
to the finished manifest. A job kind (:func:`score_job.score_job`, :func:`image_job.run_job`)
plans its inputs, loads its heads and declares the rest as a :class:`Planned`; :func:`run_planned`
starts or joins the cluster, makes the :class:`job.Job` (its fingerprint may depend on the device:
the precision ``auto`` resolves to), stamps the files' provenance, and runs the partitions
(:func:`job.run_parts`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .columns import unit
from .job import Work, run_parts, tasks_stopped_then_cleared
from .output import OutputLayout
from .preparation import Heads, new_job, stamp


@dataclass
class Planned:
    """A job kind's declaration: its work, what its manifest records of the inputs, and how its
    partitions run."""

    kind: str  # "score" or "run"
    work: list[Work]
    inputs: list[str]  # every input listed (the manifest's inputs_listed)
    failed: dict[str, str] = field(default_factory=dict)  # inputs that could not be planned, with why
    duplicates: list[str] = field(default_factory=list)  # inputs named twice (each read once)
    notes: list[str] = field(default_factory=list)  # said before the work
    footers: dict[str, Any] | None = None  # Parquet footers read (for the footer cache), and those cached
    cached_footers: dict[str, Any] | None = None
    model_work: bool = False  # CLIP on the workers: its plugin, its decode pools
    derived: Callable[[str], dict[str, Any]] = lambda device: {}  # fingerprinted, known once the device is
    info: dict[str, Any] | None = None  # more of the manifest (the CLIP's record)
    clip: dict[str, Any] | None = None  # the CLIP's record in each file's provenance
    versions: tuple[str, ...] = ()  # more packages whose versions the manifest records
    start_workers: Callable[[Any], Any] | None = None  # client -> start each worker's model, once OUT is the job's


def run_planned(planned: Planned, config: Any, layout: OutputLayout, heads: Heads, started: float, t0: float,
                overwrite: bool = False, prune_missing: bool = False, progress: bool = True) -> tuple[dict[str, Any], int]:
    """Run a planned job; return (manifest, exit code)."""
    from .cluster import ClusterOptions, dask_client, starved_workers, task_resources, worker_decode_pool

    plan_s = round(time.perf_counter() - t0, 3)
    cluster_opts = ClusterOptions.from_config(config)
    with tasks_stopped_then_cleared(layout), dask_client(cluster_opts, model_work=planned.model_work) as (client, device):
        job = new_job(planned.kind, config, layout, heads, planned.inputs, started, planned.failed, planned.duplicates,
                      planned.derived(device), planned.info, versions=planned.versions, notes=planned.notes)
        stamp(planned.work, job, heads, config.score_threshold, planned.clip)
        if planned.footers is not None:
            job.footers, job.footers_changed = planned.footers, planned.footers != planned.cached_footers
        local = client.cluster is not None
        workers = None
        if planned.model_work and not local:  # the user's cluster: every thread of a GPU worker runs a partition
            workers = client.scheduler_info().get("workers", {})
        resources = task_resources(cluster_opts, device, local, workers)
        if workers is not None:  # say where a worker's decode pool starves its GPU
            pools = client.run(worker_decode_pool, config.decode_processes)
            job.note = "\n".join(filter(None, [job.note, *starved_workers(workers, pools, resources)])) or None
        job.timings["plan_s"] = plan_s
        job.timings["cluster_s"] = round(time.perf_counter() - t0 - plan_s, 3)
        start = planned.start_workers
        return run_parts(job, client, planned.work, overwrite=overwrite, resources=resources, prune_missing=prune_missing,
                         start_workers=(lambda: start(client)) if start else None,
                         progress=progress and not config.verbose, unit=unit(planned.kind))
