"""The ``score`` job: precomputed embeddings -> aesthetic scores -> kept/rejected/errors Parquet.

read (:mod:`embeddings_reader`) -> score (:mod:`score`) -> write (:mod:`output`), one Dask task per
partition, run by :func:`aesthetic_dask.job.run_parts`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .config import Config
from .errors import DataError
from .job import Job, package_versions, record_frame, run_parts
from .output import OutputLayout, WriteOptions, frame_to_table, split_and_write, write_record
from .predictor import AestheticPredictor, load_predictor
from .embeddings_reader import EmbeddingPart, plan_embeddings, read_embedding_table, table_to_frame
from .score import score_partition
from .weights import resolve_weights

VERSIONED_PACKAGES = ("aesthetic-dask", "dask", "distributed", "pandas", "pyarrow", "numpy", "safetensors", "huggingface_hub")


def process_embedding_part(
    part: EmbeddingPart,
    schema: pa.Schema,
    column: str,
    predictor: AestheticPredictor,
    out: str,
    opts: WriteOptions,
    backend: str = "pandas",
) -> pd.DataFrame:
    """Read, score and write one partition; return its record (see :func:`job.record_frame`)."""
    t0 = time.perf_counter()
    layout = OutputLayout(Path(out))
    record: dict[str, Any] = {"name": part.name, "source": part.source, "start": part.start, "stop": part.stop}
    try:
        table = read_embedding_table(part, schema, column)
    except DataError as exc:
        record |= {"rows_in": part.rows, "rows_kept": 0, "rows_below_threshold": 0, "rows_error": part.rows, "failure": str(exc)}
    else:
        if backend == "cudf":
            import cudf

            frame = cudf.DataFrame.from_arrow(table)
        else:
            frame = table_to_frame(table, part.start)
        scored = score_partition(frame, predictor, column)
        rows = pd.RangeIndex(part.start, part.stop).to_numpy()
        record |= split_and_write(frame_to_table(scored), rows, part.name, part.source, layout, opts)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    write_record(layout, record)
    return record_frame(record)


def score_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], int]:
    """Run the score job; return (manifest, exit code)."""
    from .cluster import dask_client, task_resources

    t0 = time.perf_counter()
    out = Path(out)
    plan = plan_embeddings(inputs, config.embedding_column, config.partition_rows)
    weights = resolve_weights(config.aesthetic_weights, config.resolved_model_dir)
    predictor = load_predictor(weights, config.resolved_model_dir)
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
        "weights_sha256": weights.sha256,
    }
    job = Job(
        kind="score",
        layout=OutputLayout(out),
        settings=settings,
        info={
            "config": config.to_dict(),
            "weights": {"source": weights.source, "path": str(weights.path), "sha256": weights.sha256, "folded": predictor.folded},
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
