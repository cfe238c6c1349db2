"""``aesthetic-dask refilter OUT --threshold T``: re-split a finished job's rows at another threshold
from the scores it recorded, without CLIP or torch (the base install runs it).

Partition by partition, with the jobs' commit protocol: the new ``kept/`` (and ``rejected/``)
files are written whole (:func:`storage.atomic_open`), then the partition's record, with its new
counts and threshold, last. The manifest says ``refiltering`` until every partition is at the new
threshold, so a killed refilter is finished by running it again (it skips the partitions already
there) and no job re-run mistakes the mix for a finished OUT. Raising the threshold always works;
lowering it needs the rejected rows (a job run with ``--keep-rejected``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import provenance, storage
from .columns import SCORE_COLUMN
from .errors import EXIT_OK, InputError
from .job import fingerprint
from .lock import OutLock
from .output import OutputLayout, read_records, write_json, write_parquet, write_record
from .score import keep_mask
from .partition import Record

log = logging.getLogger("aesthetic_dask")


def refilter(out: str, threshold: float, storage_options: dict[str, Any] | None = None,
             report: bool = True) -> tuple[dict[str, Any], int]:
    """Re-split ``out``'s kept (and rejected) rows at ``threshold``; return (manifest, exit code).
    Notebook: ``ad.refilter(OUT, T)``."""
    import math

    if not math.isfinite(threshold):
        raise InputError(f"--threshold must be a finite number, got {threshold}")
    layout = OutputLayout(out, storage_options)
    text = layout.read_text(layout.manifest)
    if text is None:
        raise InputError(f"{layout.root_url}: no manifest.json; refilter works on the OUT of a finished job")
    manifest = json.loads(text)
    settings = manifest["settings"]
    recorded = manifest.get("refilter", {}).get("from", settings["score_threshold"])
    if manifest.get("status") == "running":
        raise InputError(f"{layout.root_url}: its job has not finished (status running); re-run the job first")
    if manifest.get("status") == "refiltering" and manifest["refilter"]["to"] != threshold:
        raise InputError(f"{layout.root_url} is being re-split at {manifest['refilter']['to']:g} (interrupted); "
                         f"finish that first: aesthetic-dask refilter {layout.root_url} --threshold {manifest['refilter']['to']:g}")
    if threshold < recorded and not settings.get("keep_rejected"):
        raise InputError(f"{layout.root_url}: lowering the threshold from {recorded:g} to {threshold:g} needs the rows "
                         "below it, and the job ran without --keep-rejected; re-run it with --keep-rejected "
                         "(or raise the threshold)")
    t0, run_id = time.perf_counter(), uuid.uuid4().hex[:12]
    lock = OutLock(layout, run_id)
    lock.acquire()  # no job writes OUT while it is re-split
    try:
        return _refilter_locked(layout, manifest, threshold, recorded, run_id, t0, storage_options, report)
    finally:
        lock.release()


def _refilter_locked(layout: OutputLayout, manifest: dict[str, Any], threshold: float, recorded: float, run_id: str,
                     t0: float, storage_options: dict[str, Any] | None, report: bool) -> tuple[dict[str, Any], int]:
    settings = manifest["settings"]
    status_before = manifest.get("refilter", {}).get("status_before", manifest["status"])
    manifest.update(status="refiltering", refilter={"from": recorded, "to": threshold, "status_before": status_before})
    write_json(layout.manifest, manifest, layout.tmp, layout.fs)

    existing = layout.existing()
    records = {name: Record.from_json(data) for name, data in read_records(layout, existing).items()}
    done = 0
    for name, rec in sorted(records.items()):
        if (rec.threshold if rec.threshold is not None else recorded) != threshold:
            _resplit(layout, rec, threshold, existing, bool(settings.get("keep_rejected")), run_id)
            rec.threshold, rec.run_id = threshold, run_id
            write_record(layout, rec.to_json())  # last: the partition is at the new threshold
            done += 1
        # A rejected file its record no longer lists (nothing below now): removed after the record.
        stale = storage.join(layout.rejected, f"{name}.parquet")
        if f"rejected/{name}.parquet" not in rec.files and stale in existing:
            layout.remove([stale])

    manifest = _recount(manifest, records.values())
    settings["score_threshold"] = threshold
    manifest["config"]["score_threshold"] = threshold
    manifest["fingerprint"] = fingerprint(settings)
    manifest["status"] = status_before
    manifest.pop("refilter", None)
    manifest["this_run"] = {"run_id": run_id, "refilter": {"from": recorded, "to": threshold},
                            "partitions_processed": done, "partitions_skipped": len(records) - done,
                            "rows_processed": 0, "compute_s": round(time.perf_counter() - t0, 3)}
    write_json(layout.manifest, manifest, layout.tmp, layout.fs)
    if report:
        from .report import write_report

        manifest["report"] = write_report(layout.root_url, storage_options=storage_options)
    layout.clear_tmp()
    return manifest, EXIT_OK


def _read(layout: OutputLayout, path: str, existing: set[str]) -> pa.Table | None:
    if path not in existing:
        return None
    with layout.fs.open(path, "rb") as f:
        return pq.read_table(f)


def _resplit(layout: OutputLayout, rec: Record, threshold: float, existing: set[str], keep_rejected: bool,
             run_id: str) -> None:
    """One partition's kept and rejected rows at ``threshold``, each file written whole, its
    provenance metadata stamped with the new threshold and this run."""
    kept_path = storage.join(layout.kept, f"{rec.name}.parquet")
    rejected_path = storage.join(layout.rejected, f"{rec.name}.parquet")
    parts = [t for t in (_read(layout, kept_path, existing), _read(layout, rejected_path, existing)) if t is not None]
    rows = pa.concat_tables(parts, promote_options="default") if parts else None
    if rows is None:
        return
    scores = rows.column(SCORE_COLUMN).to_numpy(zero_copy_only=False).astype(np.float32)
    keep = keep_mask(scores, np.zeros(len(scores), bool), threshold)  # kept and rejected rows hold no errors
    metadata = provenance.restamped(rows.schema.metadata, threshold, run_id)
    write_parquet(rows.filter(pa.array(keep)), layout, kept_path, metadata)
    rejected = f"rejected/{rec.name}.parquet"
    if keep_rejected:  # as the jobs write it: every partition's file, with no rows where none are below
        write_parquet(rows.filter(pa.array(~keep)), layout, rejected_path, metadata)
        if rejected not in rec.files:
            rec.files.append(rejected)
    elif rejected in rec.files:
        rec.files.remove(rejected)
    rec.rows_kept, rec.rows_below_threshold = int(keep.sum()), int((~keep).sum())


def _recount(manifest: dict[str, Any], records: Any) -> dict[str, Any]:
    """The manifest's kept and below counts (per input and in total) from the re-split records."""
    by_source: dict[str, list[Record]] = {}
    for rec in records:
        by_source.setdefault(rec.source, []).append(rec)
    for source, entry in manifest["inputs"].items():
        recs = by_source.get(source, [])
        if recs:
            entry["rows_kept"] = sum(r.rows_kept or 0 for r in recs)
            entry["rows_below_threshold"] = sum(r.rows_below_threshold or 0 for r in recs)
    totals = manifest["totals"]
    totals["rows_kept"] = sum(e["rows_kept"] for e in manifest["inputs"].values())
    totals["rows_below_threshold"] = sum(e["rows_below_threshold"] for e in manifest["inputs"].values())
    return manifest
