"""The one-screen end-of-job summary, and its warning about a threshold that keeps almost all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import columns, histogram

# Lines of unreadable inputs and failed partitions the summary shows before "and N more".
SUMMARY_FAILURES = 5


def summary(manifest: dict[str, Any], out: Path) -> str:
    """The one-screen end-of-job summary (of a refilter too: in its job's words)."""
    unit = columns.unit(manifest["job"])
    t = manifest["totals"]
    parts = manifest["partitions"]
    run = manifest.get("this_run", {})
    rows_in = f"{t['rows_in']:,}"
    if t.get("rows_unknown_partitions"):
        rows_in += f" (+ rows unknown in {t['rows_unknown_partitions']} failed partitions)"
    processed, compute_s = run.get("rows_processed", 0), run.get("compute_s") or 0
    if run.get("refilter"):
        throughput = (f"re-split {run['partitions_processed']:,} partitions at {run['refilter']['to']:g} "
                      f"(from {run['refilter']['from']:g}) in {compute_s:.1f}s, no CLIP")
    elif run.get("partitions_processed"):
        throughput = f"{processed / max(compute_s, 1e-9):,.0f} {unit}/s ({processed:,} {unit} processed in {compute_s:.1f}s)"
    else:
        throughput = "nothing processed in this run"
    filtered = "rows_failing_filters" in manifest
    rows = [
        (f"{unit} in", rows_in),
        ("kept (all criteria)" if filtered else "kept (>= threshold)", f"{t['rows_kept']:,}"),
        ("below or filtered" if filtered else "below threshold", f"{t['rows_below_threshold']:,}"),
        # Each --filter criterion, with the valid rows it fails (below or filtered counts them too).
        *(("filter", f"{c} (failed by {n:,} rows)") for c, n in manifest.get("rows_failing_filters", {}).items()),
        ("errors", f"{t['rows_error']:,}"),
        ("partitions", f"{parts['planned']:,} planned: {run.get('partitions_processed', 0):,} run now{_why(run)}, "
                       f"{run.get('partitions_skipped', 0):,} skipped (finished before), {parts['failed']:,} failed"),
        ("throughput", throughput),
        # A refilter's own time, not the job's it re-split.
        ("elapsed", f"{run.get('elapsed_s', manifest.get('timings', {}).get('elapsed_s', 0)):.1f}s"),
        ("output", f"{str(out).rstrip('/')}/kept"),
        ("manifest", f"{str(out).rstrip('/')}/manifest.json"),
    ]
    if manifest.get("cluster", {}).get("dashboard_link"):
        rows.append(("dashboard", manifest["cluster"]["dashboard_link"]))
    caveats = clip_caveats(manifest)
    rows[0:0] = caveats  # first: they qualify every number below
    demo = " (demo CLIP: the scores mean nothing)" if is_demo(manifest) else ""
    command = f"refilter (of a {manifest['job']} job)" if run.get("refilter") else manifest["job"]
    lines = [f"aesthetic-dask {command}: {manifest['status']}{demo}"] + [f"  {k + ':':<22}{v}" for k, v in rows]
    if manifest.get("report"):
        lines.append(f"  {'report:':<22}{manifest['report']}")
    lines += threshold_warning(manifest)
    took_over = manifest.get("lock", {}).get("took_over")
    if took_over:
        lines.append(f"  {'stale lock:':<22}taken over from run {took_over.get('run_id')} "
                     f"(pid {took_over.get('pid')} on {took_over.get('host')}, which had stopped)")
    if manifest.get("missing_inputs"):
        gone = manifest["missing_inputs"]
        lines.append(f"  {'inputs gone:':<22}{len(gone):,} (their output is kept; --prune-missing removes it), "
                     f"e.g. {gone[0]}")
    if manifest.get("duplicate_inputs"):
        lines.append(f"  {'inputs named twice:':<22}{len(manifest['duplicate_inputs'])} (each read once)")
    problems = [f"unreadable input: {path}: {reason}" for path, reason in manifest.get("failed_inputs", {}).items()]
    problems += [f"failed partition: {source}: {reason.removeprefix(source + ': ')}"
                 for source, entry in manifest["inputs"].items() for reason in entry.get("failures", [])]
    lines += [f"  {p}" for p in problems[:SUMMARY_FAILURES]]
    if len(problems) > SUMMARY_FAILURES:
        lines.append(f"  ... and {len(problems) - SUMMARY_FAILURES} more (see manifest failed_inputs and inputs.*.failures)")
    return "\n".join(lines)


def is_demo(manifest: dict[str, Any]) -> bool:
    """Whether the job ran on the demo CLIP (``--demo-clip``)."""
    return bool((manifest.get("clip") or {}).get("demo"))


def clip_caveats(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) of each thing the summary and the report say about a CLIP whose fit to the heads
    was not checked: the demo CLIP (random weights), or one the user vouched for (a local CLIP
    checkpoint, a head file the registry does not know). Such scores look plausible and may mean nothing."""
    if is_demo(manifest):
        return [("demo CLIP", "a small randomly initialised CLIP (--demo-clip): this run demonstrates the "
                              "pipeline and its scores mean nothing")]
    return [("CLIP not checked", f"{column}: {why.removeprefix('vouched: ')}; the scores mean something only if "
                                 "this CLIP is the one the head was trained on")
            for column, why in ((manifest.get("clip") or {}).get("compatibility") or {}).items()
            if str(why).startswith("vouched")]


def _why(run: dict[str, Any]) -> str:
    """" (2 new, 1 changed since read)" of a re-run that found new or changed inputs, else ""."""
    said = [f"{run[k]:,} {what}" for k, what in (("partitions_new", "new"), ("partitions_changed", "changed since read"))
            if run.get(k)]
    return f" ({', '.join(said)})" if said and run.get("partitions_skipped") or run.get("partitions_changed") else ""


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
    if "rows_failing_filters" in manifest:  # the histogram knows aesthetic_score alone, not the filters
        return [f"  warning: threshold {threshold:g} and the filters kept {kept / scored:.1%} of the scored rows;",
                f"           by aesthetic_score alone, {options}"]
    return [f"  warning: threshold {threshold:g} kept {kept / scored:.1%} of the scored rows (scores land roughly in 1..10);",
            f"           instead {options}"]
