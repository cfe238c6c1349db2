"""What a partition's read and score steps give the sinks (:class:`ScoredRows`): the first two
steps of the one partition pipeline (:func:`partition.process`).

Each input kind's reader (:mod:`.sources`: ``EmbeddingRows``, ``ShardRows``,
``ImageParquetRows``), a small value built once in the client and sent with every task, gives
one from ``read(part)``, or raises :class:`errors.DataError` when the partition cannot be
processed at all (its rows count as errors, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa



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
