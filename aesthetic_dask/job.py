"""Running a job's partitions on a Dask cluster: prepare OUT, submit, collect, finish.

Both jobs (``score`` and ``run``) plan a list of parts and a pure ``process(part, **kwargs)`` that
reads, scores and writes one partition and returns its record (:mod:`aesthetic_dask.partition`).
This module is generic over them:

- :meth:`Job.prepare` checks OUT belongs to this job, removes what no longer belongs to its plan,
  and returns the partitions finished before (their completion markers);
- :func:`submit.submit_parts` runs the rest with ``client.submit``, keys named after the
  partitions (visible on the dashboard), a bounded number in flight, and retries;
- :func:`collect` turns results and task exceptions into records, logs and progress;
- :meth:`Job.finish` decides status and exit code from the whole OUT (:func:`errors.job_outcome`)
  and writes the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import interrupts, logs, manifests, versions
from .config import fingerprint
from .errors import EXIT_FAILED, FAILURE_ERROR, InputError, job_outcome
from .output import OutputLayout, partition_files
from .sinks import PARTITION_DIRS, remove_partitions, remove_unplanned, reset_output, written_by_a_job
from .storage import write_json
from .records import collector_paused, read_records, read_records_counted, write_footers, write_index
from .lock import OutLock, check_held
from .partition import Record
from .submit import Progress, cluster_info, submit_parts

log = logging.getLogger("aesthetic_dask")


@dataclass
class Work:
    """Parts that one process function handles, with the keyword arguments it takes."""

    parts: list[Any]
    process: Callable[..., Any]  # part, **kwargs -> partition.Record
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
    records: dict[str, Record] = field(default_factory=dict)  # finished partitions
    failures: dict[str, Record] = field(default_factory=dict)  # failed in this run
    planned: list[str] = field(default_factory=list)
    skipped: int = 0  # finished by an earlier run
    new: int = 0  # planned for the first time (the inputs grew)
    changed: list[str] = field(default_factory=list)  # finished before, input changed since: redone
    missing: dict[str, Record] = field(default_factory=dict)  # inputs gone: their output is kept
    lock: OutLock | None = None  # this job's lease on OUT, from prepare() to the end
    cluster: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # tells this run's records apart
    report: bool = True  # write OUT/report.html at the end
    note: str | None = None  # a warning to say before the work (a threshold outside the head's range)
    rebuilt_from: int | None = None  # manifest.json was lost or torn: rebuilt from this many records
    records_read: int = 0  # records read from their own files, not the index: the index is rewritten
    footers: dict[str, list[Any]] | None = None  # the inputs' footers as planned: kept in OUT for the next run
    footers_changed: bool = False
    tally: manifests.Tally = field(default_factory=manifests.Tally)  # totals of the counted records, kept as they arrive
    processed: list[int] = field(default_factory=lambda: [0, 0])  # this run's partitions and rows
    finished: bool = False  # the final manifest and report are written
    _last_manifest: float = 0.0
    _manifest_cost: float = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    @collector_paused()  # the listing and the records are built into many objects at once
    def prepare(self, parts: list[Any], sources: set[str], overwrite: bool, prune_missing: bool = False) -> set[str]:
        """Make OUT this job's; return the names of the planned partitions still to run.

        ``parts``: the planned partitions (their ``name``, ``identity`` and ``source``); ``sources``:
        every input listed now. Refuses an OUT written by a different job (unless ``overwrite``); the inputs
        may grow, and new partitions are simply run. A finished partition whose input changed
        since it was read is redone. The output of an input that is gone is kept (listed as
        missing) unless ``prune_missing``; what no longer belongs to the plan otherwise, and the
        leftovers of unfinished partitions, are removed. Resume trusts the completion records alone.
        """
        layout = self.layout
        planned: dict[str, tuple[str | None, str]] = {}
        for p in parts:
            if p.name in planned:
                raise InputError(f"inputs {planned[p.name][1]} and {p.source} map to the same output name {p.name}; "
                                 "give each input once")
            planned[p.name] = (p.identity, str(p.source))
        listing = layout.listing()  # the one listing of OUT this job needs (with the details the record index checks)
        self._check_only_ours(set(listing))  # before anything is written there, the lock included
        self.lock = OutLock(layout, self.run_id)
        self.lock.acquire()  # one job per OUT: what follows is decided by this job alone
        try:
            return self._prepare_locked(planned, sources, overwrite, prune_missing, listing)
        except BaseException:
            self.lock.release()
            raise

    def _prepare_locked(self, planned: dict[str, tuple[str | None, str]], sources: set[str], overwrite: bool,
                        prune_missing: bool, listing: dict[str, dict[str, Any]]) -> set[str]:
        layout = self.layout
        old_text = None if overwrite else layout.read_text(layout.manifest)
        old: dict[str, Any] = {}
        if overwrite:
            reset_output(layout)
        elif old_text is not None:
            try:
                old = json.loads(old_text)
            except ValueError:
                old = {"torn": True}
            if not old.get("torn"):
                self._check_same_job(old)
        existing = layout.listing() if overwrite else listing
        if not overwrite and (old_text is None or old.get("torn")):
            self._check_records_are_ours(existing, "unreadable" if old_text is not None else "missing")
            old = {}
        logs.accept_out()  # OUT is this job's now: its job.log may be written there
        layout.clear_tmp()  # orphans of a killed run
        if layout.local:
            os.makedirs(layout.root, exist_ok=True)
        found, self.records_read = read_records_counted(layout, existing)
        complete = {k: Record.from_json(v) for k, v in found.items()}
        # A curated dataset does not shrink because a source moved: a gone input's output stays.
        self.missing = {} if prune_missing else {
            name: rec for name, rec in complete.items() if name not in planned and rec.source and rec.source not in sources}
        listed = {name: rec.files for name, rec in complete.items()}  # where sinks wrote outside OUT (tars)
        removed = remove_unplanned(layout, set(planned) | set(self.missing), existing, listed)
        if removed:
            log.info("removed the output of %d partitions this job no longer plans", len(removed))
            existing = layout.listing()
            self.records_read += len(removed)  # the index lists them: rewrite it
        self.records = {}
        # Inputs read before that are not what they were: a finished partition of one is redone,
        # never skipped (and one whose rows moved, a Parquet file that grew, has new names).
        changed_inputs = {rec.source for name, rec in complete.items() if name not in planned and rec.source in sources}
        for name, rec in complete.items():
            if name in planned:
                identity = planned[name][0]
                if rec.input is not None and identity is not None and not versions.same_version(rec.input, identity):
                    changed_inputs.add(rec.source)
                else:
                    self.records[name] = rec
        todo = {name for name in planned if name not in self.records}
        self.changed = sorted(name for name in todo if planned[name][1] in changed_inputs)
        remove_partitions(layout, todo, existing, listed)
        self.planned = list(planned)
        self.skipped = len(planned) - len(todo)
        # Seen before: finished (its record) or failed (the last manifest's names; the running one has them too).
        before = set(complete) | set(old.get("partitions", {}).get("failed_names", []))
        self.new = sum(1 for name in todo if name not in before and name not in self.changed)
        for rec in (*self.records.values(), *self.missing.values()):
            self.tally.add(rec)
        return todo

    def _check_records_are_ours(self, existing: set[str], manifest: str) -> None:
        """With manifest.json ``manifest`` (missing or unreadable), the partition records are the
        truth: if every one is this job's (its fingerprint), the job resumes from them and the
        manifest is rebuilt; files of unknown or other jobs are refused, never removed."""
        layout = self.layout
        records = read_records(layout, existing)
        jobs = {rec.get("job") for rec in records.values()}
        if records and jobs == {self.fingerprint}:
            log.warning("%s: manifest.json was %s; rebuilt from its %d partition records", layout.root_url, manifest,
                        len(records))
            self.rebuilt_from = len(records)
            return
        if not partition_files(layout, (*PARTITION_DIRS, "_parts"), None, existing):
            return  # nothing written yet
        whose = ("records of a different job" if records and None not in jobs else
                 "no partition record naming this job")
        raise InputError(f"{layout.root_url} holds files but its manifest.json is {manifest} and it has {whose}; "
                         "pass --overwrite to replace them, or choose another output directory")

    def _check_only_ours(self, existing: set[str]) -> None:
        """Refuse an OUT holding anything a job did not write: nothing of the user's is ever removed."""
        foreign = sorted(p for p in existing if not written_by_a_job(self.layout, p))
        if foreign:
            layout = self.layout
            shown = ", ".join(p.removeprefix(layout.root + "/") for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise InputError(f"{layout.root_url} holds files no aesthetic-dask job wrote ({shown}{more}); a job's OUT "
                             "holds only its output (--overwrite removes only that), so nothing was touched: "
                             "choose another output directory")

    def _check_same_job(self, old: dict[str, Any]) -> None:
        """Refuse an OUT of another job, one-line, naming what differs (and `refilter` when only
        the threshold does)."""
        root = self.layout.root_url
        if old.get("status") == "refiltering":
            target = old.get("refilter", {}).get("to")
            raise InputError(f"{root} is being re-split at threshold {target} (or that was interrupted): finish it with "
                             f"`aesthetic-dask refilter {root} --threshold {target}` first")
        if old.get("fingerprint") == self.fingerprint:
            return
        before = old.get("settings", {})
        changed = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
        if changed == ["score_threshold"]:
            new = self.settings["score_threshold"]
            raise InputError(
                f"{root} holds this job's output at threshold {before['score_threshold']:g}; to re-split it at {new:g} from "
                f"the recorded scores (no CLIP, minutes not hours) run `aesthetic-dask refilter {root} --threshold {new:g}`, "
                "or pass --overwrite to recompute it")
        raise InputError(
            f"{root} holds the output of a different job (changed: {', '.join(changed) or 'unknown'}); "
            "pass --overwrite to replace it, or choose another output directory"
        )

    def add(self, record: Record) -> None:
        """A partition's record from this run: finished, or failed."""
        before = self.records.get(record.name) or self.failures.get(record.name)
        if before is not None:
            self.tally.add(before, -1)
        self.tally.add(record)
        if record.run_id == self.run_id:
            self.processed[0] += 1
            self.processed[1] += record.rows_in or 0
        if record.failure:
            self.failures[record.name] = record
            self.records.pop(record.name, None)
        else:
            self.records[record.name] = record
            self.failures.pop(record.name, None)

    def outcome(self) -> tuple[str, int]:
        kinds = [r.failure_kind or FAILURE_ERROR for r in self.failures.values()]
        return job_outcome(len(self.planned), len(self.records), kinds, len(self.failed_inputs))

    def manifest(self, status: str) -> dict[str, Any]:
        return manifests.full(self, status)

    def running_manifest(self) -> dict[str, Any]:
        return manifests.running(self)

    def write_running(self) -> None:
        """The running manifest (:meth:`running_manifest`), written whole."""
        t0 = time.perf_counter()
        if self.lock is not None:
            check_held(self.layout, self.run_id)
        write_json(self.layout.manifest, self.running_manifest(), self.layout.tmp, self.layout.fs, durable=False,
                   indent=self.manifest_indent)
        self._last_manifest, self._manifest_cost = time.time(), time.perf_counter() - t0

    @property
    def manifest_indent(self) -> int | None:
        """Indented for reading by eye up to 1,000 partitions; on one line beyond (see write_json)."""
        return 2 if len(self.planned) <= 1000 else None

    def due(self) -> bool:
        """Whether the running manifest is due: 2 s since the last, and 20 times what that one cost."""
        return time.time() - self._last_manifest > max(2.0, 20 * self._manifest_cost)

    def write_manifest(self, status: str) -> dict[str, Any]:
        if self.lock is not None:
            check_held(self.layout, self.run_id)
        manifest = self.manifest(status)
        write_json(self.layout.manifest, manifest, self.layout.tmp, self.layout.fs, indent=self.manifest_indent)
        self._last_manifest = time.time()
        return manifest

    def finish(self) -> tuple[dict[str, Any], int]:
        """Status and exit code from the whole OUT; the final manifest and report; no temporary files left."""
        with interrupts.deferred():  # a first signal waits: never a manifest saying done without its report
            return self._finish()

    def interrupted(self) -> None:
        """Ctrl-C or SIGTERM during the work: a true manifest (``status: interrupted``, counting every
        partition committed so far: their records, which workers may have written after the
        client's last result), the report, no temporary files. A re-run resumes from the records."""
        with interrupts.deferred():
            finished = read_records(self.layout, self.layout.existing())
            for name in set(self.planned) - set(self.records):
                if name in finished and name not in self.failures:
                    self.records[name] = Record.from_json(finished[name])
            self._finish("interrupted")

    def _finish(self, status: str | None = None) -> tuple[dict[str, Any], int]:
        status, code = (status, EXIT_FAILED) if status else self.outcome()
        if self.processed[0] or self.records_read or self.changed:  # else the index holds every record already
            if self.lock is not None:
                check_held(self.layout, self.run_id)
            t0 = time.perf_counter()
            write_index(self.layout, {name: rec.to_json() for name, rec in {**self.records, **self.missing}.items()})
            self.timings["index_s"] = round(time.perf_counter() - t0, 3)
        if self.footers is not None and self.footers_changed:
            write_footers(self.layout, self.footers)
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
        self.finished = True
        return manifest, code


@contextmanager
def tasks_stopped_then_cleared(layout: OutputLayout) -> Iterator[None]:
    """Around a job's cluster: when Ctrl-C or SIGTERM ends the job, ``OUT/_tmp`` is cleared once
    more after the cluster has stopped, since tasks still running when the job wrote its
    interrupted manifest may have staged files there since (their commits fail the lease check)."""
    try:
        yield
    except KeyboardInterrupt:
        layout.clear_tmp()
        raise


def run_parts(
    job: Job,
    client: Any,
    work: list[Work],
    overwrite: bool = False,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    progress: bool = True,
    unit: str = "rows",
    prune_missing: bool = False,
    start_workers: Callable[[], Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """Run every unfinished part of ``work`` on ``client``; return (manifest, exit code)."""
    sources = {str(p.source) for w in work for p in w.parts} | set(job.failed_inputs)
    todo_names = job.prepare([p for w in work for p in w.parts], sources, overwrite, prune_missing)
    try:
        tasks = [(p, w) for w in work for p in w.parts if p.name in todo_names]
        if start_workers is not None and tasks:
            start_workers()
        log.info("%d partitions planned, %d finished before, %d to run", len(job.planned), job.skipped, len(tasks))
        if job.note:  # said before the work (preparation.threshold_note)
            (print(job.note, file=sys.stderr) if progress else log.warning(job.note))
        job.cluster = cluster_info(client)
        start_line = (f"aesthetic-dask {job.kind}: {len(tasks):,} of {len(job.planned):,} partitions to run on "
                      f"{job.cluster.get('scheduler_address')} ({job.cluster.get('workers')} workers, "
                      f"{job.cluster.get('threads')} threads); dashboard: {job.cluster.get('dashboard_link') or 'none'}")
        if progress:
            print(start_line, file=sys.stderr)
        else:
            log.info(start_line)
        job.write_running()
        if job.report and tasks:
            from .report import warm_up

            warm_up()  # the page's imports overlap the work, off the end of the job
        threads = max(1, job.cluster.get("threads") or 1)
        t0 = time.perf_counter()
        bar = Progress(len(tasks), progress, unit)
        for part, record, exc in submit_parts(client, tasks, job.run_id, job.kind, retries, resources, max(8, 4 * threads),
                                              job.fingerprint):
            collect(job, part, record, exc)
            bar.update(job.records.get(part.name) or job.failures.get(part.name))
            if job.due():
                job.write_running()
        bar.close()
        job.timings["compute_s"] = round(time.perf_counter() - t0, 3)
        return job.finish()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (interrupts.Terminated)
        if job.planned and not job.finished:  # (a signal deferred past the final writes leaves them as they are)
            job.interrupted()
        raise
    finally:
        job.lock.release()  # however the job ends: OUT is free for the next one


def collect(job: Job, part: Any, record: Record | None, exc: BaseException | None) -> None:
    """Record one partition's result; a task exception becomes a failed record with its reason."""
    if record is None:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("partition %s (%s) failed: %s", part.name, part.source, reason)
        record = Record.failed(part, reason, FAILURE_ERROR)
    elif record.failure:
        log.warning("partition %s: %s", part.name, record.failure)
    record.run_id = job.run_id
    job.add(record)
    log.info(
        "partition %s: %s in, %s kept, %s below, %s errors (%.2fs)",
        record.name, record.rows_in, record.rows_kept, record.rows_below_threshold, record.rows_error, record.seconds,
    )
