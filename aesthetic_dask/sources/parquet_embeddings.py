"""Parquet files of CLIP embeddings (``score``): a list<float> or fixed_size_list<float> column,
one partition per file or run of row groups (:func:`parquet_plan.plan_parquet_files`), scored
where they are read (:class:`EmbeddingRows`: no model, no decode pool)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..embeddings_reader import parquet_frame, read_embedding_table
from ..errors import InputError, MissingColumnError
from ..parquet_plan import EMBEDDING_TYPE, PARQUET_SUFFIXES, check_embedding_type, plan_parquet_files, rename_reserved, unify
from ..rows import ScoredRows
from ..score import score_table
from .kind import InputKind, InputOptions, KindPlan


@dataclass(frozen=True)
class EmbeddingRows:
    """A row range of an embeddings Parquet file (or of a clip-retrieval ``.npy``), scored by the
    heads: one matrix per call of ``batch_size`` rows, on the worker's device (:func:`score.score_table`)."""

    schema: pa.Schema
    column: str
    predictor: Any
    extras: dict[str, Any] | None = None
    batch_size: int | None = None
    storage_options: dict[str, Any] | None = None

    def table(self, part: Any) -> pa.Table:
        """The partition's rows, conformed to the job's one schema (a kind reading another format overrides it)."""
        return read_embedding_table(part, self.schema, self.column, self.storage_options)

    def read(self, part: Any) -> ScoredRows:
        scored = score_table(self.table(part), self.predictor, self.column, self.extras, self.batch_size)
        return ScoredRows(scored, np.arange(part.start, part.stop, dtype=np.int64),
                          facts={"start": part.start, "stop": part.stop})


def embedding_schema(schemas: list[tuple[str, pa.Schema]], opts: InputOptions) -> pa.Schema:
    """One schema for embedding inputs (``(where, schema)`` each): the embedding column as
    list<float32>, the others unified, a column named like one the job writes read as NAME_input."""
    return rename_reserved(unify(schemas, opts.column, EMBEDDING_TYPE), opts.reserved, opts.column)


class EmbeddingsKind(InputKind):
    """What the embedding kinds share: their schema, their reader, their lazy frame."""

    job = "score"

    def columns(self, plan: KindPlan, opts: InputOptions) -> pa.Schema:
        return plan.schema

    def rows(self, plan: KindPlan, opts: InputOptions, **scoring: Any) -> EmbeddingRows:
        return EmbeddingRows(plan.schema, opts.column, storage_options=opts.storage_options, **scoring)

    def frame(self, plan: KindPlan, opts: InputOptions) -> Any:
        return parquet_frame(plan.parts, plan.schema, opts.column, opts.storage_options)


class ParquetEmbeddings(EmbeddingsKind):
    name = "parquet-embeddings"
    suffixes = PARQUET_SUFFIXES

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        try:
            parts, schemas, failed, footers = plan_parquet_files(inputs, opts.column, check_embedding_type,
                                                                 opts.partition_rows, opts.storage_options, opts.footer_cache)
        except MissingColumnError as exc:
            raise InputError(f"{exc}; choose one with --embedding-column") from None
        return KindPlan(self, parts, embedding_schema(schemas, opts) if schemas else None, failed, footers=footers)
