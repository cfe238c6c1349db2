"""The OUT layout (local or object storage) and what its sinks share: how a partition is written
(:class:`WriteOptions`), one schema per directory (:func:`uniform`), files whole or not at all
(:func:`write_parquet`), a partition's files by name (:class:`NamedFiles`). The sinks themselves
(:mod:`.parquet_sink`, :mod:`.samples`, :mod:`.shard_sink`) are registered in :mod:`.sinks`,
which removes partitions through them.

OUT/kept/, OUT/rejected/ and OUT/errors/ are plain Parquet datasets (one file per input
partition, named after it). Every file appears whole or not at all (:func:`storage.atomic_open`);
OUT/_parts/NAME.json, written last, records a finished partition (its counts), which is what a
re-run uses to skip it.

What readers see (pandas, pyarrow, polars, duckdb, Dask, Hugging Face ``datasets``): every
partition writes its file in each directory (``rejected/`` with ``--keep-rejected``), all of one
directory with one schema (the job's columns, in one order, null where an input lacked one), so
no reader meets a missing directory or a schema that changes from file to file. A file with no
rows has no row group (``datasets`` sizes its batches by the first row group and refuses an
empty one). Each file carries the job's provenance as key-value metadata (:mod:`.provenance`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage, versions
from .columns import ERROR_COLUMN
from .records import stem as _stem
from .filters import Criterion

COUNT_KEYS = ("rows_in", "rows_kept", "rows_below_threshold", "rows_error")


class OutputLayout:
    """Paths of one job's output directory, on any fsspec filesystem.

    ``root`` is a local path or a URL; paths below are the filesystem's (no protocol), and
    ``url(...)`` gives them as users see them.
    """

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.root_url = str(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.split(self.root_url, self.storage_options)
        self.local = storage.is_local(self.fs)
        if self.local:
            self.root = os.path.abspath(self.root)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        return storage.to_url(self.fs, self.path(*parts))

    kept = property(lambda self: self.path("kept"))
    rejected = property(lambda self: self.path("rejected"))
    errors = property(lambda self: self.path("errors"))
    samples = property(lambda self: self.path("samples"))
    records = property(lambda self: self.path("_parts"))
    manifest = property(lambda self: self.path("manifest.json"))

    @property
    def tmp(self) -> str | None:
        """Where local files are written before their rename (object stores need none)."""
        return self.path("_tmp") if self.local else None

    def file(self, listed: str) -> str:
        """A record's file entry (relative to OUT, or absolute/a URL for --write-shards) as a path."""
        if storage.is_url(listed):
            return storage.split(listed, self.storage_options)[1]
        return listed if listed.startswith("/") else self.path(listed)

    def existing(self) -> set[str]:
        """Every file under OUT, listed once (one listing instead of a request per file)."""
        return set(self.listing())

    def listing(self) -> dict[str, dict[str, Any]]:
        """Every file under OUT with what the listing says of it (size, version): one listing."""
        if self.local:
            return versions.local_find(self.root)
        try:
            return self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}

    def read_text(self, path: str) -> str | None:
        try:
            return self.fs.cat_file(path).decode()
        except FileNotFoundError:
            return None

    def remove(self, paths: list[str]) -> None:
        if paths:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                pass

    def clear_tmp(self) -> None:
        if self.local:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_parquet(table: pa.Table, layout: OutputLayout, path: str, metadata: dict[bytes, bytes] | None = None) -> None:
    """``table`` as the Parquet file ``path`` under OUT, whole or not at all (:func:`write_parquet_file`)."""
    write_parquet_file(table, layout.fs, path, layout.tmp, metadata)


def write_parquet_file(table: pa.Table, fs: Any, path: str, tmp_dir: str | None = None,
                       metadata: dict[bytes, bytes] | None = None) -> None:
    """``table`` as the Parquet file ``path`` of ``fs``, whole or not at all, with ``metadata``
    added to its schema's key-value metadata. No rows: no row group (see the module's docstring).
    Not fsync-ed: a partition's files are made durable together before its record
    (:func:`storage.sync_files`)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with storage.atomic_open(fs, path, tmp_dir, durable=False) as f:
        if table.num_rows:
            pq.write_table(table, f)
        else:
            pq.ParquetWriter(f, table.schema).close()


def uniform(table: pa.Table, columns: pa.Schema | None) -> pa.Table:
    """``table`` with ``columns`` first, in their order and types (null where it has none), then
    its other columns: every partition's file of a directory has one schema."""
    if columns is None:
        return table
    arrays, fields = [], []
    for field in columns:
        if field.name in table.column_names:
            column = table.column(field.name)
            arrays.append(column if column.type == field.type else column.cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in columns.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _fixed_size(table: pa.Table, column: str, dim: int) -> pa.Table:
    """Valid embeddings as fixed_size_list<float32>[dim] (every kept row has exactly dim values)."""
    idx = table.schema.get_field_index(column)
    col = table.column(column).cast(pa.list_(pa.float32(), dim))
    return table.set_column(idx, pa.field(column, col.type), col)


@dataclass(frozen=True)
class WriteOptions:
    """How a scored partition is split and written."""

    threshold: float
    embedding_column: str
    keep_embeddings: bool
    keep_rejected: bool
    embed_dim: int = 768
    extra_score_columns: tuple[str, ...] = ()  # --extra-scores: written for scored rows only
    filters: tuple[Criterion, ...] = ()  # --filter: more criteria of the keep rule (filters.py)
    samples: bool = True  # keep a small sample per score band for the report (OUT/samples/)
    columns: pa.Schema | None = None  # the job's input columns written (all partitions'), see uniform()
    metadata: tuple[tuple[bytes, bytes], ...] = ()  # each file's key-value metadata (provenance)


def rows_to_write(table: pa.Table, mask: np.ndarray, opts: WriteOptions) -> pa.Table:
    """The valid rows of a scored partition selected by ``mask`` as kept/ and rejected/ hold them."""
    drop = [opts.embedding_column] if not opts.keep_embeddings and opts.embedding_column in table.column_names else []
    rows = table.drop_columns(drop + [ERROR_COLUMN]).filter(pa.array(mask))
    if opts.keep_embeddings and opts.embedding_column in rows.column_names:
        # Cast after filtering: only valid rows are sure to hold exactly embed_dim values.
        rows = _fixed_size(rows, opts.embedding_column, opts.embed_dim)
    return uniform(rows, opts.columns)


def partition_files(layout: OutputLayout, directories: tuple[str, ...], names: set[str] | None, existing: set[str]) -> list[str]:
    """The files among ``existing`` in OUT's ``directories`` (one per partition, named after it) of
    partitions ``names`` (None: of any)."""
    dirs = {layout.path(d) for d in directories}
    return [p for p in existing if p.rsplit("/", 1)[0] in dirs and p.endswith((".parquet", ".json"))
            and (names is None or _stem(p) in names)]


class NamedFiles:
    """A sink whose files are one per partition in each of OUT's :attr:`directories`, named after it."""

    directories: tuple[str, ...] = ()

    @classmethod
    def remove(cls, layout: OutputLayout, names: set[str], existing: set[str], listed: dict[str, list[str]]) -> list[str]:
        """This sink's files of partitions ``names``: those of its directories named after them."""
        return partition_files(layout, cls.directories, names, existing)
