"""One partition's unit of work, shared by both jobs: its record, its failure, its completion marker.

A process function (``process(part, **kwargs) -> record``) reads, scores and writes one partition
and returns its record: the counts, the files written, and a ``failure`` if the input could not be
read whole. Only a partition without a failure leaves ``OUT/_parts/NAME.json``, written last, after
its data files: resume trusts those markers alone, so a failed partition is retried by a re-run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .errors import FAILURE_DATA, FAILURE_ERROR, DataError
from .output import OutputLayout, WriteOptions, split_and_write, write_record
from .embeddings_reader import read_embedding_table


def new_record(part: Any) -> dict[str, Any]:
    """The start of a partition's record."""
    return {"name": part.name, "source": str(part.source)}


def failed_record(part: Any, reason: str, kind: str = FAILURE_ERROR) -> dict[str, Any]:
    """A partition that could not be processed at all.

    Its rows count as errors when their number is known (a Parquet row range); a shard lost
    before it was read has ``rows_in: None`` ("rows unknown"), never a silent 0.
    """
    rows = getattr(part, "rows", None)
    return new_record(part) | {
        "rows_in": rows,
        "rows_kept": 0 if rows is not None else None,
        "rows_below_threshold": 0 if rows is not None else None,
        "rows_error": rows,
        "failure": reason,
        "failure_kind": kind,
        "files": [],
        "seconds": 0.0,
    }


def finish_record(layout: OutputLayout, record: dict[str, Any], started: float) -> dict[str, Any]:
    """Time the record and, if the partition is complete, write its completion marker (last)."""
    record["seconds"] = round(time.perf_counter() - started, 4)
    # Wall-clock end (epoch seconds): with ``seconds``, when the partition ran, e.g. to see how
    # many tasks shared a GPU at once.
    record["finished_at"] = round(time.time(), 4)
    if record.get("failure"):
        record.setdefault("failure_kind", FAILURE_DATA)
    else:
        write_record(layout, record)
    return record


def process_parquet_part(
    part: Any, schema: Any, column: str, out: str, opts: WriteOptions, score_table: Callable[[Any], Any],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read rows of a Parquet input, score them with ``score_table(table)``, write, return the record.

    ``score_table`` returns the table with ``aesthetic_score`` and ``error`` columns, and the
    report's thumbnails by row (or None). An unreadable row range counts all its rows as errors
    and records why.
    """
    t0 = time.perf_counter()
    layout = OutputLayout(out, storage_options)
    try:
        table = read_embedding_table(part, schema, column, storage_options)
    except DataError as exc:
        return finish_record(layout, failed_record(part, str(exc), FAILURE_DATA), t0)
    record = new_record(part) | {"start": part.start, "stop": part.stop}
    rows = np.arange(part.start, part.stop, dtype=np.int64)
    try:
        scored, thumbnails = score_table(table)
    except DataError as exc:  # e.g. the image column, read by a host process of the pool
        return finish_record(layout, failed_record(part, str(exc), FAILURE_DATA), t0)
    record |= split_and_write(scored, rows, part.name, part.source, layout, opts, thumbnails)
    return finish_record(layout, record, t0)
