"""Running a job's partitions on a Dask cluster: prepare OUT, submit, collect, finish.

Both jobs (``score`` and ``run``) plan a list of parts and a pure ``process(part, **kwargs)`` that
reads, scores and writes one partition and returns its record (:mod:`aesthetic_dask.partition`).
This module is generic over them:

- :meth:`Job.prepare` checks OUT belongs to this job, removes what no longer belongs to its plan,
  and returns the partitions finished before (their completion markers);
- :func:`submit_parts` runs the rest with ``client.submit``, keys named after the partitions
  (visible on the dashboard), a bounded number in flight, and retries;
- :func:`collect` turns results and task exceptions into records, logs and progress;
- :meth:`Job.finish` decides status and exit code from the whole OUT (:func:`errors.job_outcome`)
  and writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from . import histogram, samples
from .errors import FAILURE_ERROR, InputError, job_outcome
from .output import COUNT_KEYS, OutputLayout, read_records, remove_partition_files, remove_unplanned, reset_output, write_json
from .partition import failed_record

log = logging.getLogger("aesthetic_dask")

# Lines of unreadable inputs and failed partitions the summary shows before "and N more".
SUMMARY_FAILURES = 5


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Work:
    """Parts that one process function handles, with the keyword arguments it takes."""

    parts: list[Any]
    process: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any]


@dataclass
class Job:
    """One job over one OUT directory."""

    kind: str
    layout: OutputLayout
    settings: dict[str, Any]  # everything the output depends on (config.output_settings)
    info: dict[str, Any]  # recorded in the manifest, not compared (config, weights, versions)
    failed_inputs: dict[str, str] = field(default_factory=dict)
    duplicate_inputs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished partitions
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # failed in this run
    planned: list[str] = field(default_factory=list)
    skipped: int = 0  # finished by an earlier run
    cluster: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # tells this run's records apart
    report: bool = True  # write OUT/report.html at the end
    _last_manifest: float = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def prepare(self, planned: list[str], overwrite: bool) -> set[str]:
        """Make OUT this job's; return the names of the planned partitions still to run.

        Refuses an OUT written by a different job (unless ``overwrite``), removes what no longer
        belongs to the plan and the leftovers of unfinished partitions, and keeps the records of
        finished ones (resume trusts those markers alone).
        """
        layout = self.layout
        if len(set(planned)) != len(planned):
            raise InputError("two inputs map to the same output name; give each input once")
        old_text = None if overwrite else layout.read_text(layout.manifest)
        if overwrite:
            reset_output(layout)
        elif old_text is not None:
            try:
                old = json.loads(old_text)
            except ValueError:
                old = {}
            if old.get("fingerprint") != self.fingerprint:
                before = old.get("settings", {})
                changed = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
                raise InputError(
                    f"{layout.root_url} holds the output of a different job (changed: {', '.join(changed) or 'unknown'}); "
                    "pass --overwrite to replace it, or choose another output directory"
                )
        existing = layout.existing()
        if old_text is None and not overwrite and any(
                p.rsplit("/", 1)[0] in (layout.kept, layout.rejected, layout.errors) for p in existing):
            raise InputError(f"{layout.root_url} holds files but no manifest.json; pass --overwrite to replace them")
        layout.clear_tmp()  # orphans of a killed run
        if layout.local:
            os.makedirs(layout.root, exist_ok=True)
        self.planned = list(planned)
        planned_set = set(planned)
        removed = remove_unplanned(layout, planned_set, existing)
        if removed:
            log.info("removed the output of %d partitions this job no longer plans", len(removed))
            existing = layout.existing()
        self.records = {k: v for k, v in read_records(layout, existing).items() if k in planned_set}
        todo = {name for name in planned if name not in self.records}
        remove_partition_files(layout, todo, existing)
        self.skipped = len(planned) - len(todo)
        return todo

    def add(self, record: dict[str, Any]) -> None:
        """A partition's record from this run: finished, or failed."""
        if record.get("failure"):
            self.failures[record["name"]] = record
            self.records.pop(record["name"], None)
        else:
            self.records[record["name"]] = record
            self.failures.pop(record["name"], None)

    def outcome(self) -> tuple[str, int]:
        kinds = [r.get("failure_kind", FAILURE_ERROR) for r in self.failures.values()]
        return job_outcome(len(self.planned), len(self.records), kinds, len(self.failed_inputs))

    def manifest(self, status: str) -> dict[str, Any]:
        counted = [r for r in (self.records.get(n) or self.failures.get(n) for n in self.planned) if r is not None]
        per_input: dict[str, dict[str, Any]] = {}
        unknown = 0
        for rec in counted:
            entry = per_input.setdefault(
                rec["source"], {k: 0 for k in COUNT_KEYS} | {"partitions_done": 0, "partitions_failed": 0}
            )
            if rec["rows_in"] is None:
                unknown += 1
                entry["rows_unknown_partitions"] = entry.get("rows_unknown_partitions", 0) + 1
            else:
                for k in COUNT_KEYS:
                    entry[k] += rec[k]
            entry["partitions_failed" if rec.get("failure") else "partitions_done"] += 1
            if rec.get("failure"):
                entry.setdefault("failures", []).append(rec["failure"])
            if rec.get("note"):
                entry.setdefault("notes", []).append(rec["note"])
        totals = {k: sum(e[k] for e in per_input.values()) for k in COUNT_KEYS} | {"rows_unknown_partitions": unknown}
        scores = histogram.summary(histogram.merge([r.get("histogram") for r in counted]))
        extra_columns = sorted({c for r in counted for c in r.get("extra_histograms", {})})
        processed = [r for r in (*self.records.values(), *self.failures.values()) if r.get("run_id") == self.run_id]
        compute_s = self.timings.get("compute_s")
        return {
            "job": self.kind,
            "status": status,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            **self.info,
            "totals": totals,
            "inputs": per_input,
            "score_histogram": {"edges": scores["edges"], "counts": scores["counts"]},
            "score_quantiles": scores["quantiles"],
            "extra_score_histograms": {
                c: histogram.summary(histogram.merge([r.get("extra_histograms", {}).get(c) for r in counted]))
                for c in extra_columns
            },
            "error_reasons": samples.merge_error_reasons([r.get("error_reasons") for r in counted]),
            "failed_inputs": self.failed_inputs,
            "duplicate_inputs": self.duplicate_inputs,
            "partitions": {
                "planned": len(self.planned),
                "done": len(self.records),
                "failed": len(self.failures),
                "done_names": [n for n in self.planned if n in self.records],
                "failed_names": [n for n in self.planned if n in self.failures],
            },
            "this_run": {
                "run_id": self.run_id,
                "partitions_processed": len(processed),
                "partitions_skipped": self.skipped,
                "rows_processed": sum(r["rows_in"] or 0 for r in processed),
                "compute_s": compute_s,
            },
            "cluster": self.cluster,
            "timings": {**self.timings, "elapsed_s": round(time.time() - self.started, 3)},
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "updated_at": datetime.now(timezone.utc).isoformat(),
        }

    def write_manifest(self, status: str) -> dict[str, Any]:
        manifest = self.manifest(status)
        write_json(self.layout.manifest, manifest, self.layout.tmp, self.layout.fs)
        self._last_manifest = time.time()
        return manifest

    def finish(self) -> tuple[dict[str, Any], int]:
        """Status and exit code from the whole OUT; the final manifest and report; no temporary files left."""
        status, code = self.outcome()
        manifest = self.write_manifest(status)
        if self.report:
            from .report import write_report

            t0 = time.perf_counter()
            try:
                manifest["report"] = write_report(self.layout.root_url, storage_options=self.layout.storage_options)
            except Exception:  # noqa: BLE001 - the data is written; a report failure must not fail the job
                log.error("could not write the report", exc_info=True)
            self.timings["report_s"] = round(time.perf_counter() - t0, 3)
        self.layout.clear_tmp()
        return manifest, code


def _call(process: Callable[..., dict[str, Any]], part: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task: one partition through its process function."""
    return process(part, **kwargs)


def submit_parts(
    client: Any,
    tasks: list[tuple[Any, Work]],
    run_id: str,
    kind: str,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    max_in_flight: int = 64,
) -> Iterator[tuple[Any, dict[str, Any] | None, BaseException | None]]:
    """Run each ``(part, work)`` as one task; yield ``(part, record, None)`` or ``(part, None, exception)``.

    At most ``max_in_flight`` tasks exist at once, so a job over 10^6 shards holds a bounded
    graph. Keys are ``(aesthetic-KIND-RUNID, partition name)``: grouped and named on the dashboard,
    and never shared with another job on the same cluster.
    """
    from distributed import as_completed

    prefix = f"aesthetic-{kind}-{run_id}"
    pending = iter(tasks)
    by_key: dict[Any, Any] = {}
    running = as_completed()

    def top_up() -> None:
        while running.count() < max_in_flight:
            try:
                part, work = next(pending)
            except StopIteration:
                return
            future = client.submit(_call, work.process, part, work.kwargs, key=(prefix, part.name),
                                   retries=retries, resources=resources, pure=False)
            by_key[future.key] = part
            running.add(future)

    top_up()
    for future in running:
        part = by_key.pop(future.key)
        if future.status == "finished":
            yield part, future.result(), None
        else:
            try:
                exc = future.exception()
            except BaseException as cancelled:  # noqa: BLE001 - a cancelled future raises instead
                exc = cancelled
            yield part, None, exc
        future.release()
        top_up()


def run_parts(
    job: Job,
    client: Any,
    work: list[Work],
    overwrite: bool = False,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    progress: bool = True,
    unit: str = "rows",
) -> tuple[dict[str, Any], int]:
    """Run every unfinished part of ``work`` on ``client``; return (manifest, exit code)."""
    todo_names = job.prepare([p.name for w in work for p in w.parts], overwrite)
    tasks = [(p, w) for w in work for p in w.parts if p.name in todo_names]
    log.info("%d partitions planned, %d finished before, %d to run", len(job.planned), job.skipped, len(tasks))
    job.cluster = cluster_info(client)
    start_line = (f"aesthetic-dask {job.kind}: {len(tasks):,} of {len(job.planned):,} partitions to run on "
                  f"{job.cluster.get('scheduler_address')} ({job.cluster.get('workers')} workers, "
                  f"{job.cluster.get('threads')} threads); dashboard: {job.cluster.get('dashboard_link') or 'none'}")
    if progress:
        print(start_line, file=sys.stderr)
    else:
        log.info(start_line)
    job.write_manifest("running")
    threads = max(1, job.cluster.get("threads") or 1)
    t0 = time.perf_counter()
    bar = _Progress(len(tasks), progress, unit)
    for part, record, exc in submit_parts(client, tasks, job.run_id, job.kind, retries, resources, max(8, 4 * threads)):
        collect(job, part, record, exc)
        bar.update(job.records.get(part.name) or job.failures.get(part.name))
        if time.time() - job._last_manifest > 2:
            job.write_manifest("running")
    bar.close()
    job.timings["compute_s"] = round(time.perf_counter() - t0, 3)
    return job.finish()


def collect(job: Job, part: Any, record: dict[str, Any] | None, exc: BaseException | None) -> None:
    """Record one partition's result; a task exception becomes a failed record with its reason."""
    if record is None:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("partition %s (%s) failed: %s", part.name, part.source, reason)
        record = failed_record(part, reason, FAILURE_ERROR)
    elif record.get("failure"):
        log.warning("partition %s: %s", part.name, record["failure"])
    record["run_id"] = job.run_id
    job.add(record)
    log.info(
        "partition %s: %s in, %s kept, %s below, %s errors (%.2fs)",
        record["name"], record["rows_in"], record["rows_kept"], record["rows_below_threshold"], record["rows_error"],
        record["seconds"],
    )


def cluster_info(client: Any) -> dict[str, Any]:
    """Which cluster ran the job (for the manifest and the summary)."""
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        return {
            "scheduler_address": info.get("address") or client.scheduler.address,
            "dashboard_link": _dashboard_link(client),
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
        }
    except Exception:  # noqa: BLE001 - informational only
        log.debug("cannot describe the cluster", exc_info=True)
        return {}


def _dashboard_link(client: Any) -> str | None:
    """The dashboard's link, or None where the scheduler serves none (a local cluster started
    without one still answers HTTP, on a port that has no dashboard)."""
    spec = getattr(getattr(client, "cluster", None), "scheduler_spec", None) or {}
    if spec.get("options", {}).get("dashboard") is False:
        return None
    try:
        return client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
    except Exception:  # noqa: BLE001
        return None


class _Progress:
    """Partitions done, and rows (or images) processed with their rate, on a terminal."""

    def __init__(self, total: int, enabled: bool, unit: str) -> None:
        self.bar = None
        self.rows = 0
        self.unit = unit
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="part", desc="partitions", file=sys.stderr)

    def update(self, record: dict[str, Any] | None) -> None:
        self.rows += (record or {}).get("rows_in") or 0
        if self.bar is not None:
            rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.rows:,} {self.unit}, {rate:,.0f} {self.unit}/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(manifest: dict[str, Any], out: Path, unit: str = "rows") -> str:
    """The one-screen end-of-job summary."""
    t = manifest["totals"]
    parts = manifest["partitions"]
    run = manifest.get("this_run", {})
    rows_in = f"{t['rows_in']:,}"
    if t.get("rows_unknown_partitions"):
        rows_in += f" (+ rows unknown in {t['rows_unknown_partitions']} failed partitions)"
    processed, compute_s = run.get("rows_processed", 0), run.get("compute_s") or 0
    if run.get("partitions_processed"):
        throughput = f"{processed / max(compute_s, 1e-9):,.0f} {unit}/s ({processed:,} {unit} processed in {compute_s:.1f}s)"
    else:
        throughput = "nothing processed in this run"
    rows = [
        (f"{unit} in", rows_in),
        ("kept (>= threshold)", f"{t['rows_kept']:,}"),
        ("below threshold", f"{t['rows_below_threshold']:,}"),
        ("errors", f"{t['rows_error']:,}"),
        ("partitions", f"{parts['planned']:,} planned: {run.get('partitions_processed', 0):,} run now, "
                       f"{run.get('partitions_skipped', 0):,} skipped (finished before), {parts['failed']:,} failed"),
        ("throughput", throughput),
        ("elapsed", f"{manifest['timings'].get('elapsed_s', 0):.1f}s"),
        ("output", f"{str(out).rstrip('/')}/kept"),
        ("manifest", f"{str(out).rstrip('/')}/manifest.json"),
    ]
    if manifest.get("cluster", {}).get("dashboard_link"):
        rows.append(("dashboard", manifest["cluster"]["dashboard_link"]))
    lines = [f"aesthetic-dask {manifest['job']}: {manifest['status']}"] + [f"  {k + ':':<22}{v}" for k, v in rows]
    if manifest.get("report"):
        lines.append(f"  {'report:':<22}{manifest['report']}")
    lines += threshold_warning(manifest)
    if manifest.get("duplicate_inputs"):
        lines.append(f"  {'inputs named twice:':<22}{len(manifest['duplicate_inputs'])} (each read once)")
    problems = [f"unreadable input: {path}: {reason}" for path, reason in manifest.get("failed_inputs", {}).items()]
    problems += [f"failed partition: {source}: {reason.removeprefix(source + ': ')}"
                 for source, entry in manifest["inputs"].items() for reason in entry.get("failures", [])]
    lines += [f"  {p}" for p in problems[:SUMMARY_FAILURES]]
    if len(problems) > SUMMARY_FAILURES:
        lines.append(f"  ... and {len(problems) - SUMMARY_FAILURES} more (see manifest failed_inputs and inputs.*.failures)")
    return "\n".join(lines)


def threshold_warning(manifest: dict[str, Any]) -> list[str]:
    """Lines warning that the threshold kept more than 99% or less than 1% of the scored rows, with
    what other thresholds would keep (from the exact histogram)."""
    counts = manifest.get("score_histogram", {}).get("counts")
    scored = sum(counts) if counts else 0
    if not scored:
        return []
    kept = manifest["totals"]["rows_kept"]
    if 0.01 <= kept / scored <= 0.99:
        return []
    threshold = manifest["config"]["score_threshold"]
    options = ", ".join(f"{t:.1f} keeps {histogram.kept_at(counts, t):,} ({histogram.kept_at(counts, t) / scored:.1%})"
                        for t in (5.0, 5.5, 6.0, 6.5))
    return [f"  warning: threshold {threshold:g} kept {kept / scored:.1%} of the scored rows (scores land roughly in 1..10);",
            f"           instead {options}"]
