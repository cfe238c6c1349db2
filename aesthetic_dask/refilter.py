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

from .config import fingerprint
from .errors import EXIT_OK, InputError
from .filters import as_criteria
from .lock import OutLock, holding
from .output import OutputLayout
from .parquet_sink import ParquetSink, Resplit
from .partition import Record
from .records import read_records, write_index, write_record
from .shard_sink import ShardSink
from .sinks import unlisted
from .storage import write_json

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
    if manifest.get("status") in ("running", "interrupted"):
        raise InputError(f"{layout.root_url}: its job has not finished (status {manifest['status']}); re-run the job first")
    if manifest.get("status") == "refiltering" and manifest["refilter"]["to"] != threshold:
        raise InputError(f"{layout.root_url} is being re-split at {manifest['refilter']['to']:g} (interrupted); "
                         f"finish that first: aesthetic-dask refilter {layout.root_url} --threshold {manifest['refilter']['to']:g}")
    if threshold < recorded and settings.get("write_shards"):
        raise InputError(f"{layout.root_url}: lowering the threshold from {recorded:g} to {threshold:g} would add samples "
                         f"to the --write-shards tars in {settings['write_shards']} that they never held; re-run the "
                         "job at the lower threshold (--overwrite), or raise the threshold")
    if threshold < recorded and not settings.get("keep_rejected"):
        raise InputError(f"{layout.root_url}: lowering the threshold from {recorded:g} to {threshold:g} needs the rows "
                         "below it, and the job ran without --keep-rejected; re-run it with --keep-rejected "
                         "(or raise the threshold)")
    t0, run_id = time.perf_counter(), uuid.uuid4().hex[:12]
    lock = OutLock(layout, run_id)
    lock.acquire()  # no job writes OUT while it is re-split
    try:
        # Every file it commits (data files, records, index, manifest, report) checks the lease
        # first, as a job's tasks do: a refilter paused past a takeover writes nothing more.
        with holding(run_id, None, layout.url(), storage_options):
            return _refilter_locked(layout, manifest, threshold, recorded, run_id, t0, storage_options, report)
    finally:
        lock.release()


def _refilter_locked(layout: OutputLayout, manifest: dict[str, Any], threshold: float, recorded: float, run_id: str,
                     t0: float, storage_options: dict[str, Any] | None, report: bool) -> tuple[dict[str, Any], int]:
    settings = manifest["settings"]
    status_before = manifest.get("refilter", {}).get("status_before", manifest["status"])
    manifest.update(status="refiltering", refilter={"from": recorded, "to": threshold, "status_before": status_before})
    write_json(layout.manifest, manifest, layout.tmp, layout.fs)

    listing = layout.listing()
    existing = set(listing)
    records = {name: Record.from_json(data) for name, data in read_records(layout, listing).items()}
    criteria = as_criteria(settings.get("filters", ()))  # the job's --filter criteria hold at any threshold
    # The sinks the job wrote to (a ShardSink re-splits the tars its records list).
    sinks = (ParquetSink(),) + ((ShardSink(settings["write_shards"], {}),) if settings.get("write_shards") else ())
    done = 0
    for name, rec in sorted(records.items()):
        if (rec.threshold if rec.threshold is not None else recorded) != threshold:
            _resplit(layout, rec, threshold, criteria, existing, bool(settings.get("keep_rejected")), run_id, recorded,
                     sinks)
            rec.threshold, rec.run_id = threshold, run_id
            rec.job = fingerprint({**settings, "score_threshold": threshold}) if rec.job else None
            write_record(layout, rec.to_json())  # last: the partition is at the new threshold
            done += 1
        # A file its record no longer lists (a rejected file with nothing below now): removed after the record.
        layout.remove(unlisted(layout, name, rec.files, existing))

    manifest = _recount(manifest, records.values())
    settings["score_threshold"] = threshold
    manifest["config"]["score_threshold"] = threshold
    manifest["fingerprint"] = fingerprint(settings)
    manifest["status"] = status_before
    manifest.pop("refilter", None)
    if done:
        write_index(layout, {name: rec.to_json() for name, rec in records.items()})
    manifest["this_run"] = {"run_id": run_id, "refilter": {"from": recorded, "to": threshold},
                            "partitions_processed": done, "partitions_skipped": len(records) - done,
                            "rows_processed": 0, "compute_s": round(time.perf_counter() - t0, 3),
                            "elapsed_s": round(time.perf_counter() - t0, 3)}
    write_json(layout.manifest, manifest, layout.tmp, layout.fs)
    if report:
        from .report import write_report

        manifest["report"] = write_report(layout.root_url, storage_options=storage_options)
    layout.clear_tmp()
    return manifest, EXIT_OK


def _resplit(layout: OutputLayout, rec: Record, threshold: float, criteria: tuple[Any, ...], existing: set[str],
             keep_rejected: bool, run_id: str, recorded: float, sinks: tuple[Any, ...]) -> None:
    """One partition's files at ``threshold``, sink by sink (:meth:`parquet_sink.ParquetSink.resplit`,
    :meth:`shard_sink.ShardSink.resplit`). The counts are set on ``rec``, whose record the caller
    writes last."""
    how = Resplit(layout, threshold, criteria, rec.threshold if rec.threshold is not None else recorded, run_id,
                  keep_rejected, existing)
    for sink in sinks:
        sink.resplit(rec, how)


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
