"""Arrow IPC files of embeddings (``score``): ``.arrow`` and ``.feather``, in the IPC file format
(Feather v2, ``pyarrow.feather.write_feather``) or the IPC stream format (what Hugging Face
``datasets`` writes with ``save_to_disk``). One partition per row range of about
``partition_rows`` rows; a partition reads the record batches that hold its rows, memory-mapped
where the file is local (the planner reads each file once to count its batches' rows: on object
storage, the whole file).

This kind is one module and one entry in :data:`registry.KINDS`: it plans, reads and frames its
files itself, and shares the embedding kinds' schema, scoring and sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from .. import storage
from ..embeddings_reader import INPUT_NAME_KEY, conform, table_to_frame
from ..errors import DataError, MissingColumnError
from ..parquet_plan import ParquetPart, check_embedding_type, row_ranges
from .kind import InputOptions, KindPlan
from .parquet_embeddings import EmbeddingRows, EmbeddingsKind, embedding_schema

ARROW_SUFFIXES = (".arrow", ".feather")


def _batches(source: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and record batches of an IPC file (random access) or stream (in order)."""
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        stream = pa.ipc.open_stream(source)
        return stream.schema, iter(stream)


def _open(url: str, storage_options: dict[str, Any] | None) -> Any:
    fs, path = storage.split(url, storage_options)
    return pa.memory_map(path) if storage.is_local(fs) else fs.open(path, "rb")


def read_arrow_rows(url: str, start: int, stop: int, storage_options: dict[str, Any] | None = None,
                    columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of an Arrow IPC file (only ``columns`` of them that exist, when given)."""
    with _open(url, storage_options) as source:
        schema, batches = _batches(source)
        kept, offset = [], 0
        for batch in batches:
            if offset >= stop:
                break
            n = batch.num_rows
            if offset + n > start:
                first = max(start - offset, 0)
                kept.append(batch.slice(first, min(stop - offset, n) - first))
            offset += n
        table = pa.Table.from_batches(kept, schema=schema)
    return table.select([c for c in columns if c in table.column_names]) if columns is not None else table


def read_table(part: Any, schema: pa.Schema, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """One partition conformed to ``schema`` (the job's one schema). Raises DataError if unreadable."""
    columns = [(f.metadata or {}).get(INPUT_NAME_KEY, b"").decode() or f.name for f in schema]
    try:
        table = read_arrow_rows(part.source, part.start, part.stop, storage_options, columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{part.source}: cannot read rows {part.start}-{part.stop}: {exc}") from None
    if table.num_rows != part.rows:
        raise DataError(f"{part.source}: expected {part.rows} rows in {part.start}-{part.stop}, read {table.num_rows}")
    return conform(table, schema)


def read_part(part: Any, schema: pa.Schema, storage_options: dict[str, Any] | None = None) -> Any:
    """The notebook's partition function: one partition as a pandas frame indexed by its rows."""
    return table_to_frame(read_table(part, schema, storage_options), part.start)


@dataclass(frozen=True)
class ArrowEmbeddingRows(EmbeddingRows):
    """A row range of an Arrow IPC file of embeddings, scored like any embedding kind's rows."""

    def table(self, part: Any) -> pa.Table:
        return read_table(part, self.schema, self.storage_options)


class ArrowEmbeddings(EmbeddingsKind):
    name = "arrow-embeddings"
    suffixes = ARROW_SUFFIXES

    def plan(self, inputs: list[str], opts: InputOptions) -> KindPlan:
        plan = KindPlan(self, [], None)
        schemas: list[tuple[str, pa.Schema]] = []
        for url in inputs:
            try:
                with _open(url, opts.storage_options) as source:
                    schema, batches = _batches(source)
                    rows = sum(batch.num_rows for batch in batches)
            except (pa.ArrowException, OSError, ValueError) as exc:
                plan.failed[url] = f"not a readable Arrow IPC file: {exc}"
                continue
            if opts.column not in schema.names:
                raise MissingColumnError(url, opts.column, schema.names, "; choose one with --embedding-column")
            check_embedding_type(schema.field(opts.column).type, opts.column, url)
            schemas.append((url, schema))
            plan.parts += [ParquetPart(url, start, stop) for start, stop in row_ranges(rows, opts.partition_rows)]
        plan.schema = embedding_schema(schemas, opts) if schemas else None
        return plan

    def rows(self, plan: KindPlan, opts: InputOptions, **scoring: Any) -> ArrowEmbeddingRows:
        return ArrowEmbeddingRows(plan.schema, opts.column, storage_options=opts.storage_options, **scoring)

    def frame(self, plan: KindPlan, opts: InputOptions) -> Any:
        import dask.dataframe as dd

        meta = table_to_frame(pa.schema([f.remove_metadata() for f in plan.schema]).empty_table())
        return dd.from_map(read_part, plan.parts, schema=plan.schema, storage_options=opts.storage_options, meta=meta,
                           enforce_metadata=False, label="read-arrow")
