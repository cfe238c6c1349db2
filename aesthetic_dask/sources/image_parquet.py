"""Parquet files of images (``run``): a binary or ``struct<bytes, path>`` image column (Hugging
Face ``datasets``' layout), one partition per row range (the ``run`` job's are at most
:data:`IMAGE_PARQUET_ROWS` rows: all their image bytes are in memory at once). The other columns
are read where the partition runs; the image column by a process of the worker's decode pool
(its source: :class:`ParquetImages`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..embeddings_reader import parquet_frame, read_embedding_table, read_parquet_rows
from ..errors import DataError
from ..image_reader import check_image_type, image_values
from ..image_rows import EmbeddedRows, embedded_facts
from ..parquet_plan import PARQUET_SUFFIXES, plan_parquet_files, rename_reserved, unify
from ..pipeline.host import Item
from ..rows import ScoredRows
from .kind import InputKind, InputOptions, KindPlan

IMAGE_PARQUET_ROWS = 4096


@dataclass(frozen=True)
class ParquetImages:
    """How a decode process opens a row range: the image column of rows ``[start, stop)`` of a
    Parquet file (with ``key`` for thumbnails), read by it."""

    source: str
    start: int
    stop: int
    row_groups: tuple[int, ...] | None
    column: str
    storage_options: dict[str, Any] | None = None
    group_start: int | None = None  # a slice of one big row group (parquet_plan.ParquetPart)

    def items(self, failure: list[str]) -> Iterator[Item]:
        table = read_parquet_rows(self.source, self.start, self.stop, self.row_groups, self.storage_options,
                                  columns=[self.column, "key"], group_start=self.group_start)
        keys = table.column("key").cast("string").to_pylist() if "key" in table.column_names else None
        for i, data in enumerate(image_values(table.column(self.column))):
            yield Item(None, keys[i] if keys else None, data)


@dataclass(frozen=True)
class ImageParquetRows(EmbeddedRows):
    """A row range of a Parquet file of images: its other columns (``schema``) read here, its
    image column (``column``) by a host process of the pool."""

    schema: pa.Schema | None = None
    column: str = "image"

    def read(self, part: Any) -> ScoredRows:
        table = read_embedding_table(part, self.schema, self.column, self.storage_options)
        embedded = self.embedded(ParquetImages(part.source, part.start, part.stop, part.row_groups, self.column,
                                            self.storage_options, part.group_start))
        if embedded.failure:
            raise DataError(f"{part.source}: cannot read rows {part.start}-{part.stop}: {embedded.failure}")
        return ScoredRows(self.with_scores(table, embedded), np.arange(part.start, part.stop, dtype=np.int64),
                          embedded.thumbnails if self.thumbnails else None,
                          facts={"start": part.start, "stop": part.stop, **embedded_facts(embedded)})


class ImageParquet(InputKind):
    name = "image-parquet"
    job = "run"
    suffixes = PARQUET_SUFFIXES

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        parts, schemas, failed, footers = plan_parquet_files(
            inputs, opts.column, check_image_type, opts.partition_rows, opts.storage_options,
            opts.footer_cache)
        schema = rename_reserved(unify(schemas, opts.column, opts.canonical), opts.reserved, opts.column)
        return KindPlan(self, parts, schema, failed, footers=footers)

    def _others(self, plan: KindPlan, opts: InputOptions) -> pa.Schema:
        return pa.schema([f for f in plan.schema if f.name != opts.column])

    def columns(self, plan: KindPlan, opts: InputOptions) -> pa.Schema:
        return self._others(plan, opts).remove_metadata()

    def rows(self, plan: KindPlan, opts: InputOptions, **scoring: Any) -> ImageParquetRows:
        return ImageParquetRows(**scoring, storage_options=opts.storage_options, schema=self._others(plan, opts),
                                column=opts.column)

    def frame(self, plan: KindPlan, opts: InputOptions) -> Any:
        return parquet_frame(plan.parts, plan.schema, opts.column, opts.storage_options)
