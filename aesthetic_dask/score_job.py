"""The ``score`` job: precomputed embeddings -> aesthetic scores -> kept/rejected/errors Parquet.

Each partition (a row range of an embeddings file) is one Dask task of the one partition pipeline
(:func:`partition.process`): read and score (the embedding kinds' reader,
:class:`sources.parquet_embeddings.EmbeddingRows`), then the Parquet and samples sinks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Config
from .launch import Planned, run_planned
from .preparation import Heads, kind_work
from .output import OutputLayout
from .parquet_sink import ParquetSink
from .records import read_footers
from .samples import SamplesSink
from .sources.kind import InputOptions
from .sources.registry import plan_embeddings
from .score import check_extra_score_names


def score_job(inputs: list[str], out: str | Path, config: Config, overwrite: bool = False, progress: bool = True,
              started: float | None = None, prune_missing: bool = False) -> tuple[dict[str, Any], int]:
    """Run the score job; return (manifest, exit code)."""
    started, t0 = started or time.time(), time.perf_counter()
    so = config.storage_options
    layout = OutputLayout(out, so)
    cached = read_footers(layout)  # a re-run reads the footers of new and changed inputs only
    plan = plan_embeddings(inputs, config.embedding_column, config.partition_rows, exclude=(layout.url(),),
                           storage_options=so, footer_cache=cached)
    heads = Heads.load(config)
    check_extra_score_names(heads.extras, plan.schema.names)
    opts = heads.write_options(config, config.embedding_column)
    reading = InputOptions(config.embedding_column, config.partition_rows, storage_options=so)
    scoring = dict(predictor=heads.predictor, extras=heads.extras, batch_size=config.model_inference_batch_size)
    common = dict(out=layout.url(), opts=opts, sinks=(ParquetSink(), SamplesSink()), storage_options=so)
    work = kind_work(plan.plans, reading, scoring, common)
    planned = Planned("score", work, sorted({p.source for p in plan.parts} | set(plan.failed)), plan.failed,
                      plan.duplicates, plan.notes, plan.footers, cached)
    return run_planned(planned, config, layout, heads, started, t0, overwrite, prune_missing, progress)
