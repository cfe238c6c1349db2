"""Running a job's partitions on a Dask cluster: skip finished ones, track progress, write the manifest.

Both jobs (``score`` and ``run``) plan a list of parts and a pure ``process(part, ...)`` that reads,
scores and writes one partition and returns its record. This module turns the parts into a Dask
frame of per-partition records (``dd.from_map``), computes it with retries, and keeps
``OUT/manifest.json`` current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, InputError
from .output import COUNT_KEYS, OutputLayout, read_records, remove_partition_files, reset_output, write_json

log = logging.getLogger("aesthetic_dask")

RECORD_COLUMNS = ("name", "source", "record")


def record_frame(record: dict[str, Any]) -> pd.DataFrame:
    """A partition's record as the one-row frame the job's Dask frame is made of."""
    return pd.DataFrame([{"name": record["name"], "source": record["source"], "record": json.dumps(record)}])


def _record_meta() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in RECORD_COLUMNS})


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
class Job:
    """One job over one OUT directory."""

    kind: str
    layout: OutputLayout
    settings: dict[str, Any]  # everything the output depends on; a change needs --overwrite
    info: dict[str, Any]  # recorded in the manifest, not compared (config, weights, versions)
    failed_inputs: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    _last_manifest: float = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def prepare(self, overwrite: bool) -> dict[str, dict[str, Any]]:
        """Check OUT belongs to this job (or reset it), clear leftovers, return finished records."""
        layout = self.layout
        if overwrite:
            reset_output(layout)
        elif layout.manifest.exists():
            try:
                old = json.loads(layout.manifest.read_text())
            except ValueError:
                old = {}
            if old.get("fingerprint") != self.fingerprint:
                before = old.get("settings", {})
                changed = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
                raise InputError(
                    f"{layout.root} holds the output of a different job (changed: {', '.join(changed) or 'unknown'}); "
                    "pass --overwrite to replace it, or choose another output directory"
                )
        elif any(d.is_dir() and any(d.iterdir()) for d in (layout.kept, layout.rejected, layout.errors)):
            raise InputError(f"{layout.root} holds files but no manifest.json; pass --overwrite to replace them")
        shutil.rmtree(layout.tmp, ignore_errors=True)  # orphans of a killed run
        layout.root.mkdir(parents=True, exist_ok=True)
        return read_records(layout)

    def manifest(self, records: dict[str, dict[str, Any]], planned: list[str], status: str) -> dict[str, Any]:
        per_input: dict[str, dict[str, Any]] = {}
        for name in planned:
            rec = records.get(name)
            if rec is None:
                continue
            entry = per_input.setdefault(rec["source"], {k: 0 for k in COUNT_KEYS} | {"partitions_done": 0})
            for k in COUNT_KEYS:
                entry[k] += rec[k]
            entry["partitions_done"] += 1
            if rec.get("failure"):
                entry.setdefault("failures", []).append(rec["failure"])
            if rec.get("note"):
                entry.setdefault("notes", []).append(rec["note"])
        totals = {k: sum(e[k] for e in per_input.values()) for k in COUNT_KEYS}
        done = [n for n in planned if n in records]
        return {
            "job": self.kind,
            "status": status,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            **self.info,
            "totals": totals,
            "inputs": per_input,
            "failed_inputs": self.failed_inputs,
            "partitions": {"planned": len(planned), "done": len(done), "done_names": done},
            "timings": {**self.timings, "elapsed_s": round(time.time() - self.started, 3)},
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "updated_at": datetime.now(timezone.utc).isoformat(),
        }

    def write_manifest(self, records: dict[str, dict[str, Any]], planned: list[str], status: str) -> dict[str, Any]:
        manifest = self.manifest(records, planned, status)
        write_json(self.layout.manifest, manifest, self.layout.tmp)
        self._last_manifest = time.time()
        return manifest


def run_parts(
    job: Job,
    client: Any,
    work: list[tuple[list[Any], Callable[..., pd.DataFrame], dict[str, Any]]],
    overwrite: bool = False,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], int]:
    """Run ``process(part, **kwargs)`` for every unfinished part of each ``(parts, process, kwargs)``.

    Returns (manifest, exit code). Each group becomes a Dask frame of per-partition records
    (``dd.from_map``); all groups are computed together.
    """
    import dask.dataframe as dd
    from distributed import as_completed

    records = job.prepare(overwrite)
    parts = [p for group, _, _ in work for p in group]
    planned = [p.name for p in parts]
    if len(set(planned)) != len(planned):
        raise InputError("two inputs map to the same output name; give each input once")
    todo_names = {p.name for p in parts if p.name not in records}
    for name in todo_names:
        remove_partition_files(job.layout, name)
    log.info("%d partitions planned, %d already done, %d to run", len(parts), len(parts) - len(todo_names), len(todo_names))
    job.write_manifest(records, planned, "running")

    failures = 0
    t0 = time.perf_counter()
    by_future: dict[Any, Any] = {}
    for group, process, kwargs in work:
        todo = [p for p in group if p.name in todo_names]
        if todo:
            frame = dd.from_map(process, todo, **kwargs, meta=_record_meta(), enforce_metadata=False, label=f"{job.kind}-partition")
            futures = client.compute(frame.to_delayed(), retries=retries, resources=resources)
            by_future.update(zip(futures, todo))
    bar = _progress_bar(len(by_future), progress)
    for future in as_completed(list(by_future)):
        part = by_future[future]
        if future.status == "error":
            exc = future.exception()
            failures += 1
            log.error("partition %s failed: %s: %s", part.name, type(exc).__name__, exc)
            records[part.name] = _failed_record(part, f"{type(exc).__name__}: {exc}")
        else:
            rec = json.loads(future.result()["record"].iloc[0])
            records[rec["name"]] = rec
            failures += bool(rec.get("failure"))
            log.info(
                "partition %s: %d in, %d kept, %d below, %d errors (%.2fs)",
                rec["name"], rec["rows_in"], rec["rows_kept"], rec["rows_below_threshold"], rec["rows_error"], rec["seconds"],
            )
        future.release()
        bar.update(1)
        if time.time() - job._last_manifest > 2:
            job.write_manifest(records, planned, "running")
    bar.close()
    job.timings["compute_s"] = round(time.perf_counter() - t0, 3)
    failed = failures + len(job.failed_inputs)
    manifest = job.write_manifest(records, planned, "done" if not failed else "partial")
    shutil.rmtree(job.layout.tmp, ignore_errors=True)
    if failures and failures == len(by_future):
        return manifest, EXIT_FAILED
    return manifest, EXIT_PARTIAL if failed else EXIT_OK


def process_parquet_part(
    part: Any, schema: Any, column: str, out: str, opts: Any, score_table: Callable[[Any], Any]
) -> pd.DataFrame:
    """Read rows of a Parquet input, score them with ``score_table(table)``, write, record.

    ``score_table`` returns the table with ``aesthetic_score`` and ``error`` columns. An
    unreadable part counts all its rows as errors and records why.
    """
    import numpy as np

    from .embeddings_reader import read_embedding_table
    from .errors import DataError
    from .output import split_and_write, write_record

    t0 = time.perf_counter()
    layout = OutputLayout(Path(out))
    record: dict[str, Any] = {"name": part.name, "source": part.source, "start": part.start, "stop": part.stop}
    try:
        table = read_embedding_table(part, schema, column)
    except DataError as exc:
        record |= _failed_record(part, str(exc))
    else:
        rows = np.arange(part.start, part.stop, dtype=np.int64)
        record |= split_and_write(score_table(table), rows, part.name, part.source, layout, opts)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    write_record(layout, record)
    return record_frame(record)


def load_scoring_weights(config: Any) -> tuple[Any, dict[str, Any]]:
    """The predictor of ``config.aesthetic_weights`` and its manifest entry."""
    from .predictor import load_predictor
    from .weights import resolve_weights

    weights = resolve_weights(config.aesthetic_weights, config.resolved_model_dir)
    predictor = load_predictor(weights, config.resolved_model_dir)
    info = {"source": weights.source, "path": str(weights.path), "sha256": weights.sha256, "folded": predictor.folded}
    return predictor, info


def _failed_record(part: Any, reason: str) -> dict[str, Any]:
    """A partition that could not be processed: all its rows count as errors, with a reason."""
    return {
        "name": part.name,
        "source": str(part.source),
        "rows_in": part.rows,
        "rows_kept": 0,
        "rows_below_threshold": 0,
        "rows_error": part.rows,
        "failure": reason,
        "seconds": 0.0,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="part", desc="partitions", file=sys.stderr)


def summary(manifest: dict[str, Any], out: Path, unit: str = "rows") -> str:
    """The one-screen end-of-job summary."""
    t = manifest["totals"]
    elapsed = manifest["timings"].get("elapsed_s", 0) or 1e-9
    rows = [
        (f"{unit} in", f"{t['rows_in']:,}"),
        ("kept (>= threshold)", f"{t['rows_kept']:,}"),
        ("below threshold", f"{t['rows_below_threshold']:,}"),
        ("errors", f"{t['rows_error']:,}"),
        ("throughput", f"{t['rows_in'] / elapsed:,.0f} {unit}/s in {elapsed:.1f}s"),
        ("output", str(out / "kept")),
        ("manifest", str(out / "manifest.json")),
    ]
    lines = [f"aesthetic-dask {manifest['job']}: {manifest['status']}"] + [f"  {k + ':':<22}{v}" for k, v in rows]
    if manifest.get("failed_inputs"):
        lines.append(f"  {'unreadable inputs:':<22}{len(manifest['failed_inputs'])} (see manifest failed_inputs)")
    failures = sum(len(e.get("failures", [])) for e in manifest["inputs"].values())
    if failures:
        lines.append(f"  {'failed partitions:':<22}{failures} (see manifest inputs.*.failures)")
    return "\n".join(lines)
