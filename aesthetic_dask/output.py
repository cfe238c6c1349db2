"""The OUT layout (local or object storage), what its sinks share (how a partition is written:
:class:`WriteOptions`; one schema per directory: :func:`uniform`; files whole or not at all:
:func:`write_parquet`), and removing a partition's files (redone, no longer planned, --overwrite).
The sinks themselves: :mod:`.parquet_sink`, :mod:`.shard_sink`.

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

import json
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
from .records import FOOTERS_NAME, INDEX_NAME, stem as _stem
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

    def written_by_a_job(self, path: str) -> bool:
        """Whether ``path`` (under OUT) is something a job writes: its layout and file names."""
        relative = path.removeprefix(self.root.rstrip("/") + "/")
        if relative in ("manifest.json", "report.html", "job.log", "_lock.json"):
            return True
        directory, _, name = relative.partition("/")
        if directory == "_tmp":
            return True
        if "/" in name:
            return False
        return (directory in ("kept", "rejected", "errors", "samples") and name.endswith(".parquet")) or \
            (directory == "_parts" and (name.endswith(".json") or name in (INDEX_NAME, FOOTERS_NAME)))

    def data_dirs(self) -> tuple[str, ...]:
        return (self.kept, self.rejected, self.errors, self.samples, self.records) + ((self.tmp,) if self.local else ())

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


def remove_unplanned(layout: OutputLayout, planned: set[str], existing: set[str]) -> list[str]:
    """Remove the files and records of partitions this job no longer plans; return their names.

    E.g. a different partitioning of the same inputs: its files would otherwise be read as
    kept rows twice.
    """
    removed: set[str] = set()
    doomed: list[str] = []
    records, data_dirs = layout.records, (layout.kept, layout.rejected, layout.errors, layout.samples)  # once, not per file
    for path in sorted(existing):
        directory = path.rsplit("/", 1)[0]
        if directory == records and path.endswith(".json") and _stem(path) not in planned:
            try:
                listed = json.loads(layout.fs.cat_file(path)).get("files", [])
            except (OSError, ValueError, AttributeError):
                listed = []
            doomed += [layout.file(f) for f in listed if "/" in f and not f.startswith(("kept/", "rejected/", "errors/", "samples/"))]
            doomed.append(path)
            removed.add(_stem(path))
        elif directory in data_dirs and _stem(path) not in planned:
            doomed.append(path)
            removed.add(_stem(path))
    layout.remove([p for p in doomed if p in existing or layout.fs.exists(p)])
    return sorted(removed)


def reset_output(layout: OutputLayout) -> None:
    """Remove everything a job writes under OUT (for --overwrite)."""
    for d in layout.data_dirs():
        if layout.fs.exists(d):
            layout.fs.rm(d, recursive=True)
    layout.remove([layout.manifest] if layout.fs.exists(layout.manifest) else [])


def remove_partition_files(layout: OutputLayout, names: set[str], existing: set[str]) -> None:
    """Drop the output files (and any stale record) of partitions that will be redone."""
    if not names:
        return
    dirs = (layout.kept, layout.rejected, layout.errors, layout.samples, layout.records)
    doomed = [p for p in existing if _stem(p) in names and p.rsplit("/", 1)[0] in dirs]
    layout.remove(doomed)
