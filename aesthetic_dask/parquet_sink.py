"""The Parquet sink: each partition's ``kept/`` and ``rejected/`` rows (split by the keep rule,
:mod:`.filters`) and its ``errors/`` rows (where each came from, and why). One file per
directory per partition, named after it, every directory's files with one schema
(:func:`output.uniform`). The report's ``samples/`` are their own sink (:class:`samples.SamplesSink`).

``refilter`` re-splits a partition's kept and rejected files at another threshold (:meth:`ParquetSink.resplit`)
from the rows they hold: the scores are recorded, so neither the inputs nor CLIP are needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import histogram, provenance, storage
from .error_reasons import error_reasons
from .columns import ERROR_COLUMN, ROW_COLUMN, SCORE_COLUMN, SOURCE_COLUMN
from .errors import InputError
from .filters import failing, table_keep_mask
from .output import NamedFiles, OutputLayout, WriteOptions, rows_to_write, uniform, write_parquet


@dataclass(frozen=True)
class Resplit:
    """A refilter's move of one partition's files to ``threshold`` (with the job's ``criteria``)."""

    layout: OutputLayout
    threshold: float
    criteria: tuple[Any, ...]
    at: float  # the threshold its files are split at now (its record's)
    run_id: str
    keep_rejected: bool
    existing: set[str]  # OUT's listing: no request per file


class ParquetSink(NamedFiles):
    """``kept/``, ``rejected/`` (``--keep-rejected``) and ``errors/``: every job's first sink,
    whose counts make the partition's record."""

    directories = ("kept", "rejected", "errors")

    def write(self, part: Any, scored: Any, record: Any, layout: OutputLayout, opts: WriteOptions) -> None:
        record.wrote(split_and_write(scored.table, scored.rows, part.name, part.source, layout, opts, scored.keep,
                                     scored.is_error))

    def resplit(self, record: Any, how: Resplit) -> None:
        """One partition's rows at ``how.threshold``: every file written whole, the one that grows
        first (see :func:`partition_rows`), each stamped with the new threshold and the run. The
        counts are set on ``record``, which the caller writes last."""
        layout, name = how.layout, record.name
        kept_path = storage.join(layout.kept, f"{name}.parquet")
        rejected_path = storage.join(layout.rejected, f"{name}.parquet")
        rows = partition_rows(_read_split(layout, kept_path, how.existing, how.at),
                              _read_split(layout, rejected_path, how.existing, how.at), layout.url("kept", f"{name}.parquet"))
        # Scored rows (kept or below) do not change; without the rejected file, the below ones are
        # only counted: all that were below before, and what this split moves below.
        scored = (record.rows_kept or 0) + (record.rows_below_threshold or 0)
        if rows is not None:
            keep = table_keep_mask(rows, how.threshold, how.criteria)[0]
            metadata = provenance.restamped(rows.schema.metadata, how.threshold, how.run_id)
            writes = [(kept_path, rows.filter(pa.array(keep)))]
            rejected = f"rejected/{name}.parquet"
            if how.keep_rejected:  # as the jobs write it: every partition's file, with no rows where none are below
                writes.append((rejected_path, rows.filter(pa.array(~keep))))
                if rejected not in record.files:
                    record.files.append(rejected)
            elif rejected in record.files:
                record.files.remove(rejected)
            for path, table in (reversed(writes) if how.threshold > how.at else writes):  # the file that grows first
                write_parquet(table, layout, path, metadata)
            record.rows_kept = int(keep.sum())
        record.rows_below_threshold = scored - (record.rows_kept or 0)


def error_columns(columns: pa.Schema | None) -> pa.Schema | None:
    """The leading columns of every ``errors/`` file: where the row came from, then the data's."""
    if columns is None:
        return None
    data = [f for f in columns if f.name not in (SOURCE_COLUMN, ROW_COLUMN)]
    return pa.schema([pa.field(SOURCE_COLUMN, pa.string()), pa.field(ROW_COLUMN, pa.int64()), *data])


def split_and_write(
    table: pa.Table,
    rows: np.ndarray,
    name: str,
    source: str,
    layout: OutputLayout,
    opts: WriteOptions,
    keep: np.ndarray,
    is_error: np.ndarray,
) -> dict[str, Any]:
    """Write the kept, rejected and error rows of one scored partition; return its record's counts.

    ``table`` has ``aesthetic_score`` and ``error`` columns; ``keep`` and ``is_error`` are the
    keep rule's masks over it (:func:`filters.table_keep_mask`); ``rows`` gives each row's
    position in its source. The record also carries the partition's score histogram(s) and its
    error reasons.
    """
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
        reasons = error_reasons(err.column(ERROR_COLUMN), keys)
    scores = table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False)
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


def _read_split(layout: OutputLayout, path: str, existing: set[str], at: float) -> tuple[pa.Table, float] | None:
    """A partition's kept or rejected file, with the threshold it was split at: its provenance
    stamp (a refilter killed between a partition's two files leaves them at different thresholds),
    else ``at``, its record's."""
    if path not in existing:
        return None
    with layout.fs.open(path, "rb") as f:
        table = pq.read_table(f)
    stamp = json.loads((table.schema.metadata or {}).get(provenance.KEY, b"{}")).get("score_threshold")
    return table, float(stamp) if stamp is not None else at


def partition_rows(kept: tuple[pa.Table, float] | None, rejected: tuple[pa.Table, float] | None,
                   where: str) -> pa.Table | None:
    """Every scored row of a partition, once, from its kept file (split at ``t_k``: rows >= t_k) and
    its rejected file (at ``t_r``: rows < t_r). A refilter writes the file that grows first, so a
    kill between the two leaves them overlapping (t_k <= t_r: the kept rows below t_r are also in
    rejected, and are taken from there), never apart."""
    if kept is None or rejected is None:
        found = kept or rejected
        return None if found is None else found[0]
    (k, t_k), (r, t_r) = kept, rejected
    if t_k > t_r:  # rows in [t_r, t_k) are in neither file
        raise InputError(f"{where}: its kept rows are split at {t_k:g} and its rejected rows at {t_r:g}; the rows "
                         "between are in neither file: re-run the job with --overwrite to recompute them")
    return pa.concat_tables([k.filter(pa.array(table_keep_mask(k, t_r)[0])), r], promote_options="default")
