"""The ``score`` job: precomputed embeddings -> aesthetic scores -> kept/rejected/errors Parquet.

read (:mod:`embeddings_reader`) -> score (:mod:`score`) -> write (:mod:`output`), one Dask task per
partition, run by :func:`aesthetic_dask.job.run_parts`.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .config import Config
from .embeddings_reader import EmbeddingPart, plan_embeddings, table_to_frame
from .job import Job, load_scoring_weights, package_versions, process_parquet_part, run_parts
from .output import OutputLayout, WriteOptions, frame_to_table
from .predictor import AestheticPredictor
from .score import score_partition

VERSIONED_PACKAGES = ("aesthetic-dask", "dask", "distributed", "pandas", "pyarrow", "numpy", "safetensors", "huggingface_hub")


def score_embedding_table(table: pa.Table, predictor: AestheticPredictor, column: str, backend: str, start: int) -> pa.Table:
    """A read partition with ``aesthetic_score`` and ``error``: pandas on CPU, cudf on a GPU worker."""
    if backend == "cudf":
        import cudf

        frame = cudf.DataFrame.from_arrow(table)
    else:
        frame = table_to_frame(table, start)
    return frame_to_table(score_partition(frame, predictor, column))


def process_embedding_part(
    part: EmbeddingPart, schema: pa.Schema, column: str, predictor: AestheticPredictor, out: str,
    opts: WriteOptions, backend: str = "pandas",
) -> pd.DataFrame:
    """Read, score and write one partition; return its record (see :func:`job.record_frame`)."""
    scorer = partial(score_embedding_table, predictor=predictor, column=column, backend=backend, start=part.start)
    return process_parquet_part(part, schema, column, out, opts, scorer)


def score_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], int]:
    """Run the score job; return (manifest, exit code)."""
    from .cluster import dask_client, task_resources

    t0 = time.perf_counter()
    out = Path(out)
    plan = plan_embeddings(inputs, config.embedding_column, config.partition_rows)
    predictor, weights = load_scoring_weights(config)
    opts = WriteOptions(
        threshold=config.score_threshold,
        embedding_column=config.embedding_column,
        keep_embeddings=config.keep_embeddings,
        keep_rejected=config.keep_rejected,
        embed_dim=predictor.embed_dim,
    )
    settings = {
        "inputs": sorted(str(Path(p.source).resolve()) for p in plan.parts),
        "score_threshold": config.score_threshold,
        "embedding_column": config.embedding_column,
        "keep_embeddings": config.keep_embeddings,
        "keep_rejected": config.keep_rejected,
        "partition_rows": config.partition_rows,
        "weights_sha256": weights["sha256"],
    }
    job = Job(
        kind="score",
        layout=OutputLayout(out),
        settings=settings,
        info={
            "config": config.to_dict(),
            "weights": weights,
            "versions": package_versions(VERSIONED_PACKAGES),
        },
        failed_inputs=plan.failed,
    )
    job.timings["plan_s"] = round(time.perf_counter() - t0, 3)
    with dask_client(config) as (client, device):
        job.timings["cluster_s"] = round(time.perf_counter() - t0 - job.timings["plan_s"], 3)
        kwargs = dict(
            schema=plan.schema,
            column=config.embedding_column,
            predictor=predictor,
            out=str(out.resolve()),
            opts=opts,
            backend="cudf" if device == "cuda" else "pandas",
        )
        return run_parts(
            job,
            client,
            [(plan.parts, process_embedding_part, kwargs)],
            overwrite=overwrite,
            resources=task_resources(config, device),
            progress=progress and not config.verbose,
        )
