"""Writers: the OUT layout (local or object storage), per-partition Parquet files, the kept samples
as WebDataset tars (``--write-shards``), completion markers.

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

from . import histogram, samples, storage, versions
from .columns import ERROR_COLUMN, ROW_COLUMN, SCORE_COLUMN, SOURCE_COLUMN
from .records import FOOTERS_NAME, INDEX_NAME, stem as _stem
from .filters import Criterion, failing, table_keep_mask

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


def error_columns(columns: pa.Schema | None) -> pa.Schema | None:
    """The leading columns of every ``errors/`` file: where the row came from, then the data's."""
    if columns is None:
        return None
    data = [f for f in columns if f.name not in (SOURCE_COLUMN, ROW_COLUMN)]
    return pa.schema([pa.field(SOURCE_COLUMN, pa.string()), pa.field(ROW_COLUMN, pa.int64()), *data])


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


def split_and_write(
    table: pa.Table,
    rows: np.ndarray,
    name: str,
    source: str,
    layout: OutputLayout,
    opts: WriteOptions,
    thumbnails: dict[int, bytes] | None = None,
) -> dict[str, Any]:
    """Write the kept, rejected and error rows of one scored partition; return its record's counts.

    ``table`` has ``aesthetic_score`` and ``error`` columns (error rows: any non-null ``error``);
    ``rows`` gives each row's position in its source. The record also carries the partition's
    score histogram(s), its error reasons, and (in ``OUT/samples/``) a few rows per score band,
    with ``thumbnails`` (row index -> JPEG) where the job made them.
    """
    keep, is_error = table_keep_mask(table, opts.threshold, opts.filters)
    below = ~is_error & ~keep  # below the threshold, or failing a filter

    metadata = dict(opts.metadata)
    files = [f"kept/{name}.parquet"]
    write_parquet(rows_to_write(table, keep, opts), layout, storage.join(layout.kept, f"{name}.parquet"), metadata)
    if opts.keep_rejected:
        write_parquet(rows_to_write(table, below, opts), layout, storage.join(layout.rejected, f"{name}.parquet"), metadata)
        files.append(f"rejected/{name}.parquet")

    n_errors = int(is_error.sum())
    err = table.filter(pa.array(is_error)).drop_columns(
        [c for c in (opts.embedding_column, SCORE_COLUMN, *opts.extra_score_columns) if c in table.column_names]
    )
    err = uniform(_with_provenance(err, source, rows[is_error]), error_columns(opts.columns))
    write_parquet(err, layout, storage.join(layout.errors, f"{name}.parquet"), metadata)
    files.append(f"errors/{name}.parquet")
    reasons = {}
    if n_errors:
        keys = err.column("key").cast(pa.string()).to_pylist() if "key" in err.column_names else [str(r) for r in rows[is_error]]
        reasons = samples.error_reasons(err.column(ERROR_COLUMN), keys)
    scores = table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False)
    if opts.samples and (~is_error).any():
        eligible = ~is_error
        if thumbnails is not None:
            eligible &= np.isin(np.arange(table.num_rows), list(thumbnails))
        chosen = samples.pick(scores, eligible)
        if len(chosen):
            write_parquet(samples.sample_table(table, scores, rows, source, chosen, thumbnails),
                          layout, storage.join(layout.samples, f"{name}.parquet"), metadata)
            files.append(f"samples/{name}.parquet")
    return {
        "files": files,
        "rows_in": table.num_rows,
        "rows_kept": int(keep.sum()),
        "rows_below_threshold": int(below.sum()),
        "rows_error": n_errors,
        "histogram": histogram.histogram_counts(scores[~is_error]),
        "extra_histograms": {c: histogram.histogram_counts(table.column(c).to_numpy(zero_copy_only=False)[~is_error])
                             for c in opts.extra_score_columns},
        "error_reasons": reasons,
        **({"rows_failing_filters": failing(table, is_error, opts.filters)} if opts.filters else {}),
    }


def _with_provenance(err: pa.Table, source: str, rows: np.ndarray) -> pa.Table:
    """Error rows lead with their source file and row position, then their columns, then ``error``.

    Shards' samples carry the shard as ``source`` already; an input's own ``source`` or ``row``
    column is kept as ``source_input`` / ``row_input``.
    """
    own_source = err.column_names.count(SOURCE_COLUMN) and pa.types.is_string(err.schema.field(SOURCE_COLUMN).type) \
        and err.column(SOURCE_COLUMN).to_pylist() == [source] * err.num_rows
    out = err.drop_columns([ERROR_COLUMN] + ([SOURCE_COLUMN] if own_source else []))
    out = out.rename_columns([f"{c}_input" if c in (SOURCE_COLUMN, ROW_COLUMN) else c for c in out.column_names])
    out = out.add_column(0, SOURCE_COLUMN, pa.array([source] * err.num_rows, pa.string()))
    out = out.add_column(1, ROW_COLUMN, pa.array(rows.astype(np.int64)))
    return out.append_column(ERROR_COLUMN, err.column(ERROR_COLUMN).cast(pa.string()))


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
