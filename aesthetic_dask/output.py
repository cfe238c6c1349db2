"""Writer: the OUT layout, per-partition files written atomically, and the manifest.

OUT/kept/, OUT/rejected/ and OUT/errors/ are plain Parquet datasets (one file per input
partition, named after it). Files are written under OUT/_tmp/ and renamed into place, so readers
never see a partial file; OUT/_parts/NAME.json records a finished partition (its counts), which is
what a re-run uses to skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import histogram, samples
from .score import ERROR_COLUMN, SCORE_COLUMN, table_keep_mask

COUNT_KEYS = ("rows_in", "rows_kept", "rows_below_threshold", "rows_error")
SOURCE_COLUMN = "source"
ROW_COLUMN = "row"


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one job's output directory."""

    root: Path

    @property
    def kept(self) -> Path:
        return self.root / "kept"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def tmp(self) -> Path:
        return self.root / "_tmp"

    @property
    def records(self) -> Path:
        return self.root / "_parts"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def data_dirs(self) -> tuple[Path, ...]:
        return (self.kept, self.rejected, self.errors, self.samples, self.tmp, self.records)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    tmp_dir = tmp_dir or path.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any, tmp_dir: Path | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode(), tmp_dir)


def _write_parquet(table: pa.Table, path: Path, tmp_dir: Path) -> None:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.parent.name}-{path.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def frame_to_table(df: Any) -> pa.Table:
    """A pandas (pyarrow-backed) or cudf partition as an Arrow table, without its index."""
    if type(df).__module__.startswith("cudf"):
        table = df.reset_index(drop=True).to_arrow()
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
    # Plain Parquet: pandas metadata would make readers rebuild pyarrow-backed dtypes by name.
    return table.replace_schema_metadata(None)


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
    samples: bool = True  # keep a small sample per score band for the report (OUT/samples/)


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
    keep, is_error = table_keep_mask(table, opts.threshold)
    below = ~is_error & ~keep

    drop = [opts.embedding_column] if not opts.keep_embeddings and opts.embedding_column in table.column_names else []
    scored = table.drop_columns(drop + [ERROR_COLUMN])

    def valid_rows(mask: np.ndarray) -> pa.Table:
        rows = scored.filter(pa.array(mask))
        if opts.keep_embeddings and opts.embedding_column in rows.column_names:
            # Cast after filtering: only valid rows are sure to hold exactly embed_dim values.
            rows = _fixed_size(rows, opts.embedding_column, opts.embed_dim)
        return rows

    files = [f"kept/{name}.parquet"]
    _write_parquet(valid_rows(keep), layout.kept / f"{name}.parquet", layout.tmp)
    if opts.keep_rejected and below.any():
        _write_parquet(valid_rows(below), layout.rejected / f"{name}.parquet", layout.tmp)
        files.append(f"rejected/{name}.parquet")

    n_errors = int(is_error.sum())
    if n_errors:
        err = table.filter(pa.array(is_error)).drop_columns(
            [c for c in (opts.embedding_column, SCORE_COLUMN, *opts.extra_score_columns) if c in table.column_names]
        )
        err = _with_provenance(err, source, rows[is_error])
        _write_parquet(err, layout.errors / f"{name}.parquet", layout.tmp)
        files.append(f"errors/{name}.parquet")
        keys = err.column("key").cast(pa.string()).to_pylist() if "key" in err.column_names else [str(r) for r in rows[is_error]]
        reasons = samples.error_reasons(err.column(ERROR_COLUMN), keys)
    else:
        reasons = {}
    scores = table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False)
    if opts.samples and (~is_error).any():
        eligible = ~is_error
        if thumbnails is not None:
            eligible &= np.isin(np.arange(table.num_rows), list(thumbnails))
        chosen = samples.pick(scores, eligible)
        if len(chosen):
            _write_parquet(samples.sample_table(table, scores, rows, source, chosen, thumbnails),
                           layout.samples / f"{name}.parquet", layout.tmp)
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


def write_record(layout: OutputLayout, record: dict[str, Any]) -> None:
    """Mark a partition finished: written last, after its data files are in place."""
    write_json(layout.records / f"{record['name']}.json", record, layout.tmp)


def read_records(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    """Records of finished partitions whose files are all in place, by name.

    An unreadable record, a record of a failed partition, or one whose output files went missing
    means "not finished": resume trusts complete records alone.
    """
    records = {}
    if layout.records.is_dir():
        for path in layout.records.glob("*.json"):
            try:
                rec = json.loads(path.read_text())
                if rec.get("failure") or rec["name"] != path.stem:
                    continue
                if all((layout.root / f).is_file() for f in rec.get("files", [])):
                    records[rec["name"]] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return records


def remove_unplanned(layout: OutputLayout, planned: set[str]) -> list[str]:
    """Remove the files and records of partitions this job no longer plans; return their names.

    E.g. a different partitioning of the same inputs: its files would otherwise be read as
    kept rows twice.
    """
    removed: set[str] = set()
    if layout.records.is_dir():
        for path in layout.records.glob("*.json"):
            if path.stem in planned:
                continue
            try:
                listed = json.loads(path.read_text()).get("files", [])
            except (OSError, ValueError, AttributeError):
                listed = []
            for f in listed:
                (layout.root / f).unlink(missing_ok=True)  # absolute paths (write_shards) too
            path.unlink(missing_ok=True)
            removed.add(path.stem)
    for d in (layout.kept, layout.rejected, layout.errors, layout.samples):
        if d.is_dir():
            for path in d.glob("*.parquet"):
                if path.stem not in planned:
                    path.unlink(missing_ok=True)
                    removed.add(path.stem)
    return sorted(removed)


def reset_output(layout: OutputLayout) -> None:
    """Remove everything a job writes under OUT (for --overwrite)."""
    for d in layout.data_dirs():
        shutil.rmtree(d, ignore_errors=True)
    layout.manifest.unlink(missing_ok=True)


def remove_partition_files(layout: OutputLayout, name: str) -> None:
    """Drop the output files (and any stale record) of a partition that will be redone."""
    for d in (layout.kept, layout.rejected, layout.errors, layout.samples):
        (d / f"{name}.parquet").unlink(missing_ok=True)
    (layout.records / f"{name}.json").unlink(missing_ok=True)
