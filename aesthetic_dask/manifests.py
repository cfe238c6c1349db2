"""What ``manifest.json`` says: the full manifest written once at the end of a job, and the small
one written while it runs, from running totals (:class:`Tally`) kept as records arrive."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from . import histogram
from .error_reasons import merge_error_reasons
from .output import COUNT_KEYS
from .partition import Record


class Tally:
    """The job's running totals, kept as records arrive: what the manifest written while the job runs
    says, at a cost that does not grow with the partitions done (the full per-input manifest is
    built once, at the end)."""

    def __init__(self) -> None:
        self.totals = {k: 0 for k in COUNT_KEYS} | {"rows_unknown_partitions": 0}
        self.scores = np.zeros(len(histogram.EDGES) + 1, dtype=np.int64)

    def add(self, rec: Record, sign: int = 1) -> None:
        if rec.rows_in is None:
            self.totals["rows_unknown_partitions"] += sign
        else:
            for k in COUNT_KEYS:
                self.totals[k] += sign * (getattr(rec, k) or 0)
        if rec.histogram:
            self.scores += sign * np.asarray(rec.histogram, dtype=np.int64)


def full(job: Any, status: str) -> dict[str, Any]:
    """The final ``manifest.json`` of ``job`` (a :class:`job.Job`): per input, totals, histograms,
    error reasons, partitions and this run, from every counted record."""
    counted = [r for r in (job.records.get(n) or job.failures.get(n) for n in job.planned) if r is not None]
    counted += list(job.missing.values())
    per_input: dict[str, dict[str, Any]] = {}
    unknown = 0
    for rec in counted:
        entry = per_input.setdefault(
            rec.source, {k: 0 for k in COUNT_KEYS} | {"partitions_done": 0, "partitions_failed": 0}
        )
        if rec.rows_in is None:
            unknown += 1
            entry["rows_unknown_partitions"] = entry.get("rows_unknown_partitions", 0) + 1
        else:
            for k in COUNT_KEYS:
                entry[k] += getattr(rec, k)
        entry["partitions_failed" if rec.failure else "partitions_done"] += 1
        if rec.name in job.missing:
            entry["missing"] = True  # the input is gone; its output is kept
        if rec.failure:
            entry.setdefault("failures", []).append(rec.failure)
        if rec.note:
            entry.setdefault("notes", []).append(rec.note)
    totals = {k: sum(e[k] for e in per_input.values()) for k in COUNT_KEYS} | {"rows_unknown_partitions": unknown}
    scores = histogram.summary(histogram.merge([r.histogram for r in counted]))
    extra_columns = sorted({c for r in counted for c in r.extra_histograms})
    failing: dict[str, int] = {}
    for rec in counted:
        for criterion, n in (rec.rows_failing_filters or {}).items():
            failing[criterion] = failing.get(criterion, 0) + n
    processed = [r for r in (*job.records.values(), *job.failures.values()) if r.run_id == job.run_id]
    compute_s = job.timings.get("compute_s")
    return {
        "job": job.kind,
        "status": status,
        "fingerprint": job.fingerprint,
        "settings": job.settings,
        **job.info,
        "totals": totals,
        **({"rows_failing_filters": failing} if failing or job.settings.get("filters") else {}),
        "inputs": per_input,
        "score_histogram": {"edges": scores["edges"], "counts": scores["counts"]},
        "score_quantiles": scores["quantiles"],
        "extra_score_histograms": {
            c: histogram.summary(histogram.merge([r.extra_histograms.get(c) for r in counted]))
            for c in extra_columns
        },
        "error_reasons": merge_error_reasons([r.error_reasons for r in counted]),
        "failed_inputs": job.failed_inputs,
        "missing_inputs": sorted({r.source for r in job.missing.values()}),
        "duplicate_inputs": job.duplicate_inputs,
        "partitions": {
            "planned": len(job.planned),
            "done": len(job.records),
            "failed": len(job.failures),
            "done_names": [n for n in job.planned if n in job.records],
            "failed_names": [n for n in job.planned if n in job.failures],
            "missing": len(job.missing),
            "missing_names": sorted(job.missing),
        },
        "this_run": {
            "run_id": job.run_id,
            "partitions_processed": len(processed),
            "partitions_skipped": job.skipped,
            "partitions_new": job.new,
            "partitions_changed": len(job.changed),
            "changed_names": job.changed,
            **({"manifest_rebuilt_from_records": job.rebuilt_from} if job.rebuilt_from is not None else {}),
            "rows_processed": sum(r.rows_in or 0 for r in processed),
            "compute_s": compute_s,
        },
        "cluster": job.cluster,
        "lock": {"took_over": job.lock.took_over} if job.lock and job.lock.took_over else {},
        "timings": {**job.timings, "elapsed_s": round(time.time() - job.started, 3)},
        "started_at": datetime.fromtimestamp(job.started, timezone.utc).isoformat(),
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }


# Beyond this many planned partitions the running manifest counts them without naming them (the
# records name them): each write then costs the same at 100,000 partitions as at 100.
RUNNING_NAMES_MAX = 10_000


def running(job: Any) -> dict[str, Any]:
    """What ``manifest.json`` says while the job runs: status, settings, running totals and score
    histogram, partition counts (and names, up to :data:`RUNNING_NAMES_MAX` partitions), this run
    so far: no per-input entries, histograms or error reasons to merge (``inputs`` and the rest
    are written once, at the end; a re-run takes the finished partitions from their records,
    never from this). It is written at most every 2 s, and never more than 1/20 of the time
    (:meth:`job.Job.due`)."""
    return {
        "job": job.kind,
        "status": "running",
        "fingerprint": job.fingerprint,
        "settings": job.settings,
        **job.info,
        "totals": dict(job.tally.totals),
        "score_histogram": {"edges": histogram.EDGES, "counts": job.tally.scores.tolist()},
        "failed_inputs": job.failed_inputs,
        "partitions": {"planned": len(job.planned), "done": len(job.records), "failed": len(job.failures),
                       **({"done_names": [n for n in job.planned if n in job.records],
                           "failed_names": [n for n in job.planned if n in job.failures]}
                          if len(job.planned) <= RUNNING_NAMES_MAX else {"names": "OUT/_parts/ (the records)"}),
                       "missing": len(job.missing)},
        "this_run": {"run_id": job.run_id, "partitions_processed": job.processed[0],
                     "partitions_skipped": job.skipped, "partitions_new": job.new,
                     "partitions_changed": len(job.changed), "rows_processed": job.processed[1]},
        "cluster": job.cluster,
        "lock": {"took_over": job.lock.took_over} if job.lock and job.lock.took_over else {},
        "timings": {**job.timings, "elapsed_s": round(time.time() - job.started, 3)},
        "started_at": datetime.fromtimestamp(job.started, timezone.utc).isoformat(),
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }
