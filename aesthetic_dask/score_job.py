"""The ``score`` job: precomputed embeddings -> aesthetic scores -> kept/rejected/errors Parquet.

read (:mod:`embeddings_reader`) -> score (:func:`score.score_table`) -> write (:mod:`output`), one
Dask task per partition (:func:`partition.process_parquet_part`), run by :func:`job.run_parts`.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import Config
from .parquet_plan import EmbeddingPart, plan_embeddings
from .job import Work, run_parts, tasks_stopped_then_cleared
from .preparation import Heads, new_job, stamp, with_identities
from .output import OutputLayout, WriteOptions
from .partition import Record, process_parquet_part
from .records import read_footers
from .models.heads import AestheticPredictor
from .score import check_extra_score_names, score_table


def score_embedding_table(table: pa.Table, predictor: AestheticPredictor, column: str,
                          extras: dict[str, AestheticPredictor] | None = None,
                          batch_size: int | None = None) -> tuple[pa.Table, None]:
    """A read partition with ``aesthetic_score``, extra heads and ``error`` (no thumbnails:
    embeddings have no images). The table stays in Arrow; on a GPU worker only the matrix goes
    to the device (:func:`score.score_arrow`), ``batch_size`` embeddings per head call."""
    return score_table(table, predictor, column, extras, batch_size), None


def process_embedding_part(
    part: EmbeddingPart, schema: pa.Schema, column: str, predictor: AestheticPredictor, out: str,
    opts: WriteOptions, extras: dict[str, AestheticPredictor] | None = None,
    storage_options: dict[str, Any] | None = None, batch_size: int | None = None,
) -> Record:
    """Read, score and write one partition; return its record."""
    scorer = partial(score_embedding_table, predictor=predictor, column=column, extras=extras, batch_size=batch_size)
    return process_parquet_part(part, schema, column, out, opts, scorer, storage_options)


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
        kwargs = dict(schema=plan.schema, column=config.embedding_column, predictor=heads.predictor, out=layout.url(),
                      storage_options=config.storage_options, opts=opts, extras=heads.extras,
                      batch_size=config.model_inference_batch_size)
        work = [Work(parts, process_embedding_part, kwargs)]
        stamp(work, job, heads, config.score_threshold)
        return run_parts(job, client, work, overwrite=overwrite,
                         prune_missing=prune_missing,
                         resources=task_resources(cluster_opts, device, client.cluster is not None),
                         progress=progress and not config.verbose)
