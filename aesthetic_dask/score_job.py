"""The ``score`` job: precomputed embeddings -> aesthetic scores -> kept/rejected/errors Parquet.

Each partition (a row range of an embeddings file) is one Dask task of the one partition pipeline
(:func:`partition.process`): read and score (:class:`rows.EmbeddingRows`), then the Parquet sink.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Config
from .parquet_plan import plan_embeddings
from .job import Work, run_parts, tasks_stopped_then_cleared
from .preparation import Heads, new_job, stamp, with_identities
from .output import OutputLayout
from .parquet_sink import ParquetSink
from .partition import process
from .records import read_footers
from .rows import EmbeddingRows
from .score import check_extra_score_names


def score_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True,
              started: float | None = None, prune_missing: bool = False) -> tuple[dict[str, Any], int]:
    """Run the score job; return (manifest, exit code)."""
    from .cluster import ClusterOptions, dask_client, task_resources

    started, t0 = started or time.time(), time.perf_counter()
    layout = OutputLayout(out, config.storage_options)
    cached = read_footers(layout)  # a re-run reads the footers of new and changed inputs only
    plan = plan_embeddings(inputs, config.embedding_column, config.partition_rows, exclude=(layout.url(),),
                           storage_options=config.storage_options, footer_cache=cached)
    heads = Heads.load(config)
    parts = with_identities(plan.parts, config.storage_options)
    check_extra_score_names(heads.extras, plan.schema.names)
    opts = heads.write_options(config, config.embedding_column)
    sources = sorted({p.source for p in plan.parts} | set(plan.failed))
    job = new_job("score", config, layout, heads, sources, started, plan.failed, plan.duplicates, notes=plan.notes)
    job.footers, job.footers_changed = plan.footers, plan.footers != cached
    job.timings["plan_s"] = round(time.perf_counter() - t0, 3)
    cluster_opts = ClusterOptions.from_config(config)
    with tasks_stopped_then_cleared(layout), dask_client(cluster_opts) as (client, device):
        job.timings["cluster_s"] = round(time.perf_counter() - t0 - job.timings["plan_s"], 3)
        rows = EmbeddingRows(plan.schema, config.embedding_column, heads.predictor, heads.extras,
                             config.model_inference_batch_size, config.storage_options)
        work = [Work(parts, process, dict(rows=rows, out=layout.url(), opts=opts, sinks=(ParquetSink(),),
                                          storage_options=config.storage_options))]
        stamp(work, job, heads, config.score_threshold)
        return run_parts(job, client, work, overwrite=overwrite,
                         prune_missing=prune_missing,
                         resources=task_resources(cluster_opts, device, client.cluster is not None),
                         progress=progress and not config.verbose)
