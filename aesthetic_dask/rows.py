"""A planned partition's rows, read and scored: the first two steps of the one partition pipeline
(:func:`partition.process`), one small value per input kind, built once in the client and sent
with every task.

- :class:`EmbeddingRows`: a row range of a Parquet file of embeddings, scored by the heads
  (``score``).
- :class:`image_rows.ShardRows`: a WebDataset shard, read and decoded by the worker's decode
  pool, embedded and scored where the model runs (``run``).
- :class:`image_rows.ImageParquetRows`: a row range of a Parquet file of images: its other
  columns read here, its images by the pool (``run``).

Each ``read(part)`` gives :class:`ScoredRows` or raises :class:`errors.DataError` when the
partition cannot be processed at all (its rows count as errors, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .embeddings_reader import read_embedding_table
from .score import score_table


@dataclass
class ScoredRows:
    """What a partition's read and score steps give the sinks."""

    table: pa.Table  # the input columns, aesthetic_score, the extra heads' columns, error
    rows: np.ndarray  # each row's position in its source (a shard's: its sample index)
    thumbnails: dict[int, bytes] | None = None  # row -> JPEG, for the report's samples
    failure: str | None = None  # the source stopped early: its rows so far are written, the partition fails
    note: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # its record's fields (row range, compute, worker, stats)
    from_tar: bool = False  # the rows are a tar's samples: a shard sink copies their members
    started: float = 0.0  # wall-clock start of the partition (set by partition.process)
    # The keep rule over ``table`` (kept rows, error rows), evaluated once by partition.process
    # for every sink: they split the same rows alike by construction.
    keep: np.ndarray | None = None
    is_error: np.ndarray | None = None


@dataclass(frozen=True)
class EmbeddingRows:
    """A row range of an embeddings Parquet file, scored by the heads: one matrix per call of
    ``batch_size`` rows, on the worker's device (:func:`score.score_table`)."""

    schema: pa.Schema
    column: str
    predictor: Any
    extras: dict[str, Any] | None = None
    batch_size: int | None = None
    storage_options: dict[str, Any] | None = None

    def read(self, part: Any) -> ScoredRows:
        table = read_embedding_table(part, self.schema, self.column, self.storage_options)
        scored = score_table(table, self.predictor, self.column, self.extras, self.batch_size)
        return ScoredRows(scored, np.arange(part.start, part.stop, dtype=np.int64),
                          facts={"start": part.start, "stop": part.stop})
